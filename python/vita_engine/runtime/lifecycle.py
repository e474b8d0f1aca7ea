"""Turn lifecycle on the scheduler thread: start (prompt assembly, vision, the prefix prefilled ahead,
history trimming), commit and discard of speculative turns, and the endings (finish, interrupt, fail,
close) that put the answer into the history and release what the turn held.

A turn start assembles its whole prompt; when the session's `Prefix` (prefix_stage.py: the images and
what precedes them, prefilled while the user spoke) equals its start exactly, the turn begins after
it, else the prefix is dropped and the prompt prefilled whole. A discarded speculative turn leaves the
prefix in the KV; a committed one takes it over.

History trimming (per-session token budget `session_max_tokens`): before a turn is prefilled, if the
session's KV + the turn's prompt + its answer allowance would exceed the budget, the oldest turns are
evicted (the check counts from the end of the history, a prefix being part of the new prompt): the
KV is truncated to the system prompt (its pages stay, the rest are freed) and the
remaining recent turns are replayed through the LLM from their stored input embeddings (no audio or
vision re-encode). A turn that cannot fit even alone fails with an Error event.
"""
from __future__ import annotations

import time
from typing import List, Optional

import numpy as np
import torch

from .chat import system_prompt_for
from .events import Error, Interrupted, Metrics, TurnEnd, TurnStarted
from .metrics import WORK_KEYS, TurnClock, nvtx_range
from .stage import Stage
from .vision_stage import encode_visuals
from .state import SessionState, Turn, TurnRecord, UnspokenSegments

__all__ = ["Lifecycle"]


class Lifecycle(Stage):
    start_tiles = 0  # image/frame tiles encoded at a turn start (not ahead by the vision stage)

    # ---- start -------------------------------------------------------------------------------------
    def start_turn(self, st: SessionState, kind: str, *, audio=None, text: Optional[str] = None,
                   speculative: bool = False, spec_end_ms=None, decision=None, last_voiced=None,
                   speak: Optional[bool] = None, max_new_tokens: Optional[int] = None,
                   audio_stats: Optional[dict] = None) -> None:
        """`kind`: "audio" (the VAD's utterance in st.frontend), "input_audio" (features of a whole
        utterance given to respond()) or "text"; `speak`/`max_new_tokens` default to the session's."""
        m, fmt = self.model, self.e.chat
        if st.system_changed and st.sys_len is not None:
            self._restart_for_system(st)
        clock = TurnClock()
        clock.mark("created")
        if not speculative:
            clock.decision = decision if decision is not None else time.perf_counter()
            clock.last_voiced = last_voiced
        if kind == "audio" or audio_stats:
            fs = st.frontend.stats if kind == "audio" else audio_stats
            clock.add("fbank_ms", fs.get("fbank_ms", 0.0))
            clock.add("audio_encoder_ms", fs.get("encoder_ms", 0.0))
        # images / video frames: usually encoded on arrival (vision_stage.py); what is left runs here
        feats: List[torch.Tensor] = []
        modality = "lang"
        sel: List = []
        if st.pending_frames:
            modality = "video"
            fr = sorted(st.pending_frames, key=lambda v: v.ts)
            k = min(len(fr), int(self.o["max_video_frames"]))
            idx = np.linspace(0, len(fr) - 1, k).round().astype(int) if k > 1 else [len(fr) - 1]
            sel = [fr[i] for i in idx]
        if st.pending_images:
            modality = "image" if modality == "lang" else modality
        visuals = sel + st.pending_images
        if visuals:  # vision_ms: what the turn start itself encodes (0 when all were encoded on arrival)
            self.start_tiles += sum(v.tiles for v in visuals if v.feats is None)
            clock.add("vision_ms", encode_visuals(m.vision, visuals, self.nvtx))
        for v in visuals:
            feats += list(v.feats)
        msg = fmt.user_message(len(feats), audio is not None, text)
        user_ids = fmt.turn_ids(msg, system=None, close_previous=False)
        x_user = m.splice(user_ids, image_features=feats or None, audio_features=audio)
        head, n_sys = self.prompt_head(st, modality, x_user)
        restore = (st.needs_close, list(st.unfed_ids), st.sys_len, list(st.records))
        budget = int(self.o["session_max_tokens"])
        max_new = max_new_tokens if max_new_tokens is not None else self.default_max_new(st)
        x = torch.cat([head, x_user], 0)
        # the start of x prefilled ahead (prefix_stage.py), verified token for token against x; a stale
        # prefix is dropped here and x is prefilled whole
        prefix = self.sch.prefix_stage
        cached = prefix.take(st, x)
        base = st.seq.length - cached  # the end of the history
        evicted = False
        if base + x.shape[0] + max_new > budget and st.sys_len is not None:
            prefix.drop(st)  # the history before it changes
            cached = 0
            x = self._evict(st, x_user, budget - max_new)
            evicted = True
            base = st.seq.length
        avail = budget - base - x.shape[0]
        turn = Turn(idx=st.next_turn, kind=kind, clock=clock, x=x, kv_start=base, restore=restore,
                    record_x=x_user, max_new_tokens=max(0, min(max_new, avail)), speculative=speculative,
                    spec_end_ms=spec_end_ms, prefilled=cached, prefix_tokens=cached)
        turn.speak = st.speak if speak is None else bool(speak)
        turn.frames_seen = list(st.pending_frames)
        if not turn.speak:
            turn.segments = UnspokenSegments()
        turn.sys_tokens = n_sys  # type: ignore[attr-defined]
        turn.evicted = evicted  # type: ignore[attr-defined]
        st.turn = turn
        st.needs_close, st.unfed_ids = False, []
        if not speculative:
            self._on_commit(st)
        if avail < 1:
            self.fail(st, f"turn of {x.shape[0]} prompt tokens does not fit the session budget of {budget} tokens "
                          f"(session_max_tokens); history already trimmed to the system prompt")

    def prompt_head(self, st: SessionState, modality: str, like: torch.Tensor):
        """What the next turn's prompt holds before its user block: the close of the previous answer
        (its unfed tokens + `<|im_end|>\n`), and on the first turn the system prompt (by `modality`
        unless the session set one) and the history replayed behind a changed system prompt.
        -> (embeddings [n, hidden] (empty like `like`), tokens counted as the system prompt)."""
        fmt, s = self.e.chat, st.session
        first = st.sys_len is None
        system = (s.system_prompt if s.system_prompt is not None else system_prompt_for(modality)) if first else None
        close_ids = (st.unfed_ids + fmt.encode("<|im_end|>\n")) if st.needs_close else []
        sys_ids = fmt.system_ids(system) if first else []
        head = self.model.llm.embed(close_ids + sys_ids) if (close_ids or sys_ids) else like[:0]
        if first and st.replay_x is not None:  # the history behind a changed system prompt
            head = torch.cat([head, st.replay_x], 0)
        return head, (len(sys_ids) + len(close_ids) if first else 0)

    @staticmethod
    def default_max_new(st: SessionState) -> int:
        return st.max_new_tokens if st.max_new_tokens is not None else st.session.max_new_tokens

    def _evict(self, st: SessionState, x_user: torch.Tensor, limit: int) -> torch.Tensor:
        """Drop the oldest turns until the rest + the new turn fit `limit`; truncate the KV to the system
        prompt and return the embeddings to prefill (replayed kept turns + the new user block)."""
        fmt, llm = self.e.chat, self.model.llm
        close = fmt.encode("<|im_end|>\n")
        replay = [torch.cat([r.x_user, llm.embed(r.answer_ids + close)], 0) for r in st.records]
        recs = list(st.records)
        # the last record's answer may have unfed tokens (already in answer_ids): replay covers them
        while replay and st.sys_len + sum(int(t.shape[0]) for t in replay) + x_user.shape[0] > limit:
            replay.pop(0)
            recs.pop(0)
        st.stats["evictions"] += 1
        st.records = recs
        st.seq.truncate(st.sys_len)
        return torch.cat(replay + [x_user], 0)

    # ---- speculative turns -------------------------------------------------------------------------
    def _on_commit(self, st: SessionState) -> None:
        t = st.turn
        st.next_turn += 1
        # the turn's prompt took every pending image (one pushed after a speculative start discards that
        # start: turns.py) and chose among the frames pending at its start; frames pushed since then (a
        # camera streaming on through the pause) are the next turn's
        seen = {id(v) for v in t.frames_seen}
        st.pending_images = []
        st.pending_frames = [v for v in st.pending_frames if id(v) not in seen]
        t.frames_seen = []
        st.prefix = None  # its KV is the committed turn's now
        st.session._playback_s = None
        st.replay_x = None
        if t.kind == "audio":
            st.frontend.reset()
        if st.input_events:
            st.session._sink.put(TurnStarted(t.idx, "text" if t.kind == "text" else "audio"))

    def commit(self, st: SessionState, now: float, last_voiced) -> None:
        """A speculative turn becomes real at the end-of-turn decision."""
        t = st.turn
        t.speculative = False
        t.clock.decision = now
        t.clock.last_voiced = last_voiced
        self._on_commit(st)
        if t.state == "ready":
            t.state = "decode"
            tok, t.held_token = t.held_token, None
            self.sch.llm_stage.on_token(st, t, tok)

    def discard(self, st: SessionState) -> None:
        """Undo a speculative turn: free its KV pages, roll the history back."""
        t = st.turn
        if t is None:
            return
        st.turn = None
        self._rollback(st, t)
        st.stats["discarded"] = st.stats.get("discarded", 0) + 1

    def _rollback(self, st: SessionState, t: Turn) -> None:
        """Remove turn t (whose prompt may be partly cached) from the KV and the history."""
        if getattr(t, "evicted", False):
            # older turns were already dropped for this turn: the history restarts after the system prompt
            st.records, st.needs_close, st.unfed_ids = [], False, []
            st.seq.truncate(st.sys_len or 0)
        else:
            st.needs_close, st.unfed_ids, st.sys_len, st.records = t.restore
            # a speculative turn built on a prefix leaves it in the KV (still valid: nothing before it changed)
            st.seq.truncate(t.kv_start + self.sch.prefix_stage.kept_after(st, t))

    # ---- endings -----------------------------------------------------------------------------------
    def finish(self, st: SessionState, t: Turn, interrupted: bool = False) -> None:
        """Close the turn: keep `kept` answer tokens in the history, release the rest, emit the tail events."""
        if st.turn is not t:
            return
        if interrupted and t.speak:
            kept = self._delivered_tokens(st, t)
        else:
            kept = len(t.tokens)
        self._release_tts(t)
        st.last_turn = None
        if t.state == "prefill":
            # the prompt never made it (whole) into the KV: drop the whole turn
            self._rollback(st, t)
        else:
            st.last_turn = t
            if st.sys_len is None:
                st.sys_len = t.kv_start + getattr(t, "sys_tokens", 0)
            fed = min(kept, t.n_fed)
            st.seq.truncate(t.prompt_end + fed)
            st.unfed_ids = list(t.tokens[fed:kept])
            st.needs_close = True
            st.records.append(TurnRecord(t.record_x, list(t.tokens[:kept])))
        st.turn = None
        vals = t.clock.values()
        vals["answer_tokens"] = float(kept)
        vals["prompt_tokens"] = float(t.x.shape[0] - t.prefix_tokens)  # prefilled by this turn (usage figures)
        vals["cached_tokens"] = float(t.kv_start + t.prefix_tokens)  # already in the KV: history + prefix
        vals["codec_tokens"] = float(sum(len(g.codec) for g in t.segments))
        vals["audio_out_s"] = t.samples / float(getattr(self.e.codec, "sample_rate", 24000) or 24000)
        spoken = [g for g in t.segments if g.text_ids]
        vals["tts_segments"] = float(len(spoken))
        if getattr(t, "tts_empty", 0):
            vals["tts_empty_segments"] = float(t.tts_empty)  # type: ignore[attr-defined]
        if any(g.dropped for g in spoken):
            vals["tts_dropped_segments"] = float(sum(g.dropped for g in spoken))
        sink = st.session._sink
        if interrupted:
            sink.put(Interrupted(t.idx))
        # the contract's Metrics carry every work stage: 0 ms where the turn had none (no image, a text
        # turn's audio stages); the distributions only take the turns that did the work
        self.e.metrics.add(dict(vals))
        for k in WORK_KEYS:
            vals.setdefault(k, 0.0)
        sink.put(Metrics(t.idx, vals))
        sink.put(TurnEnd(t.idx))

    def _delivered_tokens(self, st: SessionState, t: Turn, played_s: Optional[float] = None) -> int:
        """LLM tokens whose audio was delivered (or played, if the client reported a position, or
        `played_s` says)."""
        hop = int(getattr(self.e.codec, "hop_length", 600) or 600)
        sr = int(getattr(self.e.codec, "sample_rate", 24000) or 24000)
        delivered = t.samples
        pb = st.session._playback_s if played_s is None else played_s
        if pb is not None:
            delivered = min(delivered, int(pb * sr))
        if self.e.codec is None or self.e.tts is None:
            return len(t.tokens) if not t.segments else 0
        cum = 0
        kept = 0
        for seg in t.segments:
            span = len(seg.codec) * hop
            if span and cum + span <= delivered and seg.tts_done:
                kept = seg.tok_end
                cum += span
                continue
            if span and delivered > cum:
                frac = min(1.0, (delivered - cum) / span)
                kept = seg.tok_start + int(frac * (seg.tok_end - seg.tok_start))
            break
        return min(kept, len(t.tokens))

    def _release_tts(self, t: Turn) -> None:
        tts = self.e.tts
        for seg in t.segments:
            if seg.sid is not None and tts is not None:
                try:
                    tts.release(seg.sid)
                except KeyError:
                    pass
                seg.sid = None
            seg.tts_done = True
        t.codec_stream = None

    # ---- after the turn: truncation, system prompt ----------------------------------------------------
    def truncate(self, st: SessionState, idx: int, played_s: float) -> bool:
        """The client played only `played_s` of finished turn `idx`: trim the history (KV and record)
        to the answer tokens spoken by then. Only the latest finished turn while no later turn is
        committed (a speculative one is discarded first: the end of turn redoes it). -> applied."""
        t = st.last_turn
        if st.turn is not None and not st.turn.speculative:
            t = None
        if t is None or t.idx != idx or st.replay_x is not None or st.system_changed:
            st.stats["truncate_refused"] = st.stats.get("truncate_refused", 0) + 1
            return False
        if st.turn is not None:
            self.discard(st)
        if not st.records or st.last_turn is not t:
            return False
        rec = st.records[-1]
        now = len(rec.answer_ids)
        kept = min(now, self._delivered_tokens(st, t, played_s)) if t.speak else now
        if kept < now:
            self.sch.prefix_stage.drop(st)  # built behind the untrimmed answer
            fed = min(kept, t.n_fed)
            st.seq.truncate(t.prompt_end + fed)
            st.unfed_ids = list(t.tokens[fed:kept])
            st.needs_close = True
            st.records[-1] = TurnRecord(rec.x_user, list(t.tokens[:kept]))
            st.stats["truncations"] = st.stats.get("truncations", 0) + 1
        return True

    def set_system(self, st: SessionState, text: Optional[str]) -> None:
        """A new system prompt: used as is before the first turn; afterwards the next turn replays the
        history behind it (_restart_for_system)."""
        st.session.system_prompt = text
        self.sch.prefix_stage.drop(st)  # built behind the old system prompt
        if st.sys_len is not None:
            st.system_changed = True

    def _restart_for_system(self, st: SessionState) -> None:
        """The KV restarts empty; the kept turns are replayed from their stored embeddings after the new
        system prompt (by the next turn's prefill: `st.replay_x`, kept until that turn commits)."""
        close = self.e.chat.encode("<|im_end|>\n")
        llm = self.model.llm
        replay = [torch.cat([r.x_user, llm.embed(r.answer_ids + close)], 0) for r in st.records]
        st.replay_x = torch.cat(replay, 0) if replay else None
        self.sch.prefix_stage.drop(st)
        st.seq.truncate(0)
        st.sys_len, st.needs_close, st.unfed_ids = None, False, []
        st.system_changed = False
        st.last_turn = None

    def interrupt(self, st: SessionState) -> None:
        self._end_early(st, None)

    def fail(self, st: SessionState, msg: str) -> None:
        self._end_early(st, msg)

    def _end_early(self, st: SessionState, error) -> None:
        """End the session's turn early: a speculative one is discarded without a trace; a committed
        one is interrupted (error None) or fails with an Error event first."""
        t = st.turn
        if t is None:
            return
        if t.speculative:
            self.discard(st)
            return
        if error is None:
            st.stats["interrupts"] += 1
        else:
            st.session._sink.put(Error(t.idx, error))
        self.finish(st, t, interrupted=error is None)

    def close(self, st: SessionState) -> None:
        if st.closed:
            return
        t = st.turn
        if t is not None:
            self._release_tts(t)
            st.turn = None
        st.prefix = None  # its pages go with the sequence's
        st.closed = True
        st.seq.release()
        self.e.kv.unreserve(st.reserved_blocks)
        self.states.pop(st.session.id, None)
        self.e._session_closed(st.session)
        from .session import _CLOSED

        st.session._sink.put(_CLOSED)
        st.session._released.set()

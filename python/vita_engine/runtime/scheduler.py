"""The Engine's one scheduler thread. Each tick:

1. drains every session's inbox (audio -> VAD -> incremental audio features; images; text turns;
   interrupts; close) and runs turn taking (speculative prefill on a short pause, commit on end of
   turn, discard on resumed speech, barge-in on new speech while answering);
2. ONE batched LLM forward over every session: a decode row for each answering session plus
   chunked prefill of new turns within `prefill_chunk_tokens` (a long prompt never stalls decoding);
3. ONE batched TTS AR step for every active TTS stream (segments start as soon as the text
   segmenter hands one over);
4. codec windows for every turn with new codec tokens (`Codec.push_many`);
5. events go to each session's sink (thread-safe; asyncio via call_soon_threadsafe).

History trimming (per-session token budget `session_max_tokens`): before a turn is prefilled, if the
session's KV + the turn's prompt + its answer allowance would exceed the budget, the oldest turns are
evicted: the KV is truncated to the system prompt (its pages stay, the rest are freed) and the
remaining recent turns are replayed through the LLM from their stored input embeddings (no audio or
vision re-encode). A turn that cannot fit even alone fails with an Error event.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Dict, List, Optional

import numpy as np
import torch

from . import _compat
from .batch_llm import BatchLLM, LLMWork
from .chat import IncrementalDetokenizer, system_prompt_for
from .events import AudioChunk, Error, Interrupted, Metrics, TextDelta, TurnEnd
from .metrics import TickStats, TurnClock, nvtx_range
from .state import Segment, SessionState, Turn, TurnRecord

log = logging.getLogger(__name__)

__all__ = ["Scheduler"]


class Scheduler:
    def __init__(self, engine):
        self.e = engine
        self.o = engine.options
        self.model = engine.model
        self.llm = BatchLLM(engine.model.llm, engine.kv)
        self._states: Dict[int, SessionState] = {}
        self._new: List[SessionState] = []
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._wake = False
        self._stop = False
        self.ticks = 0
        self.tick_errors = 0
        self.tick_stats = TickStats()
        self._nvtx = bool(self.o["nvtx"])
        self._thread = threading.Thread(target=self._run, name="vita-engine-scheduler", daemon=True)
        self._thread.start()

    # ---- thread ------------------------------------------------------------------------------------
    def add(self, st: SessionState) -> None:
        with self._lock:
            self._new.append(st)
        self.wake()

    def wake(self) -> None:
        with self._cv:
            self._wake = True
            self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self.o.get("cpu_threads"):
            torch.set_num_threads(int(self.o["cpu_threads"]))
        while not self._stop:
            t0 = self.tick_stats.start()
            try:
                busy = self.tick()
            except Exception:  # never let the loop die; the failing turns were already reported
                self.tick_errors += 1
                log.error("scheduler tick failed:\n%s", traceback.format_exc())
                busy = False
            self.tick_stats.stop(t0, busy)
            if not busy:
                with self._cv:
                    if not self._wake:
                        self._cv.wait(timeout=0.02)
                    self._wake = False
        for st in list(self._states.values()):
            self._close(st)

    # ---- one tick ----------------------------------------------------------------------------------
    def tick(self) -> bool:
        self.ticks += 1
        with self._lock:
            new, self._new = self._new, []
        for st in new:
            self._states[st.session.id] = st
        busy = bool(new)
        for st in list(self._states.values()):
            try:
                busy |= self._admin(st)
            except Exception as ex:
                log.error("session %d: %s", st.session.id, traceback.format_exc())
                self._fail(st, f"{type(ex).__name__}: {ex}")
        busy |= self._llm_step()
        busy |= self._tts_step()
        busy |= self._codec_step()
        return busy

    # ---- inbox and turn taking ---------------------------------------------------------------------
    def _admin(self, st: SessionState) -> bool:
        s = st.session
        busy = False
        while True:
            try:
                cmd = s._inbox.popleft()
            except IndexError:
                break
            busy = True
            kind = cmd[0]
            if kind == "close":
                self._close(st)
                return True
            if kind == "audio":
                self._on_audio(st, cmd[1], cmd[2])
            elif kind == "image":
                st.pending_images.append(cmd[1])
            elif kind == "frame":
                st.pending_frames.append((cmd[2], cmd[1]))
                del st.pending_frames[:-64]
            elif kind == "text":
                st.queued_texts.append((cmd[1], cmd[2]))
            elif kind == "interrupt":
                self._interrupt(st)
        if st.queued_texts and (st.turn is None or st.turn.speculative):
            text, t = st.queued_texts.popleft()
            if st.turn is not None:
                self._discard(st)
            self._start_turn(st, "text", text=text, decision=t)
            busy = True
        return busy

    def _on_audio(self, st: SessionState, x: np.ndarray, t_arrival: float) -> None:
        st.arrivals.append((st.n_samples + x.size, t_arrival))
        keep = st.preroll + x.size
        st.hist = np.concatenate([st.hist, x])[-keep:]
        hist_base = st.n_samples + x.size - st.hist.size
        active = st.utt_start is not None
        if active:
            st.frontend.push(x)
        evs = st.vad.push(x)
        st.n_samples += x.size
        for ev in evs:
            name = type(ev).__name__
            if name == "SpeechStart":
                self._barge_in(st)
                start = int(round(getattr(ev, "speech_start_ms", ev.t_ms) * 16))
                st.utt_start = max(hist_base, start - st.preroll)
                st.frontend.reset()
                st.frontend.push(st.hist[st.utt_start - hist_base:])
            elif st.utt_start is None:
                continue
            elif name == "SpeculativeEnd":
                if self.o["speculative"] and st.turn is None and not st.queued_texts:
                    end_ms = ev.speech_end_ms - st.utt_start / 16.0
                    feats = st.frontend.encode_partial(end_ms=end_ms)
                    if feats is not None:
                        self._start_turn(st, "audio", audio=feats, speculative=True, spec_end_ms=ev.speech_end_ms)
            elif name == "SpeechResumed":
                if st.turn is not None and st.turn.speculative:
                    self._discard(st)
            elif name == "TurnEnd":
                now = time.perf_counter()
                last_voiced = st.arrival_time(int(ev.speech_end_ms * 16))
                t = st.turn
                if t is not None and t.speculative and t.spec_end_ms is not None and abs(t.spec_end_ms - ev.speech_end_ms) < 1e-6:
                    self._commit(st, now, last_voiced)
                else:
                    if t is not None and t.speculative:
                        self._discard(st)
                    end_ms = ev.speech_end_ms - st.utt_start / 16.0
                    try:
                        feats = st.frontend.finish(end_ms=end_ms)
                    except ValueError:
                        feats = None
                    if feats is not None and st.turn is None:
                        self._start_turn(st, "audio", audio=feats, decision=now, last_voiced=last_voiced)
                st.utt_start = None
            elif name == "SpeechDiscarded":
                if st.turn is not None and st.turn.speculative:
                    self._discard(st)
                st.utt_start = None

    def _barge_in(self, st: SessionState) -> None:
        # a speculative turn is always dropped; a committed one only when barge-in is enabled
        t = st.turn
        if t is not None and (t.speculative or self.o["barge_in"]):
            self._interrupt(st)

    # ---- turn lifecycle ----------------------------------------------------------------------------
    def _start_turn(self, st: SessionState, kind: str, *, audio=None, text: Optional[str] = None,
                    speculative: bool = False, spec_end_ms=None, decision=None, last_voiced=None) -> None:
        m, fmt, s = self.model, self.e.chat, st.session
        clock = TurnClock()
        clock.mark("created")
        if not speculative:
            clock.decision = decision if decision is not None else time.perf_counter()
            clock.last_voiced = last_voiced
        if kind == "audio":
            fs = st.frontend.stats
            clock.add("fbank_ms", fs.get("fbank_ms", 0.0))
            clock.add("audio_encoder_ms", fs.get("encoder_ms", 0.0))
        # images / video frames
        feats: List[torch.Tensor] = []
        modality = "lang"
        if st.pending_frames:
            modality = "video"
            fr = [pv for _, pv in sorted(st.pending_frames, key=lambda p: p[0])]
            k = min(len(fr), int(self.o["max_video_frames"]))
            idx = np.linspace(0, len(fr) - 1, k).round().astype(int) if k > 1 else [len(fr) - 1]
            sel = [fr[i] for i in idx]
            t0 = time.perf_counter()
            with nvtx_range("vision", self._nvtx):
                enc = m.vision.encode(torch.cat(sel, 0))
            clock.add("vision_ms", (time.perf_counter() - t0) * 1e3)
            feats += list(enc)
        if st.pending_images:
            modality = "image" if modality == "lang" else modality
            t0 = time.perf_counter()
            with nvtx_range("vision", self._nvtx):
                for pv in st.pending_images:
                    feats += list(m.vision.encode(pv))
            clock.add("vision_ms", (time.perf_counter() - t0) * 1e3)
        first = st.sys_len is None
        system = (s.system_prompt if s.system_prompt is not None else system_prompt_for(modality)) if first else None
        msg = fmt.user_message(len(feats), audio is not None, text)
        close_ids = (st.unfed_ids + fmt.encode("<|im_end|>\n")) if st.needs_close else []
        sys_ids = fmt.system_ids(system) if first else []
        user_ids = fmt.turn_ids(msg, system=None, close_previous=False)
        x_user = m.splice(user_ids, image_features=feats or None, audio_features=audio)
        head = m.llm.embed(close_ids + sys_ids) if (close_ids or sys_ids) else x_user[:0]
        restore = (st.needs_close, list(st.unfed_ids), st.sys_len, list(st.records))
        budget = int(self.o["session_max_tokens"])
        max_new = s.max_new_tokens
        x = torch.cat([head, x_user], 0)
        evicted = False
        if st.seq.length + x.shape[0] + max_new > budget and st.sys_len is not None:
            x = self._evict(st, x_user, budget - max_new)
            evicted = True
        n_sys = len(sys_ids) + len(close_ids) if first else 0
        avail = budget - st.seq.length - x.shape[0]
        turn = Turn(idx=st.next_turn, kind=kind, clock=clock, x=x, kv_start=st.seq.length, restore=restore,
                    record_x=x_user, max_new_tokens=max(0, min(max_new, avail)), speculative=speculative,
                    spec_end_ms=spec_end_ms)
        turn.sys_tokens = n_sys  # type: ignore[attr-defined]
        turn.evicted = evicted  # type: ignore[attr-defined]
        st.turn = turn
        st.needs_close, st.unfed_ids = False, []
        if not speculative:
            self._on_commit(st)
        if avail < 1:
            self._fail(st, f"turn of {x.shape[0]} prompt tokens does not fit the session budget of {budget} tokens "
                           f"(session_max_tokens); history already trimmed to the system prompt")

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

    def _on_commit(self, st: SessionState) -> None:
        t = st.turn
        st.next_turn += 1
        st.pending_images, st.pending_frames = [], []
        st.session._playback_s = None
        if t.kind == "audio":
            st.frontend.reset()

    def _commit(self, st: SessionState, now: float, last_voiced) -> None:
        """A speculative turn becomes real at the end-of-turn decision."""
        t = st.turn
        t.speculative = False
        t.clock.decision = now
        t.clock.last_voiced = last_voiced
        self._on_commit(st)
        if t.state == "ready":
            t.state = "decode"
            tok, t.held_token = t.held_token, None
            self._on_token(st, t, tok)

    def _discard(self, st: SessionState) -> None:
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
            st.seq.truncate(t.kv_start)

    # ---- LLM ---------------------------------------------------------------------------------------
    def _llm_step(self) -> bool:
        work: List[LLMWork] = []
        rows: List[tuple] = []  # (state, turn, kind)
        for st in self._states.values():
            t = st.turn
            if t is not None and t.state == "decode" and not t.llm_done:
                tok = t.tokens[-1]
                work.append(LLMWork(st.seq, self.model.llm.embed([tok])))
                rows.append((st, t, "decode"))
        budget = int(self.o["prefill_chunk_tokens"])
        for st in sorted(self._states.values(), key=lambda s: s.turn.clock.t.get("created", 0) if s.turn else 0):
            t = st.turn
            if budget <= 0:
                break
            if t is None or t.state != "prefill":
                continue
            n = min(budget, t.x.shape[0] - t.prefilled)
            last = t.prefilled + n == t.x.shape[0]
            if t.prefilled == 0:
                t.clock.mark("prefill_start")
            work.append(LLMWork(st.seq, t.x[t.prefilled:t.prefilled + n], want_logits=last))
            rows.append((st, t, "prefill_last" if last else "prefill"))
            t.prefilled += n
            st.stats["prefill_tokens"] += n
            budget -= n
        if not work:
            return False
        try:
            with nvtx_range("llm_forward", self._nvtx):
                logits = self.llm.forward(work)
        except Exception as ex:
            log.error("LLM forward failed:\n%s", traceback.format_exc())
            for st, t, _ in rows:
                if st.turn is t:
                    self._fail(st, f"LLM forward failed: {type(ex).__name__}: {ex}")
            return True
        want = [(st, t, k) for (st, t, k) in rows if k != "prefill"]
        if want:
            B = len(want)
            dev = logits.device
            temp = torch.tensor([st.session.temperature for st, _, _ in want], dtype=torch.float32, device=dev)
            topk = torch.tensor([st.session.top_k for st, _, _ in want], dtype=torch.int32, device=dev)
            seed = torch.tensor([st.session.seed for st, _, _ in want], dtype=torch.int64, device=dev)
            step = torch.tensor([st.gen_step for st, _, _ in want], dtype=torch.int64, device=dev)
            from .. import ops

            with nvtx_range("sample", self._nvtx):  # on CUDA: waits for the forward too
                toks = ops.sample_tokens(logits, temperature=temp, top_k=topk, seed=seed, step=step).tolist()
            assert len(toks) == B
        else:
            toks = []
        now = time.perf_counter()
        for (st, t, kind), tok in zip(want, toks):
            st.gen_step += 1
            if st.turn is not t:
                continue
            if kind == "decode":
                t.n_fed += 1
                st.stats["decode_tokens"] += 1
                self._on_token(st, t, tok)
            else:
                t.clock.mark("prefill_end", now)
                st.stats["turn_prefill_tokens"].append(int(t.x.shape[0]))
                if t.speculative:
                    t.state, t.held_token = "ready", tok
                else:
                    t.state = "decode"
                    self._on_token(st, t, tok)
        return True

    def _on_token(self, st: SessionState, t: Turn, tok: int) -> None:
        fmt = self.e.chat
        t.clock.mark("first_token")
        if tok in fmt.stop_ids or t.max_new_tokens <= 0:
            self._llm_done(st, t)
            return
        t.tokens.append(tok)
        if t.detok is None:
            t.detok = IncrementalDetokenizer(fmt)
            t.segmenter = _compat.TextSegmenter()
        self._text(st, t, t.detok.push(tok))
        if len(t.tokens) >= t.max_new_tokens:
            self._llm_done(st, t)

    def _text(self, st: SessionState, t: Turn, delta: str) -> None:
        """One stable text delta: to the client (TextDelta) and to the TTS segmenter (same text)."""
        if delta:
            t.text += delta
            st.session._sink.put(TextDelta(delta, t.idx))
            for seg in t.segmenter.push(delta):
                self._add_segment(st, t, seg, len(t.tokens))

    def _llm_done(self, st: SessionState, t: Turn) -> None:
        t.llm_done = True
        t.state = "speak"
        if t.detok is not None:
            # the answer is over: what the detokenizer held back (an incomplete trailing character) goes out
            self._text(st, t, t.detok.flush())
        if t.segmenter is not None:
            for seg in t.segmenter.flush():
                self._add_segment(st, t, seg, len(t.tokens))
        if self.e.tts is not None and t.text.strip() and not any(g.text_ids for g in t.segments):
            # the answer has text but nothing the segmenter calls speakable (no letter or digit: only
            # symbols, or U+FFFD of invalid bytes, as the random tiny model often answers): speak it as it
            # is rather than ending the turn without audio (pieces of <= 120 characters)
            txt = " ".join(t.text.split())
            for i in range(0, len(txt), 120):
                self._add_segment(st, t, txt[i:i + 120], len(t.tokens))
        # the last sampled token is not fed: it joins the next turn's prompt with <|im_end|>
        st.stats["turn_answer_tokens"] = len(t.tokens)

    def _add_segment(self, st: SessionState, t: Turn, text: str, tok_end: int) -> None:
        start = t.segments[-1].tok_end if t.segments else 0
        norm = _compat.normalize_tts_text(text)
        ids = self.e.chat.encode(norm) if norm.strip() else []
        seg = Segment(text=norm, tok_start=start, tok_end=max(start, tok_end), text_ids=ids)
        if not ids or self.e.tts is None:
            seg.tts_done = True
        t.segments.append(seg)

    # ---- TTS ---------------------------------------------------------------------------------------
    def _tts_step(self) -> bool:
        tts = self.e.tts
        if tts is None:
            return False
        busy = False
        for st in self._states.values():
            t = st.turn
            if t is None or t.speculative:
                continue
            for si, seg in enumerate(t.segments):
                if seg.sid is None and not seg.tts_done:
                    t0 = time.perf_counter()
                    try:
                        with nvtx_range("tts_nar", self._nvtx):
                            seg.sid = tts.start(seg.text_ids, seed=(st.session.seed * 1000003 + t.idx * 1009 + si) % (2**62))
                    except _compat.TTSCapacityError as ex:
                        now = time.perf_counter()
                        if seg.waiting_since is None:
                            seg.waiting_since = now
                            st.stats["tts_capacity_waits"] = st.stats.get("tts_capacity_waits", 0) + 1
                        if tts.active() and now - seg.waiting_since < float(self.o["tts_capacity_wait_s"]):
                            break  # streams in flight will free capacity: retry next tick, keep the order
                        # nothing can free capacity (no stream in flight) or waited too long: never drop silently
                        seg.tts_done, seg.dropped = True, True
                        st.stats["tts_dropped_segments"] = st.stats.get("tts_dropped_segments", 0) + 1
                        st.session._sink.put(Error(t.idx, f"TTS capacity exhausted: answer segment {si} "
                                                          f"({len(seg.text_ids)} text tokens) is not spoken "
                                                          f"after {now - seg.waiting_since:.1f} s: {ex}"))
                        log.warning("session %d turn %d: TTS segment dropped: %s", st.session.id, t.idx, ex)
                        continue
                    if "tts_nar_ms" not in t.clock.ms:
                        t.clock.add("tts_nar_ms", (time.perf_counter() - t0) * 1e3)
                    busy = True
        sids = {}
        for st in self._states.values():
            t = st.turn
            if t is None:
                continue
            for seg in t.segments:
                if seg.sid is not None and not seg.tts_done:
                    sids[seg.sid] = (st, t, seg)
        if not sids:
            return busy
        with nvtx_range("tts_ar", self._nvtx):
            out = tts.step(list(sids))
        now = time.perf_counter()
        for sid, tok in out.items():
            st, t, seg = sids[sid]
            if tok is None:
                seg.tts_done = True
                tts.release(sid)
                if not seg.codec:  # the TTS ended the segment at once (eos first): it has no audio
                    st.stats["tts_empty_segments"] = st.stats.get("tts_empty_segments", 0) + 1
                    t.tts_empty = getattr(t, "tts_empty", 0) + 1  # type: ignore[attr-defined]
            else:
                seg.codec.append(int(tok))
                t.clock.mark("first_codec_token", now)
        return True

    # ---- codec -------------------------------------------------------------------------------------
    def _codec_step(self) -> bool:
        codec = self.e.codec
        streams, lists, owners = [], [], []
        busy = False
        for st in list(self._states.values()):
            t = st.turn
            if t is None or t.speculative:
                continue
            toks: List[int] = []
            while t.head < len(t.segments):
                seg = t.segments[t.head]
                toks += seg.codec[seg.pushed:]
                seg.pushed = len(seg.codec)
                if not seg.tts_done:
                    break
                t.head += 1
            if toks and codec is not None:
                if t.codec_stream is None:
                    t.codec_stream = codec.stream()
                streams.append(t.codec_stream)
                lists.append(toks)
                owners.append((st, t))
                st.stats["codec_tokens"] += len(toks)
        if streams:
            busy = True
            with nvtx_range("codec", self._nvtx):
                outs = codec.push_many(streams, lists)
            for (st, t), y in zip(owners, outs):
                if y is not None and y.numel():
                    t.clock.mark("first_window")
                    self._emit_audio(st, t, y)
        for st in list(self._states.values()):
            t = st.turn
            if t is not None and t.llm_done and t.head >= len(t.segments):
                if t.codec_stream is not None:
                    y = t.codec_stream.flush()
                    if y is not None and y.numel():
                        t.clock.mark("first_window")
                        self._emit_audio(st, t, y)
                self._finish(st, t)
                busy = True
        return busy

    def _emit_audio(self, st: SessionState, t: Turn, y: torch.Tensor) -> None:
        pcm = np.clip(y.detach().float().reshape(-1).cpu().numpy(), -1.0, 1.0).astype(np.float32)
        sr = int(getattr(self.e.codec, "sample_rate", 24000))
        st.session._sink.put(AudioChunk(pcm, sr, t.idx, st.chunk_seq, t.samples))
        t.clock.mark("first_audio")
        st.chunk_seq += 1
        t.samples += pcm.size
        st.stats["audio_samples"] += pcm.size

    # ---- endings -----------------------------------------------------------------------------------
    def _finish(self, st: SessionState, t: Turn, interrupted: bool = False) -> None:
        """Close the turn: keep `kept` answer tokens in the history, release the rest, emit the tail events."""
        if st.turn is not t:
            return
        if interrupted:
            kept = self._delivered_tokens(st, t)
        else:
            kept = len(t.tokens)
        self._release_tts(t)
        if t.state == "prefill":
            # the prompt never made it (whole) into the KV: drop the whole turn
            self._rollback(st, t)
        else:
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
        sink.put(Metrics(t.idx, vals))
        sink.put(TurnEnd(t.idx))
        self.e.metrics.add({k: v for k, v in vals.items()})

    def _delivered_tokens(self, st: SessionState, t: Turn) -> int:
        """LLM tokens whose audio was delivered (or played, if the client reported a position)."""
        hop = int(getattr(self.e.codec, "hop_length", 600) or 600)
        sr = int(getattr(self.e.codec, "sample_rate", 24000) or 24000)
        delivered = t.samples
        pb = st.session._playback_s
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

    def _interrupt(self, st: SessionState) -> None:
        t = st.turn
        if t is None:
            return
        if t.speculative:
            self._discard(st)
            return
        st.stats["interrupts"] += 1
        self._finish(st, t, interrupted=True)

    def _fail(self, st: SessionState, msg: str) -> None:
        t = st.turn
        if t is None:
            return
        if t.speculative:
            self._discard(st)
            return
        st.session._sink.put(Error(t.idx, msg))
        self._finish(st, t, interrupted=False)

    def _close(self, st: SessionState) -> None:
        if st.closed:
            return
        t = st.turn
        if t is not None:
            self._release_tts(t)
            st.turn = None
        st.closed = True
        st.seq.release()
        self.e.kv.unreserve(st.reserved_blocks)
        self._states.pop(st.session.id, None)
        self.e._session_closed(st.session)
        from .session import _CLOSED

        st.session._sink.put(_CLOSED)
        st.session._released.set()

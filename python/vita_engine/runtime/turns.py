"""Inbox and turn taking on the scheduler thread: each session's commands (audio, images, frames,
text turns, interrupts, close) are drained in order; audio goes through the VAD into the incremental
audio features, and the VAD's events drive the turn: speculative prefill on a short pause, commit on
end of turn, discard on resumed speech, barge-in on new speech while answering.

Audio runs every tick for every listening session, so it is batched across sessions: the audio each
session received since the last tick goes through ONE batched VAD call (`vad.push_many`) and the
fbank of every utterance in progress through ONE fbank call (`frontend.fbank_many`); only the rare
event work (encoding at a pause, starting a turn) is per session."""
from __future__ import annotations

import logging
import time
import traceback
from typing import List, Tuple

import numpy as np

from . import _compat
from . import vad as _vad
from .events import SpeechStarted, SpeechStopped
from .frontend import fbank_many
from .stage import Stage
from .state import SessionState, Visual

log = logging.getLogger(__name__)

__all__ = ["TurnTaking"]


class TurnTaking(Stage):
    next_due = None  # perf_counter time at which audio left waiting becomes due (the scheduler wakes then)

    def step(self) -> bool:
        """Drain every inbox (commands in order; each session's audio since the last command batched
        with the other sessions'), then start queued text turns where nothing (real) is in flight.
        Audio waits until the oldest chunk is `policy.audio_interval_ms` old (one batched VAD call per
        interval instead of one per tick); any other command makes it due at once."""
        self.next_due = None
        now = time.perf_counter()
        oldest = None
        for st in self.states.values():
            inbox = st.session._inbox
            if inbox:
                head = inbox[0]
                if head[0] != "audio":
                    oldest = float("-inf")
                    break
                oldest = head[2] if oldest is None else min(oldest, head[2])
        if oldest is None:
            return self._start_texts()
        due = oldest + self.policy.audio_interval_ms * 1e-3
        if due > now:
            self.next_due = due
            return self._start_texts()
        busy = False
        pending = list(self.states.values())
        while pending:  # more than one round only when a session sent audio, a command, then audio again
            runs: List[Tuple[SessionState, list]] = []
            again: List[SessionState] = []
            for st in pending:
                try:
                    run, more, did = self._drain(st)
                except Exception as ex:
                    self._failed(st, ex)
                    continue
                busy |= did
                if run:
                    runs.append((st, run))
                if more:
                    again.append(st)
            if runs:
                self._audio(runs)
            pending = again
        return self._start_texts() or busy

    def _start_texts(self) -> bool:
        busy = False
        life = self.sch.life
        for st in list(self.states.values()):
            if st.queued_texts and (st.turn is None or st.turn.speculative):
                item = st.queued_texts.popleft()
                text, t = item[0], item[1]
                x = item[2] if len(item) > 2 else {}  # respond() / a queued utterance: audio and options
                try:
                    if st.turn is not None:
                        life.discard(st)
                    life.start_turn(st, "text" if x.get("audio") is None else "input_audio", text=text,
                                    audio=x.get("audio"), decision=t, last_voiced=x.get("last_voiced"),
                                    speak=x.get("speak"), max_new_tokens=x.get("max_new_tokens"),
                                    audio_stats=x.get("audio_stats"))
                except Exception as ex:
                    self._failed(st, ex)
                busy = True
        return busy

    def _failed(self, st: SessionState, ex: Exception) -> None:
        log.error("session %d: %s", st.session.id, traceback.format_exc())
        self.sch.life.fail(st, f"{type(ex).__name__}: {ex}")

    def _drain(self, st: SessionState):
        """Run the session's commands up to its next run of audio chunks.
        -> (audio chunks [(pcm, t_arrival)], more commands after them, anything done)."""
        inbox, life = st.session._inbox, self.sch.life
        did = False
        while inbox:
            if inbox[0][0] == "audio":
                run = []
                while inbox and inbox[0][0] == "audio":
                    cmd = inbox.popleft()
                    run.append((cmd[1], cmd[2]))
                return run, bool(inbox), True
            cmd = inbox.popleft()
            did = True
            kind = cmd[0]
            if kind == "close":
                life.close(st)
                return [], False, True
            if kind == "image":
                if st.turn is not None and st.turn.speculative:
                    # the image belongs to the turn being decided, whose speculative prompt lacks it: the
                    # end of turn starts it again with the image (as without speculation)
                    life.discard(st)
                st.pending_images.append(Visual(cmd[1], None, cmd[2]))
            elif kind == "frame":
                self.sch.prefix_stage.drop(st)  # frames come before the images in the user block
                st.pending_frames.append(Visual(cmd[1], cmd[2], time.perf_counter()))
                del st.pending_frames[:-64]
            elif kind == "text":
                st.queued_texts.append((cmd[1], cmd[2]))
            elif kind == "interrupt":
                life.interrupt(st)
            elif kind == "config":
                self._configure(st, cmd[1])
            elif kind == "respond":
                self._respond(st, *cmd[1:])
            elif kind == "clear_held":
                st.held_audio = []
            elif kind == "truncate":
                life.truncate(st, cmd[1], cmd[2])
        return [], False, did

    def _configure(self, st: SessionState, cfg: dict) -> None:
        """Session.configure() on the scheduler thread."""
        life = self.sch.life
        restart_vad = cfg.get("vad") is not None
        if cfg.get("manual") is not None and bool(cfg["manual"]) != st.manual:
            st.manual = bool(cfg["manual"])
            restart_vad = True
        if restart_vad:  # a fresh detector; an utterance in progress (and its speculative turn) is dropped
            if st.turn is not None and st.turn.speculative:
                life.discard(st)
            st.utt_start, st.spec_request = None, None
            st.vad = _compat.StreamingVAD(cfg.get("vad") or st.vad.config)
            st.vad_base_ms = st.n_samples / 16.0
        if cfg.get("preroll_ms") is not None:
            st.preroll = int(cfg["preroll_ms"]) * 16
        for k in ("barge_in", "max_new_tokens"):
            if k in cfg:
                setattr(st, k, cfg[k])
        for k in ("input_events", "auto_respond", "speak"):
            if cfg.get(k) is not None:
                setattr(st, k, bool(cfg[k]))
        if "system_prompt" in cfg:
            life.set_system(st, cfg["system_prompt"])

    def _respond(self, st: SessionState, audio, text, opts: dict, t: float) -> None:
        """Session.respond(): encode the given utterance (or take the held ones) and queue the turn."""
        feats, stats = None, None
        if audio is not None:
            if self.model.audio is None:
                raise ValueError("respond: this checkpoint has no audio encoder")
            fe = _compat.IncrementalAudioFrontend(self.model.audio)
            fe.append(audio)
            feats = fe.finish()  # ValueError when too short
            stats = fe.stats
        elif st.held_audio:
            import torch

            feats = st.held_audio[0] if len(st.held_audio) == 1 else torch.cat(st.held_audio, 0)
            st.held_audio = []
        if feats is None and not text:
            log.warning("session %d: respond() with no audio, no held utterance and no text: ignored", st.session.id)
            return
        st.queued_texts.append((text, t, {"audio": feats, "audio_stats": stats, **opts}))

    def _audio(self, runs: List[Tuple[SessionState, list]]) -> None:
        xs = []
        for st, run in runs:
            x = run[0][0] if len(run) == 1 else np.concatenate([c for c, _ in run])
            n = st.n_samples
            for c, t in run:
                n += c.size
                st.arrivals.append((n, t))
            keep = st.preroll + x.size
            st.hist = np.concatenate([st.hist, x])[-keep:]
            if st.utt_start is not None:
                st.frontend.append(x)  # fbank below, batched
            xs.append(x)
        auto = [i for i, (st, _) in enumerate(runs) if not st.manual]  # manual sessions: no VAD turn taking
        try:
            got = _vad.push_many([runs[i][0].vad for i in auto], [xs[i] for i in auto]) if auto else []
        except Exception as ex:  # the VAD model itself failed: no session can take turns on this audio
            for st, _ in runs:
                self._failed(st, ex)
            return
        events = [[] for _ in runs]
        for i, evs in zip(auto, got):
            events[i] = evs
        # fbank before the events: an end of turn then finds its features ready, and the batched
        # fbank of the other sessions is not on its critical path
        fbank_many([st.frontend for st, _ in runs if st.utt_start is not None and st.frontend is not None])
        for (st, _), x, evs in zip(runs, xs, events):
            try:
                st.n_samples += x.size
                self._on_vad(st, evs)
            except Exception as ex:
                self._failed(st, ex)

    def _on_vad(self, st: SessionState, evs: list) -> None:
        life = self.sch.life
        hist_base = st.n_samples - st.hist.size
        b = st.vad_base_ms  # the detector's stream time -> the session's (a configure() restarts it)
        for ev in evs:
            name = type(ev).__name__
            if name == "SpeechStart":
                if st.input_events:
                    st.session._sink.put(SpeechStarted(b + getattr(ev, "speech_start_ms", ev.t_ms)))
                self._barge_in(st)
                start = int(round((b + getattr(ev, "speech_start_ms", ev.t_ms)) * 16))
                st.spec_request = None
                st.utt_start = max(hist_base, start - st.preroll)
                st.frontend.reset()
                st.frontend.append(st.hist[st.utt_start - hist_base:])
            elif st.utt_start is None:
                continue
            elif name == "SpeculativeEnd":
                if self.o["speculative"] and st.auto_respond and st.turn is None and not st.queued_texts:
                    # encoded and prefilled by speculate(), when the policy finds room for it
                    st.spec_request = (b + ev.speech_end_ms, time.perf_counter())
            elif name == "SpeechResumed":
                st.spec_request = None
                if st.turn is not None and st.turn.speculative:
                    life.discard(st)
            elif name == "TurnEnd":
                st.spec_request = None  # never served: the end of turn encodes the utterance itself
                now = time.perf_counter()
                end_abs = b + ev.speech_end_ms
                last_voiced = st.arrival_time(int(end_abs * 16))
                t = st.turn
                if t is not None and t.speculative and t.spec_end_ms is not None and abs(t.spec_end_ms - end_abs) < 1e-6:
                    self._stopped(st, ev, "turn")
                    life.commit(st, now, last_voiced)
                else:
                    if t is not None and t.speculative:
                        life.discard(st)
                    end_ms = end_abs - st.utt_start / 16.0
                    try:
                        feats = st.frontend.finish(end_ms=end_ms)
                    except ValueError:
                        feats = None
                    if feats is None:
                        self._stopped(st, ev, "discarded")
                    elif not st.auto_respond:
                        st.held_audio.append(feats)
                        self._stopped(st, ev, "held")
                    elif st.turn is None:
                        self._stopped(st, ev, "turn")
                        life.start_turn(st, "audio", audio=feats, decision=now, last_voiced=last_voiced)
                    elif st.input_events:  # answering (no barge-in): the utterance is answered next
                        self._stopped(st, ev, "turn")
                        st.queued_texts.append((None, now, {"audio": feats, "last_voiced": last_voiced}))
                    else:
                        self._stopped(st, ev, "discarded")
                st.utt_start = None
            elif name == "SpeechDiscarded":
                self._stopped(st, ev, "discarded")
                st.spec_request = None
                if st.turn is not None and st.turn.speculative:
                    life.discard(st)
                st.utt_start = None

    def speculate(self) -> bool:
        """Serve the speculative starts (encode the utterance up to the pause, start a speculative turn
        whose prefill then runs while the end-of-turn timer does) that the policy lets run now."""
        reqs = [st for st in self.states.values() if st.spec_request is not None]
        if not reqs:
            return False
        now = time.perf_counter()
        reqs.sort(key=lambda st: st.spec_request[1])
        n = self.policy.speculative_starts(list(self.states.values()), [(now - st.spec_request[1]) * 1e3 for st in reqs])
        for st in reqs[:n]:
            end, _ = st.spec_request
            st.spec_request = None
            if st.utt_start is None or st.turn is not None or st.queued_texts or st.manual:
                continue
            try:
                feats = st.frontend.encode_partial(end_ms=end - st.utt_start / 16.0)
                if feats is not None:
                    self.sch.life.start_turn(st, "audio", audio=feats, speculative=True, spec_end_ms=end)
            except Exception as ex:
                self._failed(st, ex)
        return n > 0

    def _barge_in(self, st: SessionState) -> None:
        # a speculative turn is always dropped; a committed one only when barge-in is enabled
        t = st.turn
        if t is not None and (t.speculative or (self.o["barge_in"] if st.barge_in is None else st.barge_in)):
            self.sch.life.interrupt(st)

    def _stopped(self, st: SessionState, ev, status: str) -> None:
        if st.input_events:
            b = st.vad_base_ms
            st.session._sink.put(SpeechStopped(b + ev.speech_start_ms, b + ev.speech_end_ms, status))

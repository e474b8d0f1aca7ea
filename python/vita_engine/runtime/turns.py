"""Inbox and turn taking on the scheduler thread: each session's commands (audio, images, frames,
text turns, interrupts, close) are drained; audio goes through the VAD into the incremental audio
features, and the VAD's events drive the turn: speculative prefill on a short pause, commit on end
of turn, discard on resumed speech, barge-in on new speech while answering."""
from __future__ import annotations

import time

import numpy as np

from .stage import Stage
from .state import SessionState

__all__ = ["TurnTaking"]


class TurnTaking(Stage):
    def admin(self, st: SessionState) -> bool:
        """Drain one session's inbox; start a queued text turn when nothing (real) is in flight."""
        s = st.session
        life = self.sch.life
        busy = False
        while True:
            try:
                cmd = s._inbox.popleft()
            except IndexError:
                break
            busy = True
            kind = cmd[0]
            if kind == "close":
                life.close(st)
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
                life.interrupt(st)
        if st.queued_texts and (st.turn is None or st.turn.speculative):
            text, t = st.queued_texts.popleft()
            if st.turn is not None:
                life.discard(st)
            life.start_turn(st, "text", text=text, decision=t)
            busy = True
        return busy

    def _on_audio(self, st: SessionState, x: np.ndarray, t_arrival: float) -> None:
        life = self.sch.life
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
                        life.start_turn(st, "audio", audio=feats, speculative=True, spec_end_ms=ev.speech_end_ms)
            elif name == "SpeechResumed":
                if st.turn is not None and st.turn.speculative:
                    life.discard(st)
            elif name == "TurnEnd":
                now = time.perf_counter()
                last_voiced = st.arrival_time(int(ev.speech_end_ms * 16))
                t = st.turn
                if t is not None and t.speculative and t.spec_end_ms is not None and abs(t.spec_end_ms - ev.speech_end_ms) < 1e-6:
                    life.commit(st, now, last_voiced)
                else:
                    if t is not None and t.speculative:
                        life.discard(st)
                    end_ms = ev.speech_end_ms - st.utt_start / 16.0
                    try:
                        feats = st.frontend.finish(end_ms=end_ms)
                    except ValueError:
                        feats = None
                    if feats is not None and st.turn is None:
                        life.start_turn(st, "audio", audio=feats, decision=now, last_voiced=last_voiced)
                st.utt_start = None
            elif name == "SpeechDiscarded":
                if st.turn is not None and st.turn.speculative:
                    life.discard(st)
                st.utt_start = None

    def _barge_in(self, st: SessionState) -> None:
        # a speculative turn is always dropped; a committed one only when barge-in is enabled
        t = st.turn
        if t is not None and (t.speculative or self.o["barge_in"]):
            self.sch.life.interrupt(st)

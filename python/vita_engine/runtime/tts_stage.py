"""The TTS stage: starts a TTS stream (NAR + AR prefix prefill) for each segment the segmenter handed
over, then runs batched AR steps (`TTSBatchDecoder.step`) for the streams in flight, as many per
tick as the policy gives each stream."""
from __future__ import annotations

import logging
import time

from . import _compat
from .events import Error
from .metrics import nvtx_range
from .stage import Stage

log = logging.getLogger(__name__)

__all__ = ["TTSStage"]


class TTSStage(Stage):
    steps = 0  # batched AR steps run (a counter for the tick statistics)

    def step(self) -> bool:
        tts = self.e.tts
        if tts is None:
            return False
        busy = self._start_segments(tts)
        now = time.perf_counter()
        plan = {}  # sid -> [session, turn, segment, steps left this tick]
        for st in self.states.values():
            t = st.turn
            if t is None:
                continue
            t.collect_codec()  # the policy looks at the segment that plays next
            for seg in t.segments:
                if seg.sid is not None and not seg.tts_done:
                    plan[seg.sid] = [st, t, seg, self.policy.tts_steps(t, seg, now)]
        if not plan:
            return busy
        # batched AR steps: every stream with steps left joins the next one (bursts run back to back)
        while True:
            sids = [sid for sid, p in plan.items() if p[3] > 0]
            if not sids:
                break
            with nvtx_range("tts_ar", self.nvtx):
                out = tts.step(sids)
            self.steps += 1
            now = time.perf_counter()
            for sid, tok in out.items():
                p = plan[sid]
                st, t, seg = p[0], p[1], p[2]
                p[3] -= 1
                if tok is None:
                    p[3] = 0
                    seg.tts_done = True
                    tts.release(sid)
                    if not seg.codec:  # the TTS ended the segment at once (eos first): it has no audio
                        st.stats["tts_empty_segments"] = st.stats.get("tts_empty_segments", 0) + 1
                        t.tts_empty = getattr(t, "tts_empty", 0) + 1  # type: ignore[attr-defined]
                else:
                    seg.codec.append(int(tok))
                    t.clock.mark("first_codec_token", now)
        for st, t, _, _ in plan.values():
            t.collect_codec()
        return True

    def _start_segments(self, tts) -> bool:
        """NAR + prefix prefill of the segments not yet started that the policy starts now, in order per
        turn, all in one `start_many` call (one NAR + one prefill forward for every session). When the
        TTS is short of capacity they start one by one: a segment that finds no capacity waits, keeping
        the order, and is dropped with an Error after `tts_capacity_wait_s` or at once when no stream in
        flight could free capacity."""
        states = list(self.states.values())
        urgent = self.policy.first_audio_pending(states)
        groups = []  # per turn, its segments to start, in order
        for st in states:
            t = st.turn
            if t is None or t.speculative:
                continue
            g = []
            for si, seg in enumerate(t.segments):
                if seg.sid is None and not seg.tts_done:
                    if not self.policy.tts_start(t, si, urgent):
                        break  # later segments wait too (they start in order)
                    g.append((st, t, si, seg))
            if g:
                groups.append(g)
        if not groups:
            return False
        flat = [c for g in groups for c in g]
        t0 = time.perf_counter()
        try:
            with nvtx_range("tts_nar", self.nvtx):
                sids = tts.start_many([seg.text_ids for _, _, _, seg in flat], [self._seed(st, t, si) for st, t, si, _ in flat])
        except _compat.TTSCapacityError:
            for g in groups:
                self._start_in_order(tts, g)
            return True
        ms = (time.perf_counter() - t0) * 1e3
        for (st, t, si, seg), sid in zip(flat, sids):
            seg.sid = sid
            if "tts_nar_ms" not in t.clock.ms:
                t.clock.add("tts_nar_ms", ms)
        return True

    @staticmethod
    def _seed(st, t, si) -> int:
        return (st.session.seed * 1000003 + t.idx * 1009 + si) % (2**62)

    def _start_in_order(self, tts, group) -> None:
        for st, t, si, seg in group:
            t0 = time.perf_counter()
            try:
                with nvtx_range("tts_nar", self.nvtx):
                    seg.sid = tts.start(seg.text_ids, seed=self._seed(st, t, si))
            except _compat.TTSCapacityError as ex:
                now = time.perf_counter()
                if seg.waiting_since is None:
                    seg.waiting_since = now
                    st.stats["tts_capacity_waits"] = st.stats.get("tts_capacity_waits", 0) + 1
                if tts.active() and now - seg.waiting_since < float(self.o["tts_capacity_wait_s"]):
                    return  # streams in flight will free capacity: retry next tick, keep the order
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

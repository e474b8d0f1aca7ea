"""The codec stage: pushes each turn's codec tokens (in segment order, one codec stream per turn) into
exact streaming codec windows when the policy says a window is due (`Codec.push_many`: streams that
push the same number of tokens are batched; first windows go before later ones), emits the final samples as AudioChunk
events, and ends the turn once the LLM and every segment are done (the rest is pushed and flushed)."""
from __future__ import annotations

import math
import time
from typing import List, Tuple

import numpy as np
import torch

from .events import AudioChunk
from .metrics import nvtx_range
from .stage import Stage
from .state import SessionState, Turn

__all__ = ["CodecStage"]


class CodecStage(Stage):
    pushes = 0  # codec stream pushes (streams, not push_many calls; a counter for the tick statistics)
    stream_ms = 2.0  # running estimate of a later window's cost per stream (sizes batches to the budget)

    def step(self) -> bool:
        codec = self.e.codec
        now = time.perf_counter()
        first: List[Tuple[SessionState, Turn, int]] = []   # first windows: the critical path
        ending: List[Tuple[SessionState, Turn, int]] = []  # the rest of a finished turn, before its flush
        later: List[Tuple[SessionState, Turn, int]] = []
        states = list(self.states.values())
        for st in states:
            t = st.turn
            if t is None or t.speculative:
                continue
            t.collect_codec()
            if codec is None:
                t.codec_pending.clear()
                continue
            if self._ending(t):
                if t.codec_pending:
                    ending.append((st, t, len(t.codec_pending)))
                continue
            n = self.policy.codec_push(t, now)
            if n > 0:
                (first if t.codec_pushed == 0 else later).append((st, t, n))
        busy = bool(first or later or ending)
        for group in (first, ending):
            if group:
                self._push(codec, group)
        if later:
            # later windows in the policy's order, one push_many per window size (it batches the
            # steady streams whatever their position), within the policy's time budget for this tick
            # (the rest waits for the next tick): a finite budget cuts a group into batches sized from
            # the measured cost per stream, so one large batch cannot hold the critical path
            budget = self.policy.codec_budget_ms(self.policy.first_audio_pending(states))
            t0 = time.perf_counter()
            groups: dict = {}
            for c in self.policy.order_windows(later, now):
                groups.setdefault(c[2], []).append(c)
            for g in groups.values():
                while g:
                    left = budget - (time.perf_counter() - t0) * 1e3
                    if left <= 0:
                        break
                    k = len(g) if math.isinf(budget) else max(1, int(left / self.stream_ms))
                    t1 = time.perf_counter()
                    self._push(codec, g[:k])
                    self.stream_ms = 0.8 * self.stream_ms + 0.2 * (time.perf_counter() - t1) * 1e3 / len(g[:k])
                    g = g[k:]
                if g:
                    break
        for st in list(self.states.values()):
            t = st.turn
            if t is not None and not t.speculative and self._ending(t) and not t.codec_pending:
                if t.codec_stream is not None:
                    y = t.codec_stream.flush()
                    if y is not None and y.numel():
                        t.clock.mark("first_window")
                        self._emit_audio(st, t, y)
                self.sch.life.finish(st, t)
                busy = True
        return busy

    @staticmethod
    def _ending(t: Turn) -> bool:
        """The LLM is done and every segment's codec tokens are collected: the turn's audio is complete."""
        return t.llm_done and t.head >= len(t.segments)

    def _push(self, codec, group: List[Tuple[SessionState, Turn, int]]) -> None:
        streams, lists = [], []
        for st, t, n in group:
            if t.codec_stream is None:
                t.codec_stream = codec.stream()
            streams.append(t.codec_stream)
            lists.append(t.codec_pending[:n])
            del t.codec_pending[:n]
            t.codec_pushed += n
            st.stats["codec_tokens"] += n
        with nvtx_range("codec", self.nvtx):
            outs = codec.push_many(streams, lists, graphs=getattr(self.e, "codec_graphs", None))
        self.pushes += len(streams)
        for (st, t, _), y in zip(group, outs):
            if y is not None and y.numel():
                t.clock.mark("first_window")
                self._emit_audio(st, t, y)

    def _emit_audio(self, st: SessionState, t: Turn, y: torch.Tensor) -> None:
        pcm = np.clip(y.detach().float().reshape(-1).cpu().numpy(), -1.0, 1.0).astype(np.float32)
        sr = int(getattr(self.e.codec, "sample_rate", 24000))
        st.session._sink.put(AudioChunk(pcm, sr, t.idx, st.chunk_seq, t.samples))
        t.clock.mark("first_audio")
        st.chunk_seq += 1
        t.samples += pcm.size
        st.stats["audio_samples"] += pcm.size

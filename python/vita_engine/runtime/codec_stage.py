"""The codec stage: pushes each turn's new codec tokens (in segment order, one codec stream per turn)
into exact streaming codec windows (`Codec.push_many`, streams in the same state batched), emits the
final samples as AudioChunk events, and ends the turn once the LLM and every segment are done."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from .events import AudioChunk
from .metrics import nvtx_range
from .stage import Stage
from .state import SessionState, Turn

__all__ = ["CodecStage"]


class CodecStage(Stage):
    def step(self) -> bool:
        codec = self.e.codec
        streams, lists, owners = [], [], []
        busy = False
        for st in list(self.states.values()):
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
            with nvtx_range("codec", self.nvtx):
                outs = codec.push_many(streams, lists)
            for (st, t), y in zip(owners, outs):
                if y is not None and y.numel():
                    t.clock.mark("first_window")
                    self._emit_audio(st, t, y)
        for st in list(self.states.values()):
            t = st.turn
            if t is not None and t.llm_done and t.head >= len(t.segments):
                if t.codec_stream is not None:
                    y = t.codec_stream.flush()
                    if y is not None and y.numel():
                        t.clock.mark("first_window")
                        self._emit_audio(st, t, y)
                self.sch.life.finish(st, t)
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

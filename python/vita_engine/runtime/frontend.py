"""Incremental audio features for one utterance: fbank (+CMVN) as audio arrives, encoder on demand.

Kaldi fbank frames (25 ms window, 10 ms hop, snip_edges) depend only on their own samples, so
each `push` computes just the frames that became complete; the result equals
`audio_model.fbank(whole utterance)` (same code path, applied to the new window of samples).
The encoder is full-context (spec §4), so `encode_partial()` re-runs it on the frames so far; the
runtime calls it during pauses (VAD SpeculativeEnd) so little is left to do at the end of the turn.
Results are cached by frame count: `finish()` after an `encode_partial()` with no new frames is free.

Speculative use: VAD `SpeculativeEnd.speech_end_ms` and the following `TurnEnd.speech_end_ms` agree
when the user did not resume, so `encode_partial(end_ms=E)` then `finish(end_ms=E)` hits the cache
even though silence kept arriving in between. `end_ms` is relative to the first sample pushed since
construction / `reset()`.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from ..model.audio import fbank_frames

__all__ = ["IncrementalAudioFrontend", "fbank_many"]


class IncrementalAudioFrontend:
    """`push(x16k)`, `encode_partial(end_ms=None)`, `finish(end_ms=None) -> [T_llm, hidden]`, `reset()`,
    `stats` (ms spent in fbank / encoder, runs, cache hits). `audio_model` is `VitaModel.audio`
    (an `AudioEncoder`: `fbank(wave)` and `encode_features(feats)`)."""

    def __init__(self, audio_model):
        if audio_model is None:
            raise ValueError("IncrementalAudioFrontend: this checkpoint has no audio encoder (VitaModel.audio is None)")
        self.audio_model = audio_model
        c = audio_model.config
        self.sample_rate = int(c.sample_rate)
        self.win = int(c.sample_rate * c.frame_length_ms * 0.001)
        self.hop = int(c.sample_rate * c.frame_shift_ms * 0.001)
        self.num_mel_bins = int(c.num_mel_bins)
        self.reset()

    def reset(self) -> None:
        """Forget the utterance (samples, frames, cached encoder output); stats restart too."""
        self._samples = np.zeros(1 << 15, np.float32)
        self._n = 0
        self._chunks = []          # fbank frame blocks not yet concatenated
        self._feats = torch.zeros(0, self.num_mel_bins)
        self._cache_T = -1
        self._cache = None
        self.stats = {"fbank_ms": 0.0, "encoder_ms": 0.0, "encoder_runs": 0, "cache_hits": 0,
                      "frames": 0, "samples": 0}

    # ---- audio ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._n

    @property
    def num_frames(self) -> int:
        return self.stats["frames"]

    @property
    def duration_ms(self) -> float:
        return self._n * 1000.0 / self.sample_rate

    @property
    def samples(self) -> np.ndarray:
        """The utterance so far (a view; do not modify)."""
        return self._samples[: self._n]

    def push(self, x16k) -> int:
        """Append 16 kHz float32 mono samples; computes the fbank frames that became complete.
        Returns the number of new frames."""
        self.append(x16k)
        return self.compute()

    def append(self, x16k) -> None:
        """Append samples without computing fbank yet (`compute()` or `fbank_many()` does, batched;
        `features`, `encode_partial` and `finish` compute what is pending first)."""
        x = np.asarray(x16k)
        if x.ndim != 1:
            raise ValueError(f"IncrementalAudioFrontend.push: expected 1-D 16 kHz mono samples, got shape {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"IncrementalAudioFrontend.push: expected float samples in [-1, 1], got {x.dtype}")
        k = x.shape[0]
        if k == 0:
            return
        need = self._n + k
        if need > self._samples.shape[0]:
            cap = self._samples.shape[0]
            while cap < need:
                cap *= 2
            grown = np.zeros(cap, np.float32)
            grown[: self._n] = self._samples[: self._n]
            self._samples = grown
        self._samples[self._n: need] = x
        self._n = need

    @property
    def pending_frames(self) -> int:
        """Complete fbank frames whose features are not computed yet."""
        total = fbank_frames(self._n, self.sample_rate, self.audio_model.config.frame_length_ms,
                             self.audio_model.config.frame_shift_ms)
        return max(0, total - self.stats["frames"])

    def _pending_window(self):
        """(samples covering exactly the pending frames, number of frames), or (None, 0)."""
        n = self.pending_frames
        if n == 0:
            return None, 0
        done = self.stats["frames"]
        return self._samples[done * self.hop: (done + n - 1) * self.hop + self.win], n

    def _add_frames(self, f: torch.Tensor, ms: float) -> None:
        self._chunks.append(f)
        self.stats["fbank_ms"] += ms
        self.stats["frames"] += int(f.shape[0])
        self.stats["samples"] = self._n

    def compute(self) -> int:
        """fbank of the pending frames (this stream alone). Returns the number of new frames."""
        seg, n = self._pending_window()
        if n == 0:
            return 0
        t0 = time.perf_counter()
        f = self.audio_model.fbank(seg)
        assert f.shape[0] == n, (f.shape, n)
        self._add_frames(f, (time.perf_counter() - t0) * 1000.0)
        return n

    @property
    def features(self) -> torch.Tensor:
        """CMVN-normalised fbank of the utterance so far, [frames, num_mel_bins] float32."""
        self.compute()
        if self._chunks:
            self._feats = torch.cat([self._feats, *self._chunks], 0)
            self._chunks = []
        return self._feats

    # ---- encoder -------------------------------------------------------------------------------
    def _frames_for(self, end_ms: Optional[float]) -> int:
        self.compute()
        T = self.num_frames
        if end_ms is not None:
            end = int(round(float(end_ms) * self.sample_rate / 1000.0))
            T = min(T, fbank_frames(max(0, end), self.sample_rate, self.audio_model.config.frame_length_ms,
                                    self.audio_model.config.frame_shift_ms))
        return T

    def _encode(self, T: int) -> torch.Tensor:
        if T == self._cache_T and self._cache is not None:
            self.stats["cache_hits"] += 1
            return self._cache
        feats = self.features[:T]
        t0 = time.perf_counter()
        out = self.audio_model.encode_features(feats)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.stats["encoder_ms"] += (time.perf_counter() - t0) * 1000.0
        self.stats["encoder_runs"] += 1
        self._cache_T, self._cache = T, out
        return out

    @staticmethod
    def min_frames() -> int:
        """Fewest fbank frames the encoder accepts (one subsampled frame)."""
        return 7

    def encode_partial(self, end_ms: Optional[float] = None) -> Optional[torch.Tensor]:
        """Encode the frames so far (or those within the first `end_ms`); cached by frame count.
        Returns [T_llm, hidden], or None while the audio is too short to encode (< 7 frames)."""
        T = self._frames_for(end_ms)
        if T < self.min_frames():
            return None
        return self._encode(T)

    def finish(self, end_ms: Optional[float] = None) -> torch.Tensor:
        """Features of the whole utterance (or its first `end_ms`) as [T_llm, hidden]; reuses the
        cache when no new frames arrived since the last encode. Raises ValueError if too short."""
        T = self._frames_for(end_ms)
        if T < self.min_frames():
            raise ValueError(f"IncrementalAudioFrontend.finish: utterance too short to encode "
                             f"({self._n} samples = {T} fbank frames; the encoder needs >= {self.min_frames()} frames, ~85 ms)")
        return self._encode(T)


def fbank_many(frontends: Sequence[IncrementalAudioFrontend]) -> None:
    """`fe.compute()` for several streams with ONE fbank call: each stream's pending window is padded
    to a whole number of hops and the windows are concatenated, so every frame of every stream starts
    at a hop boundary of the concatenation (Kaldi frames depend only on their own samples); the two
    frames that straddle each seam are dropped. Same features as each stream alone (float rounding).
    Streams on different audio models are computed alone."""
    work = [(fe,) + fe._pending_window() for fe in frontends]
    work = [w for w in work if w[2]]
    if not work:
        return
    am = work[0][0].audio_model
    alone = [w for w in work if w[0].audio_model is not am]
    work = [w for w in work if w[0].audio_model is am]
    for fe, _, _ in alone:
        fe.compute()
    if len(work) == 1:
        work[0][0].compute()
        return
    hop = work[0][0].hop
    parts, starts, pos = [], [], 0
    for fe, seg, n in work:
        padded = -(-seg.shape[0] // hop) * hop  # whole hops: the next window starts hop-aligned
        parts += [seg, np.zeros(padded - seg.shape[0], np.float32)]
        starts.append(pos // hop)
        pos += padded
    t0 = time.perf_counter()
    f = am.fbank(np.concatenate(parts))
    ms = (time.perf_counter() - t0) * 1000.0
    total = sum(n for _, _, n in work)
    for (fe, _, n), s in zip(work, starts):
        fe._add_frames(f[s:s + n], ms * n / total)

"""Streaming end-of-turn detection with the real Silero VAD (spec §6, `wakeup_and_vad.py`).

Reference behaviour (VITA-1.5 real-time demo): Silero VAD, speech when p >= 0.7, silence when
p < 0.7 - 0.15, end of turn after 500 ms of silence, utterances shorter than 1 s ignored, 30 ms
speech padding. On top of that the engine gets an early hint, `SpeculativeEnd`, after a shorter
pause (200 ms) so it can encode/prefill while the end-of-turn timer runs; `SpeechResumed` retracts
it.

Events (dataclasses; `t_ms` is always the stream time at which the detector decided, i.e. the end of
the 512-sample frame that triggered the event, in ms of 16 kHz input since the stream started /
`reset()`):
  SpeechStart(t_ms, speech_start_ms)           p >= threshold after silence
  SpeculativeEnd(t_ms, speech_start_ms, speech_end_ms)
                                               silence >= speculative_silence_ms after
                                               >= min_speech_ms of speech
  SpeechResumed(t_ms)                          speech again after a SpeculativeEnd: discard the
                                               speculative work
  TurnEnd(t_ms, speech_start_ms, speech_end_ms)
                                               silence >= min_silence_ms after >= min_speech_ms
  SpeechDiscarded(t_ms, speech_start_ms, speech_end_ms)
                                               silence >= min_silence_ms after < min_speech_ms of
                                               speech (a blip / cough): no turn; the next
                                               SpeechStart begins a new utterance
`speech_start_ms`/`speech_end_ms` include `speech_pad_ms` of padding on each side (clamped to the
stream). Without an intervening SpeechResumed, a TurnEnd's `speech_end_ms` equals the preceding
SpeculativeEnd's, so audio cut at that point can be encoded speculatively and reused.

Model sharing: the Silero JIT module keeps its recurrent state in module attributes, so instead of
calling it we call its stateless inner network `_model(x_with_context, state) -> (prob, state)`
over each push's complete 512-sample frames (STFT + encoder batched, LSTM decoder per
frame). The module is loaded once per process (thread-safe) and shared by all
streams; each `StreamingVAD` holds only its own 64-sample context and [2, 1, 128] state. The probabilities
match the stateful wrapper (`model(x, 16000)` after `reset_states()`) to ~1e-6.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

__all__ = ["VADConfig", "StreamingVAD", "push_many", "VADEvent", "SpeechStart", "SpeculativeEnd", "SpeechResumed",
           "TurnEnd", "SpeechDiscarded", "load_vad_model", "VAD_SAMPLE_RATE"]

VAD_SAMPLE_RATE = 16000


@dataclass
class VADConfig:
    threshold: float = 0.7               # speech when p >= threshold (reference VADIterator)
    neg_threshold: Optional[float] = None  # silence when p < neg_threshold; None -> threshold - 0.15
    min_silence_ms: int = 500            # end of turn after this much silence
    min_speech_ms: int = 1000            # utterances shorter than this are ignored
    speculative_silence_ms: int = 200    # early pause at which the engine may start speculatively
    speech_pad_ms: int = 30              # padding added to reported speech start/end
    frame_samples: int = 512             # Silero window at 16 kHz
    sample_rate: int = VAD_SAMPLE_RATE
    history_frames: int = 30000          # probabilities kept for debugging (~16 min)

    def __post_init__(self):
        if self.sample_rate != VAD_SAMPLE_RATE:
            raise ValueError(f"VADConfig.sample_rate must be {VAD_SAMPLE_RATE} (resample input first), got {self.sample_rate}")
        if not (0.0 < self.threshold < 1.0):
            raise ValueError(f"VADConfig.threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is None:
            self.neg_threshold = max(0.01, self.threshold - 0.15)
        if not (0.0 < self.neg_threshold <= self.threshold):
            raise ValueError(f"VADConfig.neg_threshold must be in (0, threshold], got {self.neg_threshold}")
        if int(self.frame_samples) != self.frame_samples or self.frame_samples < 256:
            raise ValueError(f"VADConfig.frame_samples must be an integer >= 256 (Silero uses 512), got {self.frame_samples}")
        for k in ("min_silence_ms", "min_speech_ms", "speculative_silence_ms", "speech_pad_ms"):
            if getattr(self, k) < 0:
                raise ValueError(f"VADConfig.{k} must be >= 0, got {getattr(self, k)}")
        if self.speculative_silence_ms > self.min_silence_ms:
            raise ValueError(f"VADConfig.speculative_silence_ms ({self.speculative_silence_ms}) must not exceed "
                             f"min_silence_ms ({self.min_silence_ms})")


@dataclass
class SpeechStart:
    t_ms: float
    speech_start_ms: float = 0.0


@dataclass
class SpeculativeEnd:
    t_ms: float
    speech_start_ms: float = 0.0
    speech_end_ms: float = 0.0


@dataclass
class SpeechResumed:
    t_ms: float


@dataclass
class TurnEnd:
    t_ms: float
    speech_start_ms: float
    speech_end_ms: float


@dataclass
class SpeechDiscarded:
    t_ms: float
    speech_start_ms: float
    speech_end_ms: float


VADEvent = Union[SpeechStart, SpeculativeEnd, SpeechResumed, TurnEnd, SpeechDiscarded]

_MODEL = None
_MODEL_LOCK = threading.Lock()


def load_vad_model():
    """The process-wide Silero VAD JIT module (loaded once, thread-safe). Importing `silero_vad`
    calls `torch.set_num_threads(1)`; the caller's thread count is restored."""
    global _MODEL
    if _MODEL is None:
        with _MODEL_LOCK:
            if _MODEL is None:
                import torch

                n = torch.get_num_threads()
                try:
                    from silero_vad import load_silero_vad
                finally:
                    torch.set_num_threads(n)
                m = load_silero_vad()
                m.eval()
                _MODEL = m
    return _MODEL


class StreamingVAD:
    """Per-stream VAD state machine over 16 kHz float32 mono audio; see the module docstring.

    `push(x16k)` accepts any number of samples and returns the events decided by the complete
    512-sample frames now available (the remainder is buffered). `model` may be a Silero JIT module
    (default: the shared one) or any callable `(frame[1, n] float32 tensor) -> probability`.
    """

    def __init__(self, config: Optional[VADConfig] = None, model=None):
        self.config = config if config is not None else VADConfig()
        self._model = model if model is not None else load_vad_model()
        inner = getattr(self._model, "_model", None)
        self._inner = inner if inner is not None and hasattr(inner, "context_size_samples") else None
        self._ctx_size = int(self._inner.context_size_samples) if self._inner is not None else 0
        self._probs = deque(maxlen=self.config.history_frames)
        self.reset()

    # ---- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new stream: clear the model state, buffered samples, history and timers."""
        import torch

        self._buf = np.zeros(0, np.float32)
        self._state = torch.zeros(2, 1, 128)
        self._context = torch.zeros(1, self._ctx_size)
        if self._inner is None and hasattr(self._model, "reset_states"):
            self._model.reset_states()
        self._probs.clear()
        self._frames = 0            # frames processed
        self._triggered = False
        self._onset = 0             # sample index where speech started (unpadded)
        self._silence_start = None  # sample index of the first silent frame of the current pause
        self._speculated = False

    @property
    def is_speaking(self) -> bool:
        """True from SpeechStart until the utterance ends (TurnEnd / SpeechDiscarded), pauses included."""
        return self._triggered

    @property
    def in_pause(self) -> bool:
        """True while speaking and the current frames are silent (a pause that may end the turn)."""
        return self._triggered and self._silence_start is not None

    @property
    def probabilities(self) -> List[float]:
        """Speech probability of each processed frame (most recent `history_frames`)."""
        return list(self._probs)

    @property
    def samples_consumed(self) -> int:
        return self._frames * self.config.frame_samples

    @property
    def t_ms(self) -> float:
        """Stream time of the end of the last processed frame."""
        return self._ms(self.samples_consumed)

    def _ms(self, samples: int) -> float:
        return samples * 1000.0 / self.config.sample_rate

    # ---- model ---------------------------------------------------------------------------------
    def _probs_for(self, frames: np.ndarray) -> List[float]:
        """Speech probabilities of consecutive frames [n, frame_samples]. With the Silero JIT module
        the STFT + conv encoder runs batched over the n frames (each with its 64-sample left
        context) and only the LSTM decoder steps frame by frame (same values as one-frame calls
        to ~1e-6)."""
        import torch

        x = torch.from_numpy(frames)
        out: List[float] = []
        with torch.inference_mode():
            if self._inner is None:
                for i in range(x.shape[0]):
                    out.append(float(self._model(x[i:i + 1], self.config.sample_rate).reshape(-1)[0]))
                return out
            n, fs = x.shape
            flat = torch.cat([self._context.reshape(-1), x.reshape(-1)])
            cs = self._ctx_size
            xc = flat.unfold(0, fs + cs, fs)  # [n, cs + fs]: frame i with its left context
            inner = self._inner
            feats = inner.encoder(inner.run_extractors(xc))
            st = self._state
            for i in range(n):
                o, st = inner.decoder(feats[i:i + 1], st)
                out.append(float(o.reshape(-1).mean()))
            self._state = st
            self._context = flat[-cs:].reshape(1, cs).clone()
        return out

    # ---- streaming -----------------------------------------------------------------------------
    def push(self, x16k) -> list:
        """Feed 16 kHz float32 mono samples (any count); returns the list of new VADEvents."""
        frames = self._take_frames(x16k)
        return self._decide(self._probs_for(frames) if frames.shape[0] else [])

    def _take_frames(self, x16k) -> np.ndarray:
        """Validate, buffer, and return the complete frames now available [n, frame_samples]."""
        x = np.asarray(x16k)
        if x.ndim != 1:
            raise ValueError(f"StreamingVAD.push: expected 1-D 16 kHz mono samples, got shape {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"StreamingVAD.push: expected float samples in [-1, 1], got {x.dtype} "
                            f"(convert with runtime.audio_in.to_float32_mono)")
        x = x.astype(np.float32, copy=False)
        buf = np.concatenate([self._buf, x]) if self._buf.size else x
        fs = self.config.frame_samples
        n = buf.shape[0] // fs
        self._buf = buf[n * fs:].copy()
        return np.ascontiguousarray(buf[: n * fs]).reshape(n, fs)

    def _decide(self, probs) -> list:
        events: list = []
        for p in probs:
            self._step(p, events)
        return events

    def _step(self, p: float, events: list) -> None:
        c = self.config
        self._probs.append(p)
        start = self._frames * c.frame_samples
        self._frames += 1
        end = self._frames * c.frame_samples
        pad = int(round(c.speech_pad_ms * c.sample_rate / 1000.0))
        now = self._ms(end)

        if not self._triggered:
            if p >= c.threshold:
                self._triggered = True
                self._onset = start
                self._silence_start = None
                self._speculated = False
                events.append(SpeechStart(now, self._ms(max(0, start - pad))))
            return

        if p >= c.threshold:
            if self._silence_start is not None:
                self._silence_start = None
                if self._speculated:
                    self._speculated = False
                    events.append(SpeechResumed(now))
            return
        if p < c.neg_threshold and self._silence_start is None:
            self._silence_start = start
        if self._silence_start is None:
            return  # between the thresholds while speaking: still speech

        silence_ms = self._ms(end - self._silence_start)
        speech_ms = self._ms(self._silence_start - self._onset)
        s_ms = self._ms(max(0, self._onset - pad))
        e_ms = self._ms(min(end, self._silence_start + pad))
        if silence_ms >= c.min_silence_ms:
            self._triggered = False
            self._silence_start = None
            self._speculated = False
            if speech_ms >= c.min_speech_ms:
                events.append(TurnEnd(now, s_ms, e_ms))
            else:
                events.append(SpeechDiscarded(now, s_ms, e_ms))
        elif not self._speculated and silence_ms >= c.speculative_silence_ms and speech_ms >= c.min_speech_ms:
            self._speculated = True
            events.append(SpeculativeEnd(now, s_ms, e_ms))


def push_many(vads: Sequence[StreamingVAD], chunks: Sequence) -> List[list]:
    """`[v.push(x) for v, x in zip(vads, chunks)]`, batched across the streams: streams on the shared
    Silero module get ONE STFT + encoder call over every complete frame of every stream and one LSTM
    step per frame index with the streams stacked (state [2, streams, 128]), so the scheduler's VAD
    cost per tick does not grow by a model call per session. The probabilities equal each stream's own
    `push` to float rounding (~1e-7); streams on other models fall back to their own `push`."""
    import torch

    if len(vads) != len(chunks):
        raise ValueError(f"push_many: {len(vads)} VAD streams but {len(chunks)} chunks")
    frames = [v._take_frames(x) for v, x in zip(vads, chunks)]
    probs: List[List[float]] = [[] for _ in vads]
    batch = [i for i, v in enumerate(vads) if frames[i].shape[0] and v._inner is not None and v._inner is vads[0]._inner]
    for i, v in enumerate(vads):
        if frames[i].shape[0] and i not in batch:
            probs[i] = v._probs_for(frames[i])
    if batch:
        inner = vads[batch[0]]._inner
        cs = vads[batch[0]]._ctx_size
        rows, offs = [], []
        for i in batch:
            v, fr = vads[i], torch.from_numpy(frames[i])
            n, fs = fr.shape
            flat = torch.cat([v._context.reshape(-1), fr.reshape(-1)])
            offs.append(sum(r.shape[0] for r in rows))
            rows.append(flat.unfold(0, fs + cs, fs))  # frame j with its left context
            v._context = flat[-cs:].reshape(1, cs).clone()
        with torch.inference_mode():
            feats = inner.encoder(inner.run_extractors(torch.cat(rows, 0)))
            for j in range(max(frames[i].shape[0] for i in batch)):
                live = [k for k, i in enumerate(batch) if frames[i].shape[0] > j]
                idx = torch.tensor([offs[k] + j for k in live])
                state = torch.cat([vads[batch[k]]._state for k in live], 1)
                o, state = inner.decoder(feats.index_select(0, idx), state)
                p = o.reshape(len(live), -1).mean(1).tolist()
                for r, k in enumerate(live):
                    vads[batch[k]]._state = state[:, r:r + 1].clone()
                    probs[batch[k]].append(p[r])
    return [v._decide(p) for v, p in zip(vads, probs)]

"""TEMPORARY shims for interfaces other branches are writing in parallel (audio, tts, codec).

Each name is imported from its real home when that module exists; otherwise a small stand-in with
the same interface is used. Delete the stand-ins once `audio`, `tts` and `codec` are merged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

# ---- audio in ------------------------------------------------------------------------------------
try:
    from .audio_in import Resampler, to_float32_mono  # noqa: F401
except ImportError:  # pragma: no cover - replaced by the audio branch
    MAX_SECONDS = 600.0

    def to_float32_mono(pcm, *, sample_rate, name: str = "pcm", max_seconds: float = 120.0) -> np.ndarray:
        if isinstance(pcm, torch.Tensor):
            pcm = pcm.detach().cpu().numpy()
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            pcm = np.frombuffer(pcm, dtype="<i2")
        if not isinstance(pcm, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array (int16 or float32), got {type(pcm).__name__}")
        if not isinstance(sample_rate, (int, np.integer)) or not (1000 <= int(sample_rate) <= 384000):
            raise ValueError(f"{name}: sample_rate must be an int in [1000, 384000], got {sample_rate!r}")
        if pcm.dtype == np.int16:
            x = pcm.astype(np.float32) / 32768.0
        elif pcm.dtype in (np.float32, np.float64):
            x = pcm.astype(np.float32, copy=False)
        else:
            raise TypeError(f"{name}: dtype must be int16 or float32, got {pcm.dtype}")
        if x.ndim == 2:
            x = x.mean(axis=1 if x.shape[1] <= 8 else 0).astype(np.float32)
        if x.ndim != 1:
            raise ValueError(f"{name}: expected 1-D mono (or [n, channels]), got shape {list(x.shape)}")
        if x.size == 0:
            raise ValueError(f"{name}: empty audio chunk")
        if x.size > max_seconds * sample_rate:
            raise ValueError(f"{name}: chunk of {x.size / sample_rate:.1f} s exceeds the {max_seconds:.0f} s limit per push")
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: audio contains NaN or Inf")
        return np.clip(x, -1.0, 1.0)

    class Resampler:
        def __init__(self, in_rate: int, out_rate: int = 16000):
            import soxr

            self.in_rate, self.out_rate = int(in_rate), int(out_rate)
            self._r = None if self.in_rate == self.out_rate else soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32")

        def process(self, x) -> np.ndarray:
            x = np.asarray(x, dtype=np.float32)
            return x.copy() if self._r is None else self._r.resample_chunk(x)

        def flush(self) -> np.ndarray:
            return np.zeros(0, np.float32) if self._r is None else self._r.resample_chunk(np.zeros(0, np.float32), last=True)

# ---- VAD -----------------------------------------------------------------------------------------
try:
    from .vad import SpeculativeEnd, SpeechResumed, SpeechStart, StreamingVAD, TurnEnd, VADConfig  # noqa: F401
    try:
        from .vad import SpeechDiscarded  # noqa: F401
    except ImportError:  # pragma: no cover
        @dataclass
        class SpeechDiscarded:
            t_ms: float
            speech_start_ms: float = 0.0
            speech_end_ms: float = 0.0
except ImportError:  # pragma: no cover - replaced by the audio branch
    @dataclass
    class VADConfig:
        threshold: float = 0.7
        min_silence_ms: int = 500
        min_speech_ms: int = 1000
        speculative_silence_ms: int = 200
        frame_samples: int = 512
        speech_pad_ms: int = 30

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
        speech_start_ms: float = 0.0
        speech_end_ms: float = 0.0

    class StreamingVAD:
        """Energy-based stand-in with the Silero VAD's event semantics (frame RMS > -40 dBFS = voiced)."""

        def __init__(self, config: Optional[VADConfig] = None):
            self.config = config or VADConfig()
            self.reset()

        def reset(self):
            self._buf = np.zeros(0, np.float32)
            self._n = 0
            self.is_speaking = False
            self._start = self._last_voiced = 0.0
            self._spec = False

        def push(self, x16k) -> list:
            c = self.config
            self._buf = np.concatenate([self._buf, np.asarray(x16k, np.float32)])
            ev, F = [], c.frame_samples
            while self._buf.size >= F:
                fr, self._buf = self._buf[:F], self._buf[F:]
                t0 = self._n * 1000.0 / 16000
                self._n += F
                t1 = self._n * 1000.0 / 16000
                voiced = float(np.sqrt(np.mean(fr * fr))) > 0.01
                if not self.is_speaking:
                    if voiced:
                        self.is_speaking, self._start, self._last_voiced, self._spec = True, t0, t1, False
                        ev.append(SpeechStart(t0, t0))
                    continue
                if voiced:
                    if self._spec:
                        ev.append(SpeechResumed(t1))
                        self._spec = False
                    self._last_voiced = t1
                    continue
                sil = t1 - self._last_voiced
                long_enough = self._last_voiced - self._start >= c.min_speech_ms
                if not self._spec and sil >= c.speculative_silence_ms and long_enough:
                    self._spec = True
                    ev.append(SpeculativeEnd(t1, self._start, self._last_voiced))
                if sil >= c.min_silence_ms:
                    self.is_speaking = False
                    cls = TurnEnd if long_enough else SpeechDiscarded
                    ev.append(cls(t1, self._start, self._last_voiced))
            return ev

# ---- incremental audio frontend ------------------------------------------------------------------
try:
    from .frontend import IncrementalAudioFrontend  # noqa: F401
except ImportError:  # pragma: no cover - replaced by the audio branch
    import time

    class IncrementalAudioFrontend:
        def __init__(self, audio_model):
            self.audio_model = audio_model
            self.reset()

        def reset(self):
            self._chunks: List[np.ndarray] = []
            self._cache = (None, None)
            self.stats = {"fbank_ms": 0.0, "encoder_ms": 0.0}

        def push(self, x16k) -> int:
            self._chunks.append(np.asarray(x16k, np.float32))
            return 0

        def encode_partial(self, end_ms=None):
            try:
                return self.finish(end_ms)
            except ValueError:
                return None

        def finish(self, end_ms=None) -> torch.Tensor:
            x = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            if end_ms is not None:
                x = x[: max(0, int(round(end_ms * 16)))]
            if self._cache[0] == x.size:
                return self._cache[1]
            if x.size < 1520:
                raise ValueError(f"utterance too short to encode ({x.size} samples)")
            t0 = time.perf_counter()
            f = self.audio_model.fbank(x)
            t1 = time.perf_counter()
            out = self.audio_model.encode_features(f)
            self.stats["fbank_ms"] += (t1 - t0) * 1e3
            self.stats["encoder_ms"] += (time.perf_counter() - t1) * 1e3
            self._cache = (x.size, out)
            return out

# ---- samples -------------------------------------------------------------------------------------
try:
    from ..data import load_sample  # noqa: F401
except ImportError:  # pragma: no cover - replaced by the audio branch
    def load_sample(name: str):
        """Synthetic 'speech': a voiced harmonic signal with syllable-rate modulation (16 kHz)."""
        dur = {"hello": 2.2, "hello.wav": 2.2, "question": 2.8, "question.wav": 2.8}.get(name)
        if dur is None:
            raise FileNotFoundError(f"no bundled audio sample {name!r}; available: hello, question")
        sr = 16000
        t = np.arange(int(dur * sr)) / sr
        f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
        ph = 2 * np.pi * np.cumsum(f0) / sr
        x = sum(np.sin(k * ph) / k for k in range(1, 6))
        env = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
        rng = np.random.default_rng(0)
        x = 0.2 * env * x / 2 + 0.01 * rng.standard_normal(t.size)
        return x.astype(np.float32), sr

# ---- TTS batch decoder -----------------------------------------------------------------------------
try:
    from ..model.tts_batch import TTSBatchDecoder, TTSCapacityError  # noqa: F401
except ImportError:  # pragma: no cover - replaced by the tts branch
    class TTSCapacityError(RuntimeError):
        pass

    class TTSBatchDecoder:
        """Unbatched stand-in: per-stream SequenceKV, one ar_step per stream per step()."""

        def __init__(self, tts, *, max_streams=64, block_size=16, num_blocks=None, max_tokens=None):
            self.tts = tts
            self.max_streams = max_streams
            self.max_tokens = int(max_tokens or tts.config.max_tokens)
            per = -(-(tts.split * 64 + 2 + self.max_tokens) // block_size)
            self.cache = tts.new_cache(max_streams * per * block_size, block_size)
            self._s: Dict[int, dict] = {}
            self._next = 0

        @property
        def free_blocks(self):
            return len(self.cache.free)

        def active(self):
            return [k for k, s in self._s.items() if not s["done"]]

        @torch.inference_mode()
        def start(self, text_ids, *, seed: int) -> int:
            if len(self._s) >= self.max_streams:
                raise TTSCapacityError("no free TTS stream slot")
            seq = self.cache.new_sequence()
            self.tts.ar_prefill(seq, self.tts.nar(text_ids))
            sid = self._next
            self._next += 1
            self._s[sid] = dict(seq=seq, last=self.tts.sos, seed=int(seed), n=0, tokens=[], done=False)
            return sid

        @torch.inference_mode()
        def step(self, sids=None):
            from .. import ops

            out = {}
            for sid in (self.active() if sids is None else list(sids)):
                s = self._s[sid]
                if s["done"] or len(s["tokens"]) >= self.max_tokens:
                    self._fin(s)
                    out[sid] = None
                    continue
                lg = self.tts.ar_step(s["seq"], [s["last"]])[-1:].float()
                lg[:, [self.tts.bos, self.tts.sos, self.tts.pad]] = float("-inf")
                t = int(ops.sample_tokens(lg, temperature=1.0, top_k=self.tts.config.topk, seed=s["seed"], step=s["n"])[0])
                s["n"] += 1
                s["last"] = t
                if t == self.tts.eos:
                    self._fin(s)
                    out[sid] = None
                else:
                    s["tokens"].append(t)
                    out[sid] = t
            return out

        def _fin(self, s):
            s["done"] = True
            s["seq"].release()

        def finished(self, sid):
            return self._s[sid]["done"]

        def tokens(self, sid):
            return list(self._s[sid]["tokens"])

        def release(self, sid):
            s = self._s.pop(sid, None)
            if s is not None and not s["done"]:
                self._fin(s)

# ---- text segmenter ------------------------------------------------------------------------------
try:
    from .text_segmenter import TextSegmenter, normalize_tts_text  # noqa: F401
except ImportError:  # pragma: no cover - replaced by the tts branch
    _SPECIAL = re.compile(r"<\|[^|]*\|>")

    def normalize_tts_text(text: str) -> str:
        return _SPECIAL.sub("", text).replace("☞", "").lower().strip()

    class TextSegmenter:
        """Split at , . ? ! newline (and CJK forms) once >= min_chars are buffered."""

        _P = set(",，.。?？!！、\n")

        def __init__(self, min_chars: int = 5, first_min_chars: int = 5):
            self.min_chars = min_chars
            self.buf = ""

        def push(self, piece: str) -> List[str]:
            out = []
            for ch in piece:
                self.buf += ch
                if ch in self._P and len(self.buf.strip()) >= self.min_chars:
                    out.append(self.buf)
                    self.buf = ""
            return out

        def flush(self) -> List[str]:
            b, self.buf = self.buf, ""
            return [b] if b.strip() else []

# ---- codec ---------------------------------------------------------------------------------------
def load_codec_fallback(model_path):  # pragma: no cover - replaced by the codec branch
    """A reference (F.conv) TiCodec when `vita_engine.model.codec` is missing; re-decodes on push."""
    import json
    from pathlib import Path

    import torch.nn.functional as F

    from ..model.loading import codec_state_dict

    cd = Path(model_path) / "vita_tts_ckpt" / "codec"
    if not cd.is_dir():
        return None
    cfg = json.loads((cd / "model.json").read_text())
    sd = codec_state_dict(cd)

    class _Stream:
        def __init__(self, codec):
            self.codec, self.toks, self.emitted = codec, [], 0

        def push(self, tokens):
            self.toks += [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
            n = max(0, len(self.toks) - self.codec.lookahead_tokens) * self.codec.hop_length
            return self._take(n)

        def flush(self):
            return self._take(len(self.toks) * self.codec.hop_length)

        def _take(self, n):
            if n <= self.emitted:
                return torch.zeros(0)
            y = self.codec.decode(self.toks)[self.emitted:n]
            self.emitted = n
            return y

    class _Codec:
        sample_rate = int(cfg.get("sampling_rate", 24000))
        lookahead_tokens = 4

        def __init__(self):
            self.rates, self.ks = cfg["upsample_rates"], cfg["upsample_kernel_sizes"]
            self.hop_length = int(np.prod(self.rates))
            G = cfg["global_code_num"]
            self.gvec = torch.cat([sd[f"quantizer.quantizer_modules_globaltokens.{j}.embedding.weight"][cfg["global_tokens"][j]] for j in range(G)])

        @torch.no_grad()
        def decode(self, tokens):
            t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
            if t.numel() == 0:
                return torch.zeros(0)
            g = lambda k: sd["generator." + k]
            x = sd["quantizer.quantizer_modules.0.embedding.weight"][t].T[None].float()
            x = F.conv1d(x, g("conv_pre.weight"), g("conv_pre.bias"), padding=3)
            nk = len(cfg["resblock_kernel_sizes"])
            for i, (u, k) in enumerate(zip(self.rates, self.ks)):
                x = F.conv_transpose1d(F.leaky_relu(x, 0.1), g(f"ups.{i}.weight"), g(f"ups.{i}.bias"), stride=u, padding=(k - u) // 2)
                xs = None
                for j, (rk, ds) in enumerate(zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])):
                    r, h = f"resblocks.{i * nk + j}", x
                    for m, d in enumerate(ds):
                        y = F.conv1d(F.leaky_relu(h, 0.1), g(f"{r}.convs1.{m}.weight"), g(f"{r}.convs1.{m}.bias"), padding=d * (rk - 1) // 2, dilation=d)
                        h = h + F.conv1d(F.leaky_relu(y, 0.1), g(f"{r}.convs2.{m}.weight"), g(f"{r}.convs2.{m}.bias"), padding=(rk - 1) // 2)
                    xs = h if xs is None else xs + h
                x = xs / nk
                if x.shape[-2] == self.gvec.numel():
                    x = x + self.gvec[None, :, None]
            x = F.conv1d(F.leaky_relu(x, 0.01), g("conv_post.weight"), g("conv_post.bias"), padding=3)
            return torch.tanh(x)[0, 0]

        def stream(self, batch=1):
            return _Stream(self)

        def push_many(self, streams, token_lists):
            return [s.push(t) for s, t in zip(streams, token_lists)]

    return _Codec()

"""Audio path: Kaldi fbank (80 bins, 25/10 ms, povey, preemphasis 0.97, dither 0) + global CMVN,
the whale encoder (Conv2dSubsampling4, 24-layer rel-PE transformer) and the CNN adapter
(spec §4, §9.3-5, §11.1, §11.4)."""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ._ops import OpsHandle
from .config import AudioConfig

__all__ = ["AudioEncoder", "kaldi_fbank", "mel_banks", "AE_PREFIX", "fbank_frames", "llm_tokens_for_frames", "static_chunk_mask"]

AE_PREFIX = "model.audio_encoder."
ENC = AE_PREFIX + "encoder."
CMVN_KEYS = (ENC + "global_cmvn.mean", ENC + "global_cmvn.istd")


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_banks(num_bins: int = 80, padded: int = 512, sample_rate: float = 16000.0, low: float = 20.0, high: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel filterbank [num_bins, padded/2 + 1] (last column zero), float64."""
    nfft = padded // 2
    nyq = 0.5 * sample_rate
    if high <= 0.0:
        high += nyq
    width = sample_rate / padded
    lo, hi = _mel(low), _mel(high)
    delta = (hi - lo) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    mel = _mel(width * np.arange(nfft))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    return torch.from_numpy(np.pad(banks, ((0, 0), (0, 1))))


def fbank_frames(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> int:
    wl = int(sample_rate * frame_length_ms * 0.001)
    ws = int(sample_rate * frame_shift_ms * 0.001)
    return 0 if num_samples < wl else 1 + (num_samples - wl) // ws


def llm_tokens_for_frames(T: int) -> int:
    """T fbank frames -> T_llm = ((T1 - 1)//2) + 1 with T1 = ((T - 1)//2 - 1)//2."""
    t1 = ((T - 1) // 2 - 1) // 2
    return (t1 - 1) // 2 + 1


_BANK_CACHE: Dict[tuple, torch.Tensor] = {}


def kaldi_fbank(wave, sample_rate: int = 16000, num_mel_bins: int = 80, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, preemphasis: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0) -> torch.Tensor:
    """torchaudio.compliance.kaldi.fbank semantics (snip_edges, remove DC, povey window, power
    spectrum, log mel with float32-eps floor, dither 0) on an already-scaled waveform -> float32
    [frames, num_mel_bins]. Computed in float64."""
    w = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave).to(torch.float64).reshape(-1).cpu()
    wl = int(sample_rate * frame_length_ms * 0.001)
    ws = int(sample_rate * frame_shift_ms * 0.001)
    padded = 1 << (wl - 1).bit_length()
    m = fbank_frames(w.numel(), sample_rate, frame_length_ms, frame_shift_ms)
    if m == 0:
        return torch.zeros(0, num_mel_bins, dtype=torch.float32)
    fr = w.unfold(0, wl, ws)[:m]
    fr = fr - fr.mean(1, keepdim=True)
    fr = fr - preemphasis * torch.cat([fr[:, :1], fr[:, :-1]], 1)
    win = torch.hann_window(wl, periodic=False, dtype=torch.float64).pow(0.85)
    fr = F.pad(fr * win, (0, padded - wl))
    spec = torch.fft.rfft(fr).abs().pow(2)
    key = (num_mel_bins, padded, float(sample_rate), low_freq, high_freq)
    if key not in _BANK_CACHE:
        _BANK_CACHE[key] = mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq)
    mel = spec @ _BANK_CACHE[key].T
    eps = float(torch.finfo(torch.float32).eps)
    return mel.clamp(min=eps).log().to(torch.float32)


def rel_pe(T: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Absolute sinusoid table PE[0:T] (sin on even dims, cos on odd), base 10000."""
    pos = torch.arange(T, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.to(device=device, dtype=dtype)


def static_chunk_mask(T: int, chunk: int, left_chunks: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive [T, T] mask of whale's `subsequent_chunk_mask`: frame i sees frames from
    max((i//chunk - left_chunks)*chunk, 0) (0 when left_chunks < 0) up to the end of its own chunk."""
    i = torch.arange(T, device=device)
    blk = i // chunk
    start = torch.zeros_like(i) if left_chunks < 0 else ((blk - left_chunks) * chunk).clamp(min=0)
    end = ((blk + 1) * chunk).clamp(max=T)
    ok = (i[None, :] >= start[:, None]) & (i[None, :] < end[:, None])
    return torch.zeros(T, T, device=device, dtype=dtype).masked_fill(~ok, float("-inf"))


@dataclass
class _EncLayer:
    t: Dict[str, torch.Tensor]


class AudioEncoder:
    """`fbank(wave)` -> [frames, 80] after CMVN; `encode(wave)` -> [T_llm, llm_hidden]."""

    def __init__(self, config: AudioConfig, tensors: Dict[str, torch.Tensor], ops: OpsHandle, cmvn=None):
        self.config, self.ops = config, ops
        t = dict(tensors)
        if CMVN_KEYS[0] in t:
            self.cmvn_mean, self.cmvn_istd = t.pop(CMVN_KEYS[0]), t.pop(CMVN_KEYS[1])
        else:
            self.cmvn_mean, self.cmvn_istd = cmvn
        self.t = t
        self.num_layers = len({int(m.group(1)) for k in t if (m := re.match(re.escape(ENC) + r"enc\.1\.encoders\.(\d+)\.", k))})
        w = self.t[ENC + "enc.1.encoders.0.self_attn.pos_bias_u"] if self.num_layers else None
        self.num_heads = int(w.shape[0]) if w is not None else config.num_heads
        self.d_model = int(self.t[ENC + "enc.0.core.out.0.weight"].shape[0])
        self.device = self.t[ENC + "enc.0.core.out.0.weight"].device
        self.dtype = self.t[ENC + "enc.0.core.out.0.weight"].dtype
        # whale Transformer.forward: dynamic chunks draw a RANDOM chunk size per call (even at
        # inference), which no engine can reproduce: full context then, as the VITA vLLM port
        # (whale.py) always uses. A static chunk size is deterministic and is applied as VITA does.
        self.chunk_size = -1
        if config.dynamic_chunks:
            warnings.warn(
                "audio encoder train.yaml asks for dynamic chunk masks (transformer-dynamic-chunks, random "
                "chunk sizes in VITA); the engine encodes utterances with full context, as the VITA vLLM port does",
                stacklevel=2)
        elif config.chunk_size > 0:
            self.chunk_size = int(config.chunk_size)
        self.left_chunks = int(config.left_chunks)

    # ---- shapes ------------------------------------------------------------------------------------
    @staticmethod
    def expected_shapes(ckpt_shapes: Dict[str, tuple], c: AudioConfig, llm_hidden: int, num_layers: Optional[int] = None) -> dict:
        """Expected tensors, with sizes anchored on a few stored shapes (d_model, conv channels,
        FFN width, adapter width) and checked for consistency everywhere else."""
        def dim(key, i, default):
            s = ckpt_shapes.get(key)
            return int(s[i]) if s is not None and len(s) > i else default

        ch = dim(ENC + "enc.0.core.conv.0.weight", 0, 1024)
        d = dim(ENC + "enc.0.core.out.0.weight", 0, 1024)
        ff = dim(ENC + "enc.1.encoders.0.feed_forward.w_1.weight", 0, 4 * d)
        c2 = dim(AE_PREFIX + "adpter.conv1d2.weight", 0, 2 * d)
        H = dim(ENC + "enc.1.encoders.0.self_attn.pos_bias_u", 0, c.num_heads)
        if num_layers is None:
            num_layers = len({int(m.group(1)) for k in ckpt_shapes if (m := re.match(re.escape(ENC) + r"enc\.1\.encoders\.(\d+)\.", k))})
        nb = c.num_mel_bins
        fsub = ((nb - 1) // 2 - 1) // 2
        e = {
            ENC + "enc.0.core.conv.0.weight": (ch, 1, 3, 3), ENC + "enc.0.core.conv.0.bias": (ch,),
            ENC + "enc.0.core.conv.2.weight": (ch, ch, 3, 3), ENC + "enc.0.core.conv.2.bias": (ch,),
            ENC + "enc.0.core.out.0.weight": (d, ch * fsub), ENC + "enc.0.core.out.0.bias": (d,),
            ENC + "enc.1.embed.0.weight": (d, d), ENC + "enc.1.embed.0.bias": (d,),
            ENC + "enc.1.embed.1.weight": (d,), ENC + "enc.1.embed.1.bias": (d,),
            ENC + "enc.1.after_norm.weight": (d,), ENC + "enc.1.after_norm.bias": (d,),
            AE_PREFIX + "adpter.conv1d2.weight": (c2, d, c.adapter_kernel), AE_PREFIX + "adpter.conv1d2.bias": (c2,),
            AE_PREFIX + "adpter.bn2.weight": (c2,), AE_PREFIX + "adpter.bn2.bias": (c2,),
            AE_PREFIX + "adpter.project.weight": (llm_hidden, c2), AE_PREFIX + "adpter.project.bias": (llm_hidden,),
        }
        for i in range(num_layers):
            p = f"{ENC}enc.1.encoders.{i}."
            for n in ("linear_q", "linear_k", "linear_v", "linear_out"):
                e[p + f"self_attn.{n}.weight"] = (d, d)
                e[p + f"self_attn.{n}.bias"] = (d,)
            e[p + "self_attn.linear_pos.weight"] = (d, d)
            e[p + "self_attn.pos_bias_u"] = (H, d // H)
            e[p + "self_attn.pos_bias_v"] = (H, d // H)
            e.update({p + "feed_forward.w_1.weight": (ff, d), p + "feed_forward.w_1.bias": (ff,),
                      p + "feed_forward.w_2.weight": (d, ff), p + "feed_forward.w_2.bias": (d,)})
            for n in ("norm1", "norm2"):
                e[p + f"{n}.weight"] = (d,)
                e[p + f"{n}.bias"] = (d,)
        return e

    # ---- features ----------------------------------------------------------------------------------
    def fbank(self, waveform_16k) -> torch.Tensor:
        """1-D float waveform in [-1, 1] at 16 kHz -> [frames, 80] float32 after global CMVN."""
        c = self.config
        w = _check_waveform(waveform_16k, "audio.fbank")
        feats = kaldi_fbank(w.to(torch.float64) * 32768.0, c.sample_rate, c.num_mel_bins, c.frame_length_ms, c.frame_shift_ms)
        mean = self.cmvn_mean.detach().cpu().to(torch.float32)
        istd = self.cmvn_istd.detach().cpu().to(torch.float32)
        return (feats - mean) * istd

    # ---- encoder -----------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: callers may feed the output to autograd-enabled code
    def encode_features(self, feats: torch.Tensor) -> torch.Tensor:
        """CMVN-normalised fbank [T, 80] -> [T_llm, llm_hidden]."""
        t, ops, c = self.t, self.ops, self.config
        if feats.dim() != 2 or feats.shape[1] != c.num_mel_bins:
            raise ValueError(f"audio.encode_features: feats must be [frames, {c.num_mel_bins}], got {tuple(feats.shape)}")
        if feats.shape[0] < MIN_FRAMES:
            raise ValueError(f"audio too short: {feats.shape[0]} fbank frames give no encoder frame (need >= {MIN_FRAMES}: "
                             f"{fbank_min_samples(c)} samples, {fbank_min_samples(c) / c.sample_rate * 1e3:.0f} ms at "
                             f"{c.sample_rate} Hz)")
        x = feats.to(self.device, self.dtype)[None, None]  # [1,1,T,80]
        x = F.relu(F.conv2d(x, t[ENC + "enc.0.core.conv.0.weight"], t[ENC + "enc.0.core.conv.0.bias"], stride=2))
        x = F.relu(F.conv2d(x, t[ENC + "enc.0.core.conv.2.weight"], t[ENC + "enc.0.core.conv.2.bias"], stride=2))
        _, C, T1, Fs = x.shape
        x = x[0].permute(1, 0, 2).reshape(T1, C * Fs)  # channel-major: c*F' + f
        x = F.linear(x, t[ENC + "enc.0.core.out.0.weight"], t[ENC + "enc.0.core.out.0.bias"])
        d = x.shape[-1]
        x = F.linear(x, t[ENC + "enc.1.embed.0.weight"], t[ENC + "enc.1.embed.0.bias"])
        x = F.relu(F.layer_norm(x, (d,), t[ENC + "enc.1.embed.1.weight"], t[ENC + "enc.1.embed.1.bias"], c.enc_ln_eps))
        x = x * math.sqrt(d)
        pe = rel_pe(T1, d, self.device, self.dtype)
        H = self.num_heads
        dk = d // H
        scale = 1.0 / math.sqrt(dk)
        cu = torch.tensor([0, T1], dtype=torch.int32, device=self.device)
        chunk_mask = static_chunk_mask(T1, self.chunk_size, self.left_chunks, self.device, self.dtype) if self.chunk_size > 0 else None
        eps = c.enc_ln_eps
        for i in range(self.num_layers):
            p = f"{ENC}enc.1.encoders.{i}."
            a = p + "self_attn."
            h = F.layer_norm(x, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], eps)
            q = F.linear(h, t[a + "linear_q.weight"], t[a + "linear_q.bias"]).view(T1, H, dk)
            k = F.linear(h, t[a + "linear_k.weight"], t[a + "linear_k.bias"]).view(T1, H, dk)
            v = F.linear(h, t[a + "linear_v.weight"], t[a + "linear_v.bias"]).view(T1, H, dk)
            pp = F.linear(pe, t[a + "linear_pos.weight"]).view(T1, H, dk)
            u, vb = t[a + "pos_bias_u"], t[a + "pos_bias_v"]
            # (q+u)·k + (q+v)·p = q·(k+p) + (u·k + v·p); the bias is added after scaling
            key_bias = (torch.einsum("hd,thd->ht", u, k) + torch.einsum("hd,thd->ht", vb, pp)) * scale
            if chunk_mask is None:
                o = ops.varlen_attention(q.contiguous(), (k + pp).contiguous(), v.contiguous(), cu, causal=False,
                                         key_bias=key_bias.contiguous(), scale=scale)
            else:
                o = F.scaled_dot_product_attention(q.transpose(0, 1), (k + pp).transpose(0, 1), v.transpose(0, 1),
                                                   attn_mask=key_bias[:, None, :] + chunk_mask, scale=scale).transpose(0, 1)
            x = x + F.linear(o.reshape(T1, d), t[a + "linear_out.weight"], t[a + "linear_out.bias"])
            h = F.layer_norm(x, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], eps)
            x = x + F.linear(F.relu(F.linear(h, t[p + "feed_forward.w_1.weight"], t[p + "feed_forward.w_1.bias"])),
                             t[p + "feed_forward.w_2.weight"], t[p + "feed_forward.w_2.bias"])
        x = F.layer_norm(x, (d,), t[ENC + "enc.1.after_norm.weight"], t[ENC + "enc.1.after_norm.bias"], eps)
        # adapter: right pad (k-1), Conv1d stride 2, LayerNorm(eps 1e-3) over channels, GELU, Linear
        w = t[AE_PREFIX + "adpter.conv1d2.weight"]
        y = F.conv1d(F.pad(x.T[None], (0, w.shape[-1] - 1)), w, t[AE_PREFIX + "adpter.conv1d2.bias"], stride=c.adapter_stride)
        y = y[0].T
        y = F.gelu(F.layer_norm(y, (y.shape[-1],), t[AE_PREFIX + "adpter.bn2.weight"], t[AE_PREFIX + "adpter.bn2.bias"], c.adapter_ln_eps))
        return F.linear(y, t[AE_PREFIX + "adpter.project.weight"], t[AE_PREFIX + "adpter.project.bias"])

    def encode(self, waveform_16k) -> torch.Tensor:
        """1-D waveform in [-1, 1] at 16 kHz -> [T_llm, llm_hidden]."""
        feats = self.fbank(waveform_16k)
        if feats.shape[0] < MIN_FRAMES:
            n = fbank_min_samples(self.config)
            raise ValueError(f"audio.encode: waveform_16k is too short: {len(waveform_16k)} samples give "
                             f"{feats.shape[0]} fbank frames; the encoder needs >= {MIN_FRAMES} frames ({n} samples, "
                             f"{n / self.config.sample_rate * 1e3:.0f} ms at {self.config.sample_rate} Hz)")
        return self.encode_features(feats)


#: fbank frames for one encoder frame (two 3x3 stride-2 convolutions)
MIN_FRAMES = 7


def fbank_min_samples(c) -> int:
    wl = int(c.sample_rate * c.frame_length_ms * 0.001)
    ws = int(c.sample_rate * c.frame_shift_ms * 0.001)
    return wl + (MIN_FRAMES - 1) * ws


def _check_waveform(w, where: str) -> torch.Tensor:
    """waveform_16k: 1-D float (numpy or torch), finite -> float CPU tensor. Integer PCM is refused
    (int16 would be off by 32768x: divide by 32768 first)."""
    if isinstance(w, torch.Tensor):
        t = w.detach().cpu()
    else:
        try:
            a = np.asarray(w)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{where}: waveform_16k must be a 1-D float array or tensor, got {type(w).__name__} ({e})") from None
        if a.dtype == object:
            raise TypeError(f"{where}: waveform_16k must be a 1-D float array or tensor, got {type(w).__name__} of objects")
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{where}: waveform_16k must be float32 in [-1, 1], got dtype {a.dtype}")
        # floats as float32, as before (VITA's waveforms are float32)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) if a.dtype.kind == "f" else np.ascontiguousarray(a))
    if not t.is_floating_point():
        hint = " (int16 PCM: divide by 32768)" if t.dtype == torch.int16 else ""
        raise TypeError(f"{where}: waveform_16k must be float32 in [-1, 1], got {str(t.dtype).replace('torch.', '')}{hint}")
    if t.dim() != 1:
        raise ValueError(f"{where}: waveform_16k must be 1-D [samples] (mono, 16 kHz), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: waveform_16k contains NaN or infinite samples")
    return t

"""Random-weight codec and TTS decoder at the real VITA-1.5 sizes (runtime/random_model.DIMS["full"]),
the tiny checkpoint's TTS, and the plain-torch TTS AR step used as the reference.

Weights are drawn on the host from a seeded generator, so every device gets the same model."""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

from ..model._ops import OpsHandle
from ..model.codec import Codec
from ..model.config import TTSConfig
from ..model.tts import TTSDecoder
from ..model.tts_batch import TTSBatchDecoder
from ..runtime.random_model import DIMS

__all__ = ["full_codec", "real_tts", "tiny_tts", "no_eos", "texts_for", "EngineStep", "TorchTTS", "cached", "clear_cache",
           "FULL_CODEC", "REAL_TTS"]

FULL_CODEC = dict(DIMS["full"]["codec"], resblock="1", n_code_groups=1, residul_layer=1, sampling_rate=24000)
REAL_TTS = dict(DIMS["full"]["tts"], llm_hidden=DIMS["full"]["llm"]["hidden"])


def full_codec(device="cpu", dtype=torch.float32, seed: int = 0) -> Codec:
    """The full-size TiCodec generator (512 -> 32 channels, x600 hop), random weights."""
    c = Codec(FULL_CODEC, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in c._shapes.items():
        fan = shape[1] * shape[2] if len(shape) == 3 else 1
        if "ups" in k and k.endswith("weight"):
            fan = shape[0] * shape[2] // 4
        sd[k] = torch.randn(*shape, generator=g) * (fan ** -0.5 if len(shape) == 3 else 0.05)
    return c.load_folded_state_dict(sd)


def real_tts(device="cpu", dtype=torch.float32, llm_vocab: int = 4096, seed: int = 0) -> TTSDecoder:
    """Random weights at the real TTS dimensions (hidden 896, 14 heads, FFN 4864, 4 AR + 2 NAR layers,
    V = 1024); the LLM embedding table it reads text rows from is cut to llm_vocab rows."""
    R = REAL_TTS
    c = TTSConfig(idim=R["hidden"], odim=R["odim"], hidden=R["hidden"], intermediate=R["inter"], num_blocks=R["blocks"],
                  num_heads=R["heads"], out_dim=R["hidden"], topk=2)
    g = torch.Generator().manual_seed(seed)
    t = {}
    for k, shape in TTSDecoder.expected_shapes(c).items():
        if k.endswith("norm.weight") or "layernorm" in k:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 2:
            w = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            w = 0.1 * torch.randn(shape, generator=g)
        t[k] = w.to(device=device, dtype=dtype)
    t["embedding.weight"] = torch.randn(c.odim + 4, c.idim, generator=g).to(device=device, dtype=dtype)
    emb = (0.05 * torch.randn(llm_vocab, R["llm_hidden"], generator=g)).to(device=device, dtype=dtype)
    return TTSDecoder(c, t, emb, OpsHandle())


def tiny_tts(device="cpu", dtype=torch.float32) -> TTSDecoder:
    from ..model.vita import VitaModel
    from ..testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="vita_tiny_")) / "VITA-1.5", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VitaModel.from_pretrained(d, device=device, dtype=dtype, load_codec_model=False).tts


def no_eos(tts: TTSDecoder) -> None:
    """Make eos unreachable so timed streams never finish (random weights would stop anywhere)."""
    b = tts.out_b.clone()
    b[tts.eos] = -1e4
    tts.out_b = b


def texts_for(tts: TTSDecoder, batch: int, text_len: int) -> List[List[int]]:
    return [[(7 * i + j) % tts.llm_embed.shape[0] for j in range(text_len)] for i in range(batch)]


class EngineStep:
    """`TTSBatchDecoder.step()` for `batch` streams prefilled with `text_len` text tokens each. With
    pin=True every call is the first AR step again (the streams' counters are put back after it, its
    K/V rows are rewritten in place), so repeated timed calls do identical work."""

    def __init__(self, tts: TTSDecoder, batch: int, text_len: int, pin: bool = True, steps: int = 64, block_size: int = 16):
        prefix = tts.split * text_len + 1
        nb = batch * -(-(prefix + steps + 1) // block_size)
        self.dec = TTSBatchDecoder(tts, max_streams=batch, block_size=block_size, num_blocks=nb, max_tokens=steps)
        self.dec.start_many(texts_for(tts, batch, text_len), list(range(batch)))
        self.pin = pin
        self._saved = [(s, s.n_steps, s.last) for s in self.dec._streams.values()]

    def __call__(self):
        out = self.dec.step()
        if self.pin:
            for s, n, last in self._saved:
                s.n_steps, s.last = n, last
                del s.tokens[n:]
        return out


class TorchTTS:
    """The TTS AR step in plain torch, the fast way: the same fused weights, a preallocated dense K/V
    cache [B, H, L, D] per layer written in place, SDPA over the filled prefix, F.rms_norm (or the
    Qwen formula), RoPE from a cos/sin table, top-k via torch.topk + torch.multinomial, one host sync.

    prefill() runs the bidirectional prefix [emb(bos), NAR_out] (or kv_from= copies it from an
    EngineStep over the same texts); step() feeds each stream's last token at position `pos`; with
    pin=True the position does not advance (identical work every call)."""

    def __init__(self, tts: TTSDecoder, batch: int, text_len: int, pin: bool = True, steps: int = 64, kv_from: "EngineStep" = None):
        c = tts.config
        max_len = tts.split * text_len + 1 + steps
        self.t, self.B, self.pin = tts, batch, pin
        self.H, self.D = c.num_heads, c.hidden // c.num_heads
        self.eps = c.rms_eps
        dev, dt = tts.device, tts.dtype
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, self.D, 2, device=dev, dtype=torch.float32) / self.D))
        ang = torch.arange(max_len, device=dev, dtype=torch.float32)[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        self.cos, self.sin = emb.cos().to(dt), emb.sin().to(dt)
        self.k = [torch.zeros(batch, self.H, max_len, self.D, device=dev, dtype=dt) for _ in tts.ar_layers]
        self.v = [torch.zeros_like(x) for x in self.k]
        V = c.odim
        self.mask = torch.zeros(V + 4, device=dev)
        self.mask[[tts.bos, tts.sos, tts.pad]] = float("-inf")
        if kv_from is not None:
            self._copy_prefix(kv_from)
            return
        texts = texts_for(tts, batch, text_len)
        bos = tts.embedding[tts.bos: tts.bos + 1]
        self.prefill(torch.stack([torch.cat([bos, tts.nar(t).to(dt)], 0) for t in texts]))

    def _copy_prefix(self, eng: "EngineStep") -> None:
        """Take the prefix K/V from the engine's pages (same texts, same model): saves a second prefill."""
        dec = eng.dec
        streams = [dec._streams[sid] for sid in sorted(dec._streams)]
        P = streams[0].prefix_len
        for i in range(len(self.k)):
            for b, s in enumerate(streams):
                pages = torch.tensor(s.blocks, dtype=torch.long, device=self.k[i].device)
                for dst, src in ((self.k[i], dec.cache.k[i]), (self.v[i], dec.cache.v[i])):
                    dst[b, :, :P] = src[pages].reshape(-1, self.H, self.D)[:P].transpose(0, 1)
        self.P = self.pos = P
        self.last = torch.full((self.B,), self.t.sos, dtype=torch.long, device=self.k[0].device)

    def _norm(self, x, w):
        if hasattr(F, "rms_norm"):
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rope(self, x, pos):  # x [B, H, L, D], pos [L]
        cos, sin = self.cos[pos], self.sin[pos]
        h = self.D // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    def _layers(self, x, p0, causal_step: bool):
        B, L, hd = x.shape
        H, D = self.H, self.D
        pos = torch.arange(p0, p0 + L, device=x.device)
        for i, Ly in enumerate(self.t.ar_layers):
            y = self._norm(x, Ly.input_norm)
            qkv = F.linear(y, Ly.qkv_w).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k, v = self._rope(qkv[0], pos), self._rope(qkv[1], pos), qkv[2]
            self.k[i][:, :, p0:p0 + L] = k
            self.v[i][:, :, p0:p0 + L] = v
            # a step sees every cached key (<= its position); the prefix is bidirectional
            o = F.scaled_dot_product_attention(q, self.k[i][:, :, : p0 + L], self.v[i][:, :, : p0 + L])
            x = x + F.linear(o.transpose(1, 2).reshape(B, L, hd), Ly.o_w)
            y = self._norm(x, Ly.post_norm)
            gu = F.linear(y, Ly.gate_up_w)
            n = gu.shape[-1] // 2
            x = x + F.linear(F.silu(gu[..., :n]) * gu[..., n:], Ly.down_w)
        return x

    @torch.inference_mode()
    def prefill(self, prefix: torch.Tensor) -> None:
        self._layers(prefix, 0, False)
        self.P = self.pos = prefix.shape[1]
        self.last = torch.full((self.B,), self.t.sos, dtype=torch.long, device=prefix.device)

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        t = self.t
        x = self._layers(F.embedding(self.last, t.embedding)[:, None], self.pos, True)
        return F.linear(self._norm(x[:, 0], t.norm), t.out_w, t.out_b).float() + self.mask

    @torch.inference_mode()
    def step(self) -> list:
        p = torch.softmax(self.logits(), -1)
        tp, ti = p.topk(self.t.config.topk, -1)
        nxt = ti.gather(-1, torch.multinomial(tp, 1)).squeeze(-1)
        if not self.pin:
            self.last = nxt
            self.pos += 1
        return nxt.tolist()


_CACHE: dict = {}


def cached(kind: str, device, dtype):
    """full_codec / real_tts (eos disabled) built once per (device, dtype); one model of each kind kept."""
    key = (str(device), dtype)
    hit = _CACHE.get(kind)
    if hit is None or hit[0] != key:
        _CACHE.pop(kind, None)
        if kind == "codec":
            m = full_codec(device, dtype)
        elif kind == "tts":
            m = real_tts(device, dtype)
            no_eos(m)
        else:
            raise KeyError(kind)
        _CACHE[kind] = (key, m)
    return _CACHE[kind][1]


def clear_cache() -> None:
    _CACHE.clear()

"""TTS decoders for the AR-step benchmarks: the tiny checkpoint, or random weights at the real
VITA-1.5 TTS dimensions (hidden 896, 14 heads, FFN 4864, 4 AR + 2 NAR layers, V = 1024; spec §5),
plus a naive pure-torch HF-style step (dense per-layer KV, torch.cat every step) for comparison."""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from vita_engine.model._ops import OpsHandle
from vita_engine.model.config import TTSConfig
from vita_engine.model.tts import TTSDecoder
from vita_engine.model.tts_batch import TTSBatchDecoder

REAL = dict(hidden=896, heads=14, inter=4864, blocks=4, odim=1024, llm_hidden=3584)


def real_tts(device="cpu", dtype=torch.float32, llm_vocab=4096, seed=0) -> TTSDecoder:
    """Random weights at the real dimensions (the LLM embedding table is cut to llm_vocab rows)."""
    c = TTSConfig(idim=REAL["hidden"], odim=REAL["odim"], hidden=REAL["hidden"], intermediate=REAL["inter"],
                  num_blocks=REAL["blocks"], num_heads=REAL["heads"], out_dim=REAL["hidden"], topk=2)
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
    emb = (0.05 * torch.randn(llm_vocab, REAL["llm_hidden"], generator=g)).to(device=device, dtype=dtype)
    return TTSDecoder(c, t, emb, OpsHandle())


def tiny_tts(device="cpu", dtype=torch.float32) -> TTSDecoder:
    from vita_engine import VitaModel
    from vita_engine.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="vita_tiny_")) / "VITA-1.5", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VitaModel.from_pretrained(d, device=device, dtype=dtype, load_codec_model=False).tts


def no_eos(tts: TTSDecoder) -> None:
    """Make eos unreachable so timed streams never finish (random weights would stop anywhere)."""
    b = tts.out_b.clone()
    b[tts.eos] = -1e4
    tts.out_b = b


def engine_stepper(tts: TTSDecoder, batch: int, text_len: int, steps: int, block_size: int = 16):
    """A TTSBatchDecoder with `batch` streams prefilled (text_len tokens each); returns step()."""
    prefix = tts.split * text_len + 1
    nb = batch * -(-(prefix + steps) // block_size)
    dec = TTSBatchDecoder(tts, max_streams=batch, block_size=block_size, num_blocks=nb, max_tokens=steps)
    texts = [[(7 * i + j) % tts.llm_embed.shape[0] for j in range(text_len)] for i in range(batch)]
    dec.start_many(texts, list(range(batch)))
    return dec.step


class NaiveTTS:
    """HF-style eager decode (LlamaDecoderLayer math): dense K/V [B, H, L, D] per layer grown by
    torch.cat each step, matmul + fp32 softmax attention, torch RMSNorm/RoPE, top-k via torch.topk +
    torch.multinomial. Same weights as the engine's TTSDecoder."""

    def __init__(self, tts: TTSDecoder):
        self.t, c = tts, tts.config
        self.H, self.D = c.num_heads, c.hidden // c.num_heads
        self.eps, self.theta = c.rms_eps, c.rope_theta

    def _rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def _rope(self, x, pos):  # x [B, H, L, D], pos [L]
        D = self.D
        inv = 1.0 / (self.theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
        ang = pos.float()[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _layer(self, L, x, pos, i, causal):
        B, T, h = x.shape
        H, D = self.H, self.D
        y = self._rms(x, L.input_norm)
        qkv = F.linear(y, L.qkv_w)
        q, k, v = (qkv[..., j * h : (j + 1) * h].view(B, T, H, D).transpose(1, 2) for j in range(3))
        q, k = self._rope(q, pos), self._rope(k, pos)
        if self.k[i] is not None:
            k = torch.cat([self.k[i], k], 2)
            v = torch.cat([self.v[i], v], 2)
        self.k[i], self.v[i] = k, v
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        p = torch.softmax(s.float(), -1).to(q.dtype)
        o = (p @ v).transpose(1, 2).reshape(B, T, h)
        x = x + F.linear(o, L.o_w)
        y = self._rms(x, L.post_norm)
        gu = F.linear(y, L.gate_up_w)
        return x + F.linear(F.silu(gu[..., : gu.shape[-1] // 2]) * gu[..., gu.shape[-1] // 2 :], L.down_w)

    @torch.inference_mode()
    def prefill(self, prefix: torch.Tensor):
        """prefix [B, P, h] = [emb(bos), NAR_out] per stream (same P for all), bidirectional."""
        t = self.t
        self.k = [None] * len(t.ar_layers)
        self.v = [None] * len(t.ar_layers)
        x, P = prefix, prefix.shape[1]
        pos = torch.arange(P, device=x.device)
        for i, L in enumerate(t.ar_layers):
            x = self._layer(L, x, pos, i, False)
        self.len = P
        self.last = torch.full((prefix.shape[0],), t.sos, dtype=torch.long, device=x.device)

    def logits_step(self) -> torch.Tensor:
        t = self.t
        x = F.embedding(self.last, t.embedding)[:, None]
        pos = torch.tensor([self.len], device=x.device)
        for i, L in enumerate(t.ar_layers):
            x = self._layer(L, x, pos, i, True)
        self.len += 1
        return F.linear(self._rms(x[:, 0], t.norm), t.out_w, t.out_b).float()

    @torch.inference_mode()
    def step(self) -> list:
        p = torch.softmax(self.logits_step(), -1)
        tp, ti = p.topk(self.t.config.topk, -1)
        self.last = ti.gather(-1, torch.multinomial(tp, 1)).squeeze(-1)
        return self.last.tolist()


def naive_stepper(tts: TTSDecoder, batch: int, text_len: int) -> NaiveTTS:
    texts = [[(7 * i + j) % tts.llm_embed.shape[0] for j in range(text_len)] for i in range(batch)]
    bos = tts.embedding[tts.bos : tts.bos + 1]
    prefix = torch.stack([torch.cat([bos, tts.nar(t)], 0) for t in texts])
    n = NaiveTTS(tts)
    n.prefill(prefix)
    return n

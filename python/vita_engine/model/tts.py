"""TTS decoder `LLM2TTSCodecAR` (spec §5, §11.6): the input is LLM input-embedding rows of the
text, each split into (llm_hidden / tts_hidden) consecutive vectors; NAR = num_blocks//2
bidirectional Llama layers; AR = num_blocks Llama layers as a prefix-LM over [emb(bos), NAR_out],
then causal steps from sos with a paged KV cache; RMSNorm + out_fnn -> V+4 logits; top-k 2."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ._ops import OpsHandle
from .config import TTSConfig
from .layers import DecoderLayer, PagedKVCache, run_decoder_stack

__all__ = ["TTSDecoder", "sample_topk"]

TTS_IGNORE = ("layers_prefix.*", "*rotary_emb*.inv_freq")


def sample_topk(logits: torch.Tensor, k: int = 2, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """softmax, keep the k most likely ids, sample among them (no temperature). logits [..., V] -> [...]."""
    p = torch.softmax(logits.float(), -1)
    top_p, top_i = p.topk(k, dim=-1)
    flat = top_p.reshape(-1, k)
    pick = torch.multinomial(flat, 1, generator=generator).reshape(top_p.shape[:-1] + (1,))
    return top_i.gather(-1, pick).squeeze(-1)


class TTSDecoder:
    def __init__(self, config: TTSConfig, tensors: Dict[str, torch.Tensor], embed_tokens: torch.Tensor, ops: OpsHandle):
        c = self.config = config
        self.ops = ops
        t = tensors  # consumed
        self.embedding = t.pop("embedding.weight")
        self.nar_layers = [DecoderLayer.from_tensors(t, f"layers_pre_nn.{i}.", bias=False) for i in range(c.nar_layers)]
        self.ar_layers = [DecoderLayer.from_tensors(t, f"layers.{i}.", bias=False) for i in range(c.num_blocks)]
        self.norm = t.pop("norm.weight")
        self.out_w, self.out_b = t.pop("out_fnn.weight"), t.pop("out_fnn.bias")
        self.llm_embed = embed_tokens  # shared with the LLM (no copy)
        self.device, self.dtype = self.embedding.device, self.embedding.dtype
        V = c.odim
        self.bos, self.sos, self.eos, self.pad = V, V + 1, V + 2, V + 3
        if embed_tokens.shape[1] % c.hidden:
            raise ValueError(f"TTS: LLM hidden {embed_tokens.shape[1]} is not a multiple of tts hidden {c.hidden}")
        self.split = embed_tokens.shape[1] // c.hidden

    @staticmethod
    def expected_shapes(c: TTSConfig) -> dict:
        V4, h = c.odim + 4, c.hidden
        hd = h // c.num_heads
        e = {"embedding.weight": (V4, c.idim), "norm.weight": (h,), "out_fnn.weight": (V4, c.out_dim), "out_fnn.bias": (V4,)}
        for i in range(c.nar_layers):
            e.update(DecoderLayer.expected_shapes(f"layers_pre_nn.{i}.", h, c.num_heads, c.num_heads, hd, c.intermediate, False))
        for i in range(c.num_blocks):
            e.update(DecoderLayer.expected_shapes(f"layers.{i}.", h, c.num_heads, c.num_heads, hd, c.intermediate, False))
        return e

    def _stack(self, layers, x, pos, attn):
        c = self.config
        return run_decoder_stack(self.ops, layers, x, pos, attn, num_heads=c.num_heads, num_kv_heads=c.num_heads,
                                 head_dim=c.hidden // c.num_heads, rope_theta=c.rope_theta, eps=c.rms_eps)

    # ---- NAR ---------------------------------------------------------------------------------------
    def text_embeddings(self, text_ids) -> torch.Tensor:
        """LLM input-embedding rows [N, llm_hidden] -> [split*N, tts_hidden] (row-major split)."""
        ids = torch.as_tensor(text_ids, dtype=torch.long, device=self.llm_embed.device).reshape(-1)
        e = self.ops.fuse_embeddings(ids, self.llm_embed, None)
        return e.reshape(-1, self.config.hidden).to(self.device, self.dtype)

    @torch.inference_mode()
    def nar(self, text_ids) -> torch.Tensor:
        """Bidirectional NAR decoder over the split text embeddings -> [4N, tts_hidden]."""
        x = self.text_embeddings(text_ids)
        T = x.shape[0]
        pos = torch.arange(T, device=self.device)
        cu = torch.tensor([0, T], dtype=torch.int32, device=self.device)
        return self._stack(self.nar_layers, x, pos, lambda i, q, k, v: self.ops.varlen_attention(q, k, v, cu, causal=False))

    # ---- AR ----------------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int, block_size: int = 16) -> PagedKVCache:
        c = self.config
        nb = (max_tokens + block_size - 1) // block_size
        return PagedKVCache(c.num_blocks, nb, block_size, c.num_heads, c.hidden // c.num_heads, self.dtype, self.device)

    def _ar_run(self, seq, x, causal: bool) -> torch.Tensor:
        q = x.shape[0]
        start = seq.length
        slots = seq.reserve(q)
        pos = torch.arange(start, start + q, device=self.device)
        h = self._stack(self.ar_layers, x, pos, seq.attn_fn(self.ops, slots, q, causal=causal))
        h = self.ops.rms_norm(h, self.norm, self.config.rms_eps)
        return F.linear(h, self.out_w, self.out_b)

    @torch.inference_mode()
    def ar_prefill(self, seq, nar_out: torch.Tensor) -> None:
        """The bidirectional prefix [emb(bos), NAR_out] at positions 0..4N into `seq`'s cache."""
        bos = self.embedding[self.bos : self.bos + 1]
        self._ar_run(seq, torch.cat([bos, nar_out.to(self.dtype)], 0), causal=False)

    @torch.inference_mode()
    def ar_step(self, seq, tokens) -> torch.Tensor:
        """Feed codec/special ids (causal, after the prefix) -> logits [len(tokens), V+4]."""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        return self._ar_run(seq, F.embedding(ids, self.embedding), causal=True)

    @torch.inference_mode()
    def ar_logits(self, text_ids, codec_tokens) -> torch.Tensor:
        """Teacher forcing: logits after sos and after each codec token -> [len(codec_tokens)+1, V+4]."""
        nar = self.nar(text_ids)
        codec = list(torch.as_tensor(codec_tokens).reshape(-1).tolist())
        cache = self.new_cache(nar.shape[0] + len(codec) + 2)
        seq = cache.new_sequence()
        self.ar_prefill(seq, nar)
        return self.ar_step(seq, [self.sos] + codec)

    @torch.inference_mode()
    def generate(self, text_ids, max_tokens: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 topk: Optional[int] = None) -> List[int]:
        """Sample codec tokens (top-k, k = decoder_topk = 2) until eos or max_tokens."""
        c = self.config
        max_tokens = c.max_tokens if max_tokens is None else max_tokens
        nar = self.nar(text_ids)
        cache = self.new_cache(nar.shape[0] + max_tokens + 2)
        seq = cache.new_sequence()
        self.ar_prefill(seq, nar)
        out: List[int] = []
        tok = self.sos
        for _ in range(max_tokens):
            logits = self.ar_step(seq, [tok])[-1]
            tok = int(sample_topk(logits, topk or c.topk, generator))
            if tok == self.eos:
                break
            out.append(tok)
        return out

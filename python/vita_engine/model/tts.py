"""TTS decoder `LLM2TTSCodecAR` (spec §5, §11.6): the input is LLM input-embedding rows of the
text, each split into (llm_hidden / tts_hidden) consecutive vectors; NAR = num_blocks//2
bidirectional Llama layers; AR = num_blocks Llama layers as a prefix-LM over [emb(bos), NAR_out],
then causal steps from sos with a paged KV cache; RMSNorm + out_fnn -> V+4 logits; top-k 2.

Sampling (`generate`, `TTSBatchDecoder`) uses `ops.sample_tokens` keyed by (seed, step), so
`generate(text, seed=s)` equals a stream started with the same seed in a `TTSBatchDecoder`."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ._ops import OpsHandle
from .config import TTSConfig
from .layers import DecoderLayer, PagedKVCache, linear, run_decoder_stack

__all__ = ["TTSDecoder"]

TTS_IGNORE = ("layers_prefix.*", "*rotary_emb*.inv_freq")


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
    def check_text_ids(self, text_ids) -> torch.Tensor:
        """Validate LLM token ids of one text segment -> int64 [N] on the embedding table's device.
        Empty, non-integer, multi-row or out-of-range (< 0 or >= LLM vocab) input raises."""
        if isinstance(text_ids, torch.Tensor):
            ids = text_ids
        else:
            try:
                ids = torch.as_tensor(text_ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"TTS: text_ids must be a sequence of integer token ids, got {type(text_ids).__name__} ({e})") from None
        if ids.numel() == 0:
            raise ValueError("TTS: text_ids is empty (a TTS segment needs at least one text token)")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"TTS: text_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() > 1 and not (ids.dim() == 2 and ids.shape[0] == 1):
            raise ValueError(f"TTS: text_ids must be 1-D [N] (one segment), got shape {tuple(ids.shape)}")
        ids = ids.reshape(-1)
        vocab = self.llm_embed.shape[0]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"TTS: text_ids must lie in [0, {vocab}) (LLM embedding rows), got min {lo}, max {hi}")
        return ids.to(device=self.llm_embed.device, dtype=torch.long)

    def text_embeddings(self, text_ids) -> torch.Tensor:
        """LLM input-embedding rows [N, llm_hidden] -> [split*N, tts_hidden] (row-major split)."""
        ids = self.check_text_ids(text_ids)
        e = self.ops.fuse_embeddings(ids, self.llm_embed, None)
        return e.reshape(-1, self.config.hidden).to(self.device, self.dtype)

    @torch.no_grad()  # not inference_mode: callers may feed the output to autograd-enabled code
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
        return linear(self.ops, h, self.out_w, self.out_b)

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

    @torch.no_grad()
    def ar_logits(self, text_ids, codec_tokens) -> torch.Tensor:
        """Teacher forcing: logits after sos and after each codec token -> [len(codec_tokens)+1, V+4]."""
        nar = self.nar(text_ids)
        codec = self.check_codec_tokens(codec_tokens)
        cache = self.new_cache(nar.shape[0] + len(codec) + 2)
        seq = cache.new_sequence()
        # the bodies of ar_prefill / ar_step, outside their inference_mode (a plain tensor comes back)
        bos = self.embedding[self.bos : self.bos + 1]
        self._ar_run(seq, torch.cat([bos, nar.to(self.dtype)], 0), causal=False)
        ids = torch.tensor([self.sos] + codec, dtype=torch.long, device=self.device)
        return self._ar_run(seq, F.embedding(ids, self.embedding), causal=True)

    def check_codec_tokens(self, codec_tokens) -> List[int]:
        """Teacher-forced AR input: a 1-D sequence of integer ids in [0, V+4) (codec ids, or the specials)."""
        try:
            t = torch.as_tensor(codec_tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"TTS.ar_logits: codec_tokens must be a sequence of integer codec ids, got {type(codec_tokens).__name__} ({e})") from None
        if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
            raise TypeError(f"TTS.ar_logits: codec_tokens must be integer codec ids, got dtype {t.dtype}")
        if t.dim() > 1 and not (t.dim() == 2 and t.shape[0] == 1):
            raise ValueError(f"TTS.ar_logits: codec_tokens must be 1-D [n], got shape {tuple(t.shape)}")
        ids = t.reshape(-1).to(torch.long).tolist()
        rows = self.embedding.shape[0]
        if ids and (min(ids) < 0 or max(ids) >= rows):
            raise ValueError(f"TTS.ar_logits: codec_tokens must lie in [0, {rows}) (codec vocabulary {rows - 4} + 4 special ids), "
                             f"got min {min(ids)}, max {max(ids)}")
        return ids

    def generate(self, text_ids, max_tokens: Optional[int] = None, *, seed: int = 0, topk: Optional[int] = None,
                 block_size: int = 16) -> List[int]:
        """Sample codec tokens (top-k, k = decoder_topk = 2) until eos or max_tokens: a 1-stream
        `TTSBatchDecoder`, so the result equals any batched run of the same text with the same seed."""
        from .tts_batch import TTSBatchDecoder

        c = self.config
        cap = c.max_tokens if max_tokens is None else int(max_tokens)
        n = self.check_text_ids(text_ids).numel()
        if cap <= 0:
            return []
        nb = -(-(self.split * n + 1 + cap) // block_size)
        dec = TTSBatchDecoder(self, max_streams=1, block_size=block_size, num_blocks=nb, max_tokens=cap, topk=topk)
        sid = dec.start(text_ids, seed=seed)
        while not dec.finished(sid):
            dec.step([sid])
        return dec.tokens(sid)

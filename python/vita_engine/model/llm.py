"""Qwen2 / Qwen2.5 language model (GQA, q/k/v bias, untied head, RoPE θ=1e6) on vita_engine ops.

`LLM.from_pretrained(path)` loads a plain Hugging Face Qwen2 folder; VitaModel builds the same
class from the `model.*` / `lm_head.*` tensors of a VITA checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ._ops import OpsHandle
from .config import LLMConfig
from .layers import DecoderLayer, PagedKVCache, linear, run_decoder_stack
from .loading import CheckpointError, SafetensorsCheckpoint, check_device_dtype, load_tensors

__all__ = ["LLM"]

#: keys a Qwen2 checkpoint may carry that the LLM does not use
LLM_IGNORE = ("*.rotary_emb.inv_freq",)
#: the multimodal parts of a VITA checkpoint (ignored when loading only the LLM)
MM_PREFIXES = ("model.vision_tower.*", "model.mm_projector.*", "model.audio_encoder.*")


def _as_ids(x, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(list(x), dtype=torch.long)
    if x.dim() == 2:
        if x.shape[0] != 1:
            raise ValueError(f"input_ids: one sequence expected, got shape {tuple(x.shape)}")
        x = x[0]
    return x.to(device=device, dtype=torch.long)


class LLM:
    """The decoder-only LLM. Weights are plain tensors; see `run_decoder_stack` for the layer math."""

    def __init__(self, config: LLMConfig, tensors: Dict[str, torch.Tensor], ops: Optional[OpsHandle] = None):
        """`tensors` (checkpoint names) is consumed: entries are popped as they are fused."""
        c = self.config = config
        self.ops = ops or OpsHandle()
        t = tensors  # consumed: popping as we fuse keeps host memory near one copy
        self.embed_tokens = t.pop("model.embed_tokens.weight")
        self.layers: List[DecoderLayer] = [
            DecoderLayer.from_tensors(t, f"model.layers.{i}.", bias=c.attention_bias) for i in range(c.num_layers)
        ]
        self.norm = t.pop("model.norm.weight")
        self.lm_head = t.pop("lm_head.weight") if "lm_head.weight" in t else self.embed_tokens
        if t:
            raise CheckpointError(f"LLM: unused tensors {sorted(t)[:8]}")
        self.device = self.embed_tokens.device
        self.dtype = self.embed_tokens.dtype

    # ---- loading ---------------------------------------------------------------------------------
    @staticmethod
    def expected_shapes(c: LLMConfig, vocab_rows: Optional[int] = None) -> dict:
        V = vocab_rows if vocab_rows is not None else c.vocab_size
        e = {"model.embed_tokens.weight": (V, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            e["lm_head.weight"] = (V, c.hidden_size)
        for i in range(c.num_layers):
            e.update(DecoderLayer.expected_shapes(f"model.layers.{i}.", c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.attention_bias))
        return e

    @staticmethod
    def vocab_rows(c: LLMConfig, ckpt: SafetensorsCheckpoint) -> int:
        """Row count of the stored embedding (checked against the config's allowed counts)."""
        key = "model.embed_tokens.weight"
        if key not in ckpt:
            return c.vocab_size  # reported as missing by load_tensors
        rows = ckpt.shapes[key][0]
        allowed = c.vocab_rows_allowed()
        if rows not in allowed:
            raise CheckpointError(
                f"{ckpt.key_file[key]}: {key} has {rows} rows; config.json vocab_size {c.vocab_size} allows {allowed}"
            )
        return rows

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, *, use_reference: bool = False, ops: Optional[OpsHandle] = None, progress=None) -> "LLM":
        """Load a Hugging Face Qwen2 folder (config.json + *.safetensors, index optional). A VITA
        checkpoint folder also works: its vision/audio tensors are skipped."""
        device, dtype = check_device_dtype("LLM.from_pretrained", device, dtype)
        path = Path(path)
        cfg = LLMConfig.from_file(path / "config.json")
        ckpt = SafetensorsCheckpoint(path)
        rows = cls.vocab_rows(cfg, ckpt)
        exp = cls.expected_shapes(cfg, rows)
        ignore = LLM_IGNORE + MM_PREFIXES
        if cfg.tie_word_embeddings:
            ignore = ignore + ("lm_head.weight",)
        t = load_tensors(ckpt, exp, dtype=dtype, device=device, ignore=ignore, progress=progress)
        del ckpt  # unmap the files
        return cls(cfg, t, ops or OpsHandle(use_reference))

    # ---- forward ---------------------------------------------------------------------------------
    def embed(self, input_ids) -> torch.Tensor:
        ids = _as_ids(input_ids, self.device)
        return self.ops.fuse_embeddings(ids, self.embed_tokens, None)

    def hidden_states(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        c = self.config
        return run_decoder_stack(
            self.ops, self.layers, inputs_embeds, positions, attn,
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            rope_theta=c.rope_theta, eps=c.rms_norm_eps, final_norm=self.norm,
        )

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self.ops, h, self.lm_head)

    @torch.no_grad()  # not inference_mode: callers may feed the output to autograd-enabled code
    def logits(self, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """Full causal forward without cache: [T] ids or [T, hidden] embeddings -> [T, vocab]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("logits: pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        if x.dim() == 3:
            x = x[0]
        T = x.shape[0]
        pos = torch.arange(T, device=self.device)
        cu = torch.tensor([0, T], dtype=torch.int32, device=self.device)

        def attn(i, q, k, v):
            return self.ops.varlen_attention(q, k, v, cu, causal=True)

        return self.head(self.hidden_states(x, pos, attn))

    def new_cache(self, max_tokens: int, block_size: int = 16) -> PagedKVCache:
        c = self.config
        nb = (max_tokens + block_size - 1) // block_size
        return PagedKVCache(c.num_layers, nb, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward_cached(self, seq, x: torch.Tensor) -> torch.Tensor:
        """Run x [q, hidden] as the next tokens of `seq` (a SequenceKV): store K/V in the paged
        cache, attend causally over everything cached; returns logits [q, vocab]."""
        q = x.shape[0]
        start = seq.length
        slots = seq.reserve(q)
        pos = torch.arange(start, start + q, device=self.device)
        h = self.hidden_states(x, pos, seq.attn_fn(self.ops, slots, q, causal=True))
        return self.head(h)

    @torch.inference_mode()
    def generate(
        self,
        input_ids=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        generator: Optional[torch.Generator] = None,
        block_size: int = 16,
    ) -> List[int]:
        """Prefill the prompt into a paged KV cache, then decode one token per step.
        temperature 0 = greedy. Returns the new token ids (stops after an eos id if given)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        cache = self.new_cache(x.shape[0] + max_new_tokens, block_size)
        seq = cache.new_sequence()
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        out: List[int] = []
        logits = self.forward_cached(seq, x)[-1]
        for _ in range(max_new_tokens):
            if temperature and temperature > 0:
                p = torch.softmax(logits.float() / temperature, -1)
                tok = int(torch.multinomial(p, 1, generator=generator))
            else:
                tok = int(torch.argmax(logits))
            out.append(tok)
            if tok in eos or len(out) == max_new_tokens:
                break
            logits = self.forward_cached(seq, self.embed([tok]))[-1]
        seq.release()
        return out

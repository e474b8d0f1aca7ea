"""One LLM forward over a packed ragged batch of many sessions (decode rows and prefill chunks).

Every item appends `x` ([q, hidden] input embeddings) to its session's `SeqKV` at positions
`length .. length+q-1`. All rows go through the layer stack together: per layer ONE `store_kv` of
every row's K/V and ONE `paged_attention` over each sequence's pages (q_len = 1 for decode, > 1 for
chunked prefill, bottom-right causal), so batching changes nothing a row sees. Logits are computed
only for the last row of items that ask for them.

With CUDA graphs on (`LLMDecodeGraphs`, engine option `cuda_graphs`), a pure-decode forward (every
item one row that wants logits, at most the largest bucket of them, each within the static block
table) runs on the static buffers of its bucket instead: replayed as a CUDA graph on a GPU, eagerly
on the same buffers on the CPU. Prefill and mixed forwards stay eager.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .graphs import GraphRunner, StaticBatch, capture_supported
from .kv_pool import KVPool, SeqKV

__all__ = ["LLMWork", "BatchLLM", "LLMDecodeGraphs"]


@dataclass
class LLMWork:
    seq: SeqKV
    x: torch.Tensor          # [q, hidden]
    want_logits: bool = True


class LLMDecodeGraphs:
    """The LLM decode step on static buffers per bucket (runtime/graphs.py): input embeddings
    [b, hidden] -> float32 logits [b, vocab]. `max_blocks`: the static block-table width (the session
    budget in pages); a row holding more pages runs eagerly. Takes the pool's scratch page."""

    def __init__(self, llm, pool: KVPool, buckets: Sequence[int], max_blocks: int):
        c = llm.config
        self.llm, self.pool, self.max_blocks = llm, pool, int(max_blocks)
        scratch = pool.take_scratch_block()
        hkv, hd = pool.k[0].shape[2], pool.k[0].shape[3]
        batches = {b: StaticBatch(b, max_blocks=self.max_blocks, block_size=pool.block_size, scratch_block=scratch,
                                  device=llm.device, num_q_heads=c.num_heads, num_kv_heads=hkv, head_dim=hd,
                                  x_shape=(c.hidden_size,), x_dtype=llm.dtype, use_reference=llm.ops.use_reference)
                   for b in buckets}
        self.runner = GraphRunner(self._step, batches)
        self.capturable = not llm.ops.use_reference and capture_supported(hd, llm.device, "cuda_graphs (LLM decode)")

    def _step(self, sb: StaticBatch) -> torch.Tensor:
        llm, pool, ops = self.llm, self.pool, self.llm.ops

        def attn(i, q, k, v):
            ops.store_kv(k, v, pool.k[i], pool.v[i], sb.slots)
            return sb.attend(q, pool.k[i], pool.v[i])

        return llm.head(llm.hidden_states(sb.x, sb.positions, attn)).float()

    def capture(self) -> None:
        """Capture every bucket (CUDA, CUDA attention kernels); otherwise a no-op: the buckets run eagerly."""
        if self.capturable:
            self.runner.capture_all()

    def eligible(self, work: List[LLMWork]) -> bool:
        if self.runner.batch_for(len(work)) is None:
            return False
        bs = self.pool.block_size
        return all(w.want_logits and w.x.shape[0] == 1 and -(-(w.seq.length + 1) // bs) <= self.max_blocks for w in work)

    def forward(self, work: List[LLMWork]) -> torch.Tensor:
        """Decode rows (see `eligible`) -> logits [n, vocab]: a view of the bucket's output buffer,
        valid until the next decode forward of that bucket."""
        pos, slots, blocks, lens = [], [], [], []
        for w in work:
            pos.append(w.seq.length)
            slots += w.seq.grow(1)
            blocks.append(w.seq.blocks)
            lens.append(w.seq.length)
        xs = [w.x.to(self.llm.device, self.llm.dtype) for w in work]
        return self.runner.replay(len(work), positions=pos, slots=slots, blocks=blocks, kv_lens=lens, x=xs)


class BatchLLM:
    def __init__(self, llm, pool: KVPool, graphs: Optional[LLMDecodeGraphs] = None):
        self.llm, self.pool = llm, pool
        self.ops = llm.ops
        self.graphs = graphs  # pure-decode forwards on static buffers (engine option cuda_graphs)
        self.forwards = 0
        self.rows = 0
        self.graph_forwards = 0

    @torch.inference_mode()
    def forward(self, work: List[LLMWork]) -> torch.Tensor:
        """-> float32 logits [n_wanted, vocab] in the order of the items with want_logits. With graphs,
        the logits of a pure-decode forward are a view of a static buffer that the next decode
        forward overwrites: consume them first (LLMStage samples at once)."""
        g = self.graphs
        if g is not None and work and g.eligible(work):
            self.forwards += 1
            self.rows += len(work)
            self.graph_forwards += 1
            return g.forward(work)
        dev = self.llm.device
        xs, pos, slots, lens, qls, nblk = [], [], [], [], [], []
        for w in work:
            q = int(w.x.shape[0])
            start = w.seq.length
            slots.append(w.seq.append(q))
            pos.append(torch.arange(start, start + q))
            xs.append(w.x.to(dev, self.llm.dtype))
            lens.append(w.seq.length)
            qls.append(q)
            nblk.append(len(w.seq.blocks))
        B, W = len(work), max(nblk)
        bt = torch.zeros(B, W, dtype=torch.int32)
        for i, w in enumerate(work):
            bt[i, : len(w.seq.blocks)] = torch.tensor(w.seq.blocks, dtype=torch.int32)
        kv_lens = torch.tensor(lens, dtype=torch.int32)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(qls, dtype=torch.int32), 0)
        last = (cu[1:] - 1).to(torch.long)
        x = torch.cat(xs, 0)
        positions = torch.cat(pos).to(dev)
        slot = torch.cat(slots)
        pool, ops = self.pool, self.ops

        # One plan per forward from the host metadata, run by every layer (plan/run split).
        run = ops.paged_attention_plan(bt, kv_lens, cu, num_q_heads=self.llm.config.num_heads,
                                       num_kv_heads=pool.k[0].shape[2], head_dim=pool.k[0].shape[3], block_size=pool.k[0].shape[1],
                                       causal=True, device=dev)

        def attn(i, q, k, v):
            ops.store_kv(k, v, pool.k[i], pool.v[i], slot)
            return run(q, pool.k[i], pool.v[i])

        h = self.llm.hidden_states(x, positions, attn)
        want = [int(last[i]) for i, w in enumerate(work) if w.want_logits]
        self.forwards += 1
        self.rows += int(x.shape[0])
        if not want:
            return torch.zeros(0, self.llm.lm_head.shape[0], dtype=torch.float32, device=dev)
        return self.llm.head(h[torch.tensor(want, device=dev)]).float()

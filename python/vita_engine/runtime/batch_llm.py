"""One LLM forward over a packed ragged batch of many sessions (decode rows and prefill chunks).

Every item appends `x` ([q, hidden] input embeddings) to its session's `SeqKV` at positions
`length .. length+q-1`. All rows go through the layer stack together: per layer ONE `store_kv` of
every row's K/V and ONE `paged_attention` over each sequence's pages (q_len = 1 for decode, > 1 for
chunked prefill, bottom-right causal), so batching changes nothing a row sees. Logits are computed
only for the last row of items that ask for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .kv_pool import KVPool, SeqKV

__all__ = ["LLMWork", "BatchLLM"]


@dataclass
class LLMWork:
    seq: SeqKV
    x: torch.Tensor          # [q, hidden]
    want_logits: bool = True


class BatchLLM:
    def __init__(self, llm, pool: KVPool):
        self.llm, self.pool = llm, pool
        self.ops = llm.ops
        self.forwards = 0
        self.rows = 0

    @torch.inference_mode()
    def forward(self, work: List[LLMWork]) -> torch.Tensor:
        """-> float32 logits [n_wanted, vocab] in the order of the items with want_logits."""
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
        bt = bt.to(dev)
        kv_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(qls, dtype=torch.int32), 0)
        last = (cu[1:] - 1).to(torch.long)
        cu = cu.to(dev)
        x = torch.cat(xs, 0)
        positions = torch.cat(pos).to(dev)
        slot = torch.cat(slots)
        pool, ops = self.pool, self.ops

        def attn(i, q, k, v):
            ops.store_kv(k, v, pool.k[i], pool.v[i], slot)
            return ops.paged_attention(q, pool.k[i], pool.v[i], bt, kv_lens, cu, causal=True)

        h = self.llm.hidden_states(x, positions, attn)
        want = [int(last[i]) for i, w in enumerate(work) if w.want_logits]
        self.forwards += 1
        self.rows += int(x.shape[0])
        if not want:
            return torch.zeros(0, self.llm.lm_head.shape[0], dtype=torch.float32, device=dev)
        return self.llm.head(h[torch.tensor(want, device=dev)]).float()

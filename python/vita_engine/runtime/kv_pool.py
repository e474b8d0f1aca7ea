"""Paged KV allocator shared by every session of an Engine (one pool for all LLM layers).

Pages ("blocks") of `block_size` tokens live in per-layer tensors `[num_blocks, block_size, Hkv, D]`
(the layout of `ops.store_kv` / `ops.paged_attention`). A session holds one `SeqKV` (its block list
and length) for its whole life: history is never re-encoded between turns.

Admission control: each session *reserves* `session_tokens` worth of pages when it is created; the
reservation is a count, not pages. A new session is admitted only while the sum of reservations fits
the pool, so running sessions can always grow up to their budget (the scheduler trims a session's
history to stay inside it) and a full engine refuses new sessions with `CapacityError` instead of
slowing or corrupting the others.

CUDA graphs (`runtime/graphs.py`) take one *scratch* page out of the pool (`take_scratch_block`):
the padded rows of a graph bucket write their K/V there and attend over it alone. It is never on
the free list, so no session is ever handed it, and it does not count towards admission.
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, List, Optional

import torch

from .events import CapacityError

__all__ = ["KVPool", "SeqKV"]


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KVPool: num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._reserved = 0
        self._lock = threading.Lock()
        self._live: "weakref.WeakSet[SeqKV]" = weakref.WeakSet()  # sequences not released yet
        self.scratch_block: Optional[int] = None  # the CUDA-graph padding page (take_scratch_block)

    @classmethod
    def for_llm(cls, llm, num_blocks: int, block_size: int = 16) -> "KVPool":
        c = llm.config
        return cls(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, llm.dtype, llm.device)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def reserved_blocks(self) -> int:
        return self._reserved

    def usage(self) -> Dict[str, object]:
        """A consistent read-only snapshot (any thread): total / free / used / reserved pages and the
        pages held by each live (not released) sequence, largest first. The CUDA-graph scratch page
        is in none of them (total = `usable_blocks`)."""
        with self._lock:
            free, reserved, total = len(self._free), self._reserved, self.usable_blocks
            live = list(self._live)
        held = sorted((len(s.blocks) for s in live), reverse=True)
        return {"blocks": total, "free": free, "used": total - free, "reserved": reserved,
                "block_size": self.block_size, "sequence_blocks": held}

    def blocks_for(self, tokens: int) -> int:
        return -(-int(tokens) // self.block_size)

    @property
    def usable_blocks(self) -> int:
        """Pages sessions can reserve: all of them but the scratch page, once taken."""
        return self.num_blocks - (self.scratch_block is not None)

    def take_scratch_block(self) -> int:
        """The page padded CUDA-graph rows write to (taken once, off the free list, out of admission;
        idempotent). CapacityError when every page is reserved or in use."""
        with self._lock:
            if self.scratch_block is None:
                if not self._free or self._reserved + 1 > self.num_blocks:
                    raise CapacityError("KV cache: no page left for the CUDA-graph scratch page "
                                        f"({len(self._free)} free, {self._reserved} of {self.num_blocks} reserved)")
                self.scratch_block = self._free.pop(0)  # the highest free id: fresh pools hand out low ids first
            return self.scratch_block

    # ---- admission ---------------------------------------------------------------------------------
    def reserve(self, tokens: int) -> int:
        """Reserve pages for a new session of up to `tokens` tokens -> blocks reserved, or CapacityError."""
        n = self.blocks_for(tokens)
        with self._lock:
            cap = self.usable_blocks
            if self._reserved + n > cap:
                raise CapacityError(
                    f"KV cache full: a new session needs {n} pages ({tokens} tokens) but only "
                    f"{cap - self._reserved} of {cap} pages are unreserved; "
                    f"close sessions or start the engine with a larger kv_blocks / smaller session_max_tokens")
            self._reserved += n
        return n

    def unreserve(self, blocks: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - blocks)

    # ---- pages -------------------------------------------------------------------------------------
    def alloc(self, n: int) -> List[int]:
        with self._lock:
            if n > len(self._free):
                raise CapacityError(f"KV cache: {n} pages needed, {len(self._free)} free")
            out = [self._free.pop() for _ in range(n)]
        return out

    def release(self, blocks: List[int]) -> None:
        if not blocks:
            return
        if self.scratch_block is not None and self.scratch_block in blocks:
            raise RuntimeError(f"KVPool.release: page {self.scratch_block} is the CUDA-graph scratch page, never a session's")
        with self._lock:
            self._free.extend(reversed(blocks))

    def new_sequence(self) -> "SeqKV":
        s = SeqKV(self)
        with self._lock:
            self._live.add(s)
        return s


class SeqKV:
    """One session's pages and cached length. Not thread-safe: owned by the scheduler thread."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.blocks: List[int] = []
        self.length = 0

    def append(self, n: int) -> torch.Tensor:
        """Grow by n tokens (allocating pages) -> their slot indices (int64 [n], on the pool device)."""
        bs = self.pool.block_size
        self._alloc_for(n)
        pos = torch.arange(self.length, self.length + n)
        blk = torch.tensor(self.blocks, dtype=torch.int64)[pos // bs]
        self.length += n
        return (blk * bs + pos % bs).to(self.pool.device)

    def grow(self, n: int) -> List[int]:
        """`append` with the slot indices as host ints (no tensor, no device copy: the CUDA-graph path
        stages them with the rest of the tick's metadata)."""
        bs = self.pool.block_size
        self._alloc_for(n)
        out = [self.blocks[p // bs] * bs + p % bs for p in range(self.length, self.length + n)]
        self.length += n
        return out

    def _alloc_for(self, n: int) -> None:
        need = -(-(self.length + n) // self.pool.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.alloc(need)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens; pages past them go back to the pool."""
        length = max(0, min(int(length), self.length))
        keep = -(-length // self.pool.block_size)
        self.pool.release(self.blocks[keep:])
        del self.blocks[keep:]
        self.length = length

    def release(self) -> None:
        """Give every page back; the sequence no longer counts as live (`KVPool.usage`)."""
        self.truncate(0)
        with self.pool._lock:
            self.pool._live.discard(self)

"""CUDA graphs for the per-token stages (LLM decode, TTS AR step; the codec window: codec_graphs.py): the mechanism.

A stage that runs one q_len = 1 row per sequence each tick is captured once per batch-size *bucket*
(`cuda_graph_buckets`, default 1, 2, 4, 8, 16, 32) and replayed with the tick's rows padded up to the
bucket. A captured graph reads and writes fixed addresses, so everything it touches lives in a
`StaticBatch` that keeps its tensors for the life of the engine:

* inputs: row data `x` (embeddings, or token ids), `positions`, KV `slots`, `block_table`
  [b, max_blocks] (max_blocks fixed: the per-sequence page budget), `kv_lens`, `cu_q_lens`; optional
  extra int rows (the TTS's sampling seed / step);
* a `PagedAttentionPlan` built once from the device-resident metadata with a fixed KV bound
  (max_blocks * block_size), so its split count and split-KV workspace are fixed at capture;
* the output (logits), allocated by the first (warm-up) run.

`fill(...)` writes the live rows into pinned host staging buffers and copies them to the device
with `non_blocking` copies (`plan.update` for the attention metadata); the padded rows are made
harmless: each writes its K/V to slot 0 of a reserved *scratch page* and attends over that page
alone (kv_len 1), and its outputs are never read. Nothing in fill/replay allocates device memory or
reads device values back; the one wait is for the previous fill's copies (a CUDA event) before its
staging buffers are rewritten, and those are done by then (the tick sampled its tokens since).

On CPU (and on CUDA without capture) `replay` runs the same function eagerly on the same static
buffers, so the CPU tests exercise the exact buffers, padding and plan updates the GPU path replays.

The third per-token stage, the steady codec window, has its own static steps (model/codec_graphs.py:
one per row bucket x window size, padded rows on the slab's scratch row) under the same option.

STATUS: capture/replay (`GraphRunner.capture`, `CodecSlabGraphs.capture`) has NOT yet run on a GPU;
only the eager static-buffer paths have run (CPU tests, engine). `cuda_graphs` is off by default.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from .. import ops as _fast

__all__ = ["DEFAULT_BUCKETS", "check_buckets", "bucket_for", "StaticBatch", "GraphRunner", "capture_supported"]

DEFAULT_BUCKETS: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def check_buckets(value, option: str = "cuda_graph_buckets") -> Tuple[int, ...]:
    """A non-empty collection of distinct positive ints -> sorted tuple; errors name `option`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{option}: expected a sequence of positive ints (batch sizes), got {type(value).__name__} {value!r}")
    vals = list(value)
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{option}: expected a non-empty sequence of positive ints (batch sizes), got {value!r}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{option}: batch sizes must be distinct, got {value!r}")
    return tuple(sorted(vals))


def bucket_for(n: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket >= n (buckets sorted ascending), or None when n exceeds the largest (run eagerly)."""
    if n < 1:
        raise ValueError(f"bucket_for: n must be >= 1, got {n}")
    for b in buckets:
        if b >= n:
            return b
    return None


def capture_supported(head_dim: int, device, what: str = "cuda_graphs") -> bool:
    """Capture needs CUDA and its attention kernels: other head dims run the torch reference on the GPU
    (attention._cuda_fallback), which reads lengths on the host and cannot be captured. Warns (once
    per call) when CUDA is there but the head dim is not: the buckets then run eagerly."""
    if torch.device(device).type != "cuda":
        return False
    if head_dim not in _fast.attention.CUDA_HEAD_DIMS:
        warnings.warn(f"{what}: head_dim {head_dim} has no CUDA attention kernel {_fast.attention.CUDA_HEAD_DIMS}; "
                      "not capturing, the static buffers run eagerly", stacklevel=3)
        return False
    return True


class StaticBatch:
    """The fixed buffers of one bucket of `b` rows (see the module docstring). Tensors never change
    identity; `fill` rewrites their contents in place."""

    def __init__(self, b: int, *, max_blocks: int, block_size: int, scratch_block: int, device, num_q_heads: int,
                 num_kv_heads: int, head_dim: int, x_shape: Optional[Tuple[int, ...]] = None, x_dtype=torch.float32,
                 extra_rows: Sequence[str] = (), use_reference: bool = False):
        if b < 1 or max_blocks < 1:
            raise ValueError(f"StaticBatch: b and max_blocks must be >= 1, got {b}, {max_blocks}")
        dev = self.device = torch.device(device)
        self.b, self.max_blocks, self.block_size, self.scratch = int(b), int(max_blocks), int(block_size), int(scratch_block)
        self.pad_slot = self.scratch * self.block_size  # slot 0 of the scratch page
        self.x = None if x_shape is None else torch.zeros((b, *x_shape), dtype=x_dtype, device=dev)
        # int64 rows copied together: positions, slots, then the caller's extras (seed, step, tokens...)
        self.row_names = ("positions", "slots") + tuple(extra_rows)
        self.ints = torch.zeros(len(self.row_names), b, dtype=torch.int64, device=dev)
        self.ints[1].fill_(self.pad_slot)
        self.block_table = torch.full((b, max_blocks), self.scratch, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.cu_q_lens = torch.arange(b + 1, dtype=torch.int32, device=dev)  # q_len 1 per row, constant
        self.out: Optional[torch.Tensor] = None
        pin = dev.type == "cuda"
        self._h_ints = torch.zeros(self.ints.shape, dtype=torch.int64, pin_memory=pin)
        self._h_bt = torch.zeros(self.block_table.shape, dtype=torch.int32, pin_memory=pin)
        self._h_kv = torch.zeros(self.kv_lens.shape, dtype=torch.int32, pin_memory=pin)
        self._np_ints, self._np_bt, self._np_kv = self._h_ints.numpy(), self._h_bt.numpy(), self._h_kv.numpy()
        self._copied = torch.cuda.Event() if pin else None  # the last staging -> device copies
        self.n = 0  # live rows of the last fill
        self.plan = None
        if not use_reference:
            # device-resident metadata + the q_len/token counts given: the plan reads nothing back and
            # its KV bound is max_blocks * block_size, so num_splits and the workspace are fixed
            self.plan = _fast.PagedAttentionPlan(self.block_table, self.kv_lens, self.cu_q_lens, num_q_heads=num_q_heads,
                                                 num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                                                 causal=True, max_q_len=1, num_tokens=b, device=dev)
            assert self.plan.block_table is self.block_table and self.plan.kv_lens is self.kv_lens, "plan copied the static metadata"
        self._ref_attention = _fast.reference.paged_attention  # use_reference: the model's ops run the reference too

    def row(self, name: str) -> torch.Tensor:
        """The device row of an int input (`positions`, `slots` or an extra), [b] int64."""
        return self.ints[self.row_names.index(name)]

    @property
    def positions(self) -> torch.Tensor:
        return self.ints[0]

    @property
    def slots(self) -> torch.Tensor:
        return self.ints[1]

    def attend(self, q, k_cache, v_cache) -> torch.Tensor:
        """Paged attention of the b rows over the static metadata (what every layer calls)."""
        if self.plan is not None:
            return self.plan.run(q, k_cache, v_cache)
        return self._ref_attention(q, k_cache, v_cache, self.block_table, self.kv_lens, self.cu_q_lens, causal=True)

    def fill(self, *, positions: Sequence[int], slots: Sequence[int], blocks: Sequence[Sequence[int]], kv_lens: Sequence[int],
             x=None, **extra: Sequence[int]) -> None:
        """Write n <= b live rows; rows n..b-1 become padding (scratch page, kv_len 1, zero input).
        `x`: a tensor [n, ...] or a list of row tensors (on the device); `extra`: the extra int rows."""
        n = len(positions)
        if not 1 <= n <= self.b or not len(slots) == len(blocks) == len(kv_lens) == n:
            raise ValueError(f"StaticBatch.fill: 1..{self.b} rows with one position, slot, block list and kv_len each; got "
                             f"{n}, {len(slots)}, {len(blocks)}, {len(kv_lens)}")
        if set(extra) != set(self.row_names[2:]):
            raise ValueError(f"StaticBatch.fill: extra rows {sorted(self.row_names[2:])} expected, got {sorted(extra)}")
        if self._copied is not None:
            self._copied.synchronize()  # last tick's copies read the staging buffers; done long ago in practice
        hi, hb, hk = self._np_ints, self._np_bt, self._np_kv
        hi[0, :n], hi[0, n:] = positions, 0
        hi[1, :n], hi[1, n:] = slots, self.pad_slot
        for j, name in enumerate(self.row_names[2:], 2):
            hi[j, :n], hi[j, n:] = extra[name], 0
        hb[:] = self.scratch
        for i, blk in enumerate(blocks):
            if len(blk) > self.max_blocks:
                raise ValueError(f"StaticBatch.fill: row {i} holds {len(blk)} pages, the bucket's block table has {self.max_blocks}")
            hb[i, :len(blk)] = blk
        hk[:n], hk[n:] = kv_lens, 1
        if self.x is not None:
            if x is None:
                raise ValueError("StaticBatch.fill: x (the rows' inputs) is required for this batch")
            if isinstance(x, torch.Tensor):
                self.x[:n].copy_(x)
            else:
                torch.cat(list(x), 0, out=self.x[:n])
            if n < self.b:
                self.x[n:].zero_()
        nb = self.device.type == "cuda"
        self.ints.copy_(self._h_ints, non_blocking=nb)
        if self.plan is not None:
            self.plan.update(block_table=self._h_bt, kv_lens=self._h_kv)
        else:
            self.block_table.copy_(self._h_bt, non_blocking=nb)
            self.kv_lens.copy_(self._h_kv, non_blocking=nb)
        if self._copied is not None:
            self._copied.record()
        self.n = n


class GraphRunner:
    """`fn(batch) -> tensor` over a StaticBatch per bucket. `capture` records it as a CUDA graph (CUDA
    only); `replay(n, **rows)` fills the bucket for n rows and replays its graph, or runs `fn` eagerly
    on the same buffers when it is not captured (CPU). Returns a view `out[:n]` of the bucket's output
    buffer: valid until the next replay of that bucket."""

    def __init__(self, fn: Callable[[StaticBatch], torch.Tensor], batches: Dict[int, StaticBatch]):
        if not batches:
            raise ValueError("GraphRunner: at least one bucket")
        self.fn = fn
        self.batches = dict(sorted(batches.items()))
        self.buckets = tuple(self.batches)
        self.graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}
        self.pool = None  # one private memory pool shared by every bucket's graph
        self.replays = 0
        self.eager_runs = 0

    def batch_for(self, n: int) -> Optional[StaticBatch]:
        b = bucket_for(n, self.buckets)
        return None if b is None else self.batches[b]

    def _run_fn(self, sb: StaticBatch) -> None:
        res = self.fn(sb)
        if sb.out is None:  # the first run (warm-up, before any capture) allocates the output buffer
            sb.out = torch.empty_like(res)
        sb.out.copy_(res)

    def capture(self, bucket: int, warmup: int = 2) -> None:
        """Warm up on a side stream (lazy initialisations, the output buffer), then capture one run of
        fn on the bucket's buffers, filled with padding rows only (they touch nothing but the scratch page)."""
        sb = self.batches[bucket]
        if sb.device.type != "cuda":
            raise RuntimeError(f"GraphRunner.capture: CUDA graphs need a CUDA device, the batch is on {sb.device}")
        pad = dict(positions=[0], slots=[sb.pad_slot], blocks=[[sb.scratch]], kv_lens=[1],
                   **{k: [0] for k in sb.row_names[2:]})
        if sb.x is not None:
            pad["x"] = torch.zeros_like(sb.x[:1])
        sb.fill(**pad)
        side = torch.cuda.Stream(sb.device)
        side.wait_stream(torch.cuda.current_stream(sb.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._run_fn(sb)
        torch.cuda.current_stream(sb.device).wait_stream(side)
        torch.cuda.synchronize(sb.device)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g, pool=self.pool):
            self._run_fn(sb)
        if self.pool is None:
            self.pool = g.pool()
        self.graphs[bucket] = g

    def capture_all(self) -> None:
        """Every bucket, largest first (smaller graphs then reuse the pool's blocks)."""
        for b in sorted(self.buckets, reverse=True):
            self.capture(b)

    def replay(self, n: int, **rows) -> torch.Tensor:
        sb = self.batch_for(n)
        if sb is None:
            raise ValueError(f"GraphRunner.replay: {n} rows exceed the largest bucket {self.buckets[-1]}")
        sb.fill(**rows)
        g = self.graphs.get(sb.b)
        if g is not None:
            g.replay()
            self.replays += 1
        else:
            self._run_fn(sb)
            self.eager_runs += 1
        return sb.out[:n]

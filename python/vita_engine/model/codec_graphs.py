"""The steady codec window on static buffers, captured as a CUDA graph per (row bucket, tokens).

A steady slab push (`codec._Slab.push`) of n tokens for any set of parked rows is translation
invariant: every signal's live region, compute ranges and output range sit at the same offsets
relative to the rows' token position. For a fixed row count B and token count n it is therefore
one fixed sequence of kernels over fixed shapes, which `SlabStep` runs on buffers that never move:

* inputs: `rows` [B] (slab rows; padded rows point at the slab's scratch row 0, whose contents are
  garbage by design) and `tokens` [B, n] (padded rows: id 0), staged in one pinned host buffer and
  copied to the device with one non_blocking copy;
* gather: `index_select(slab.bufs[k], rows, out=<first width_k samples of signal k>)`;
* the token embedding: `index_select(embedding, tokens, out=staging)` + one copy into signal 0;
* every node's kernels (`_Node.launches`: the ops' own `_C.conv1d` / `_C.conv_transpose1d` calls,
  with `out=` views of the static buffers and DLPack views prepared once);
* scatter: `slab.bufs[k].index_copy_(0, rows, <new live region of signal k>)`;
* the new samples: copied into the static output [B, hop * n] float32.

Nothing in the step allocates on the device (its only tensors are the static buffers and the slab's,
the capsules are views made at build time) or reads a device value on the host. The kernels do
neither either (csrc/cuda/conv1d.cu: "No host synchronisation and no allocation in the launch path").
The static signal buffers are shared by every step (sized for the largest bucket and token count;
a step uses its [:B, :, :width_k + U_k * n] corner): steps run one at a time on one stream.

`CodecSlabGraphs` holds the steps of one codec: buckets (the engine's `cuda_graph_buckets`) x the
token counts the codec stage pushes in steady state (`windows`, from the policy). It fixes the
slab's capacity (`_Slab.reserve`: captured graphs hold its addresses) and captures every step on
CUDA (`capture`). `push(graphs, tokens)` pads the rows up to the bucket, replays the step's graph
(or runs the same step eagerly: on CPU, and on CUDA before capture) and returns a copy of the live
rows' samples (the one allocation of a push, after the replay). Output = `_Slab.push` = offline
`decode()`, bit for bit (tests/test_codec_graphs.py).

Not captured: the first window of a turn and the rest pushed at its end (start transient / any n:
`push_many` runs them as before), steady pushes of a token count without a step, groups larger than
the largest bucket (split into bucket-size pieces), and streams that found the fixed slab full
(they stay on their own buffers). A slab moved after capture (`reserve` for more rows by a second
engine on the same codec) or reloaded weights make the steps rebuild their static views and drop
their graphs (eager from then on, with a warning).

STATUS: the static step runs (eagerly) in the CPU tests and the engine with `cuda_graphs=True`; its
capture/replay on CUDA (`capture`, tests/test_codec_graphs.py `cuda` tests, scripts/gpu_graphs_check.sh)
has NOT yet run on a GPU.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ops._lib import stream_of
from .codec import Codec, _Graph

__all__ = ["SlabStep", "CodecSlabGraphs"]

_N0 = 4096  # the canonical token position the steps run at (any steady position gives the same offsets)


def _check_sizes(value, option: str) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{option}: expected a sequence of positive ints, got {type(value).__name__} {value!r}")
    vals = list(value)
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{option}: expected a non-empty sequence of positive ints, got {value!r}")
    return tuple(sorted(set(vals)))


class SlabStep:
    """One (bucket B, tokens n) steady slab push on the static buffers of its `CodecSlabGraphs`."""

    def __init__(self, owner: "CodecSlabGraphs", B: int, n: int):
        self.owner, self.B, self.n = owner, B, n
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self._build()

    def _build(self) -> None:
        o, B, n = self.owner, self.B, self.n
        c, slab = o.codec, o.codec.slab
        g = _Graph(c, B)
        for k, s in enumerate(g.sigs):
            s.buf = o.bufs[k][:B, :, :slab.width[k] + s.U * n]
            s.start, s.end, s.total = s.U * _N0 + slab.keep[k], s.U * _N0 + slab.end[k], None
        self.gather = [(k, s.buf[:, :, :slab.width[k]]) for k, s in enumerate(g.sigs) if slab.width[k]]
        self.rows = o.ints[:B]
        self.tokens = o.ints[o.max_bucket:o.max_bucket + B * n]
        self.staging = o.staging[:B * n]
        w0 = slab.width[0]  # signal 0 is the embedding (U = 1): the new tokens go after its live samples
        self.emb_dst = g.emb.buf[:, :, w0:w0 + n]
        self.emb_src = self.staging.view(B, n, c.code_dim).transpose(1, 2)
        # the kernels, exactly as _Graph.run would call them for a push of n tokens (no final edge)
        g.emb.end = _N0 + n
        self.launches: List[tuple] = []
        for node in g.nodes:
            t0, t1 = node.out.end, node.limit()
            if t1 > t0:
                self.launches.extend(node.launches(t0, t1))
                node.out.end = t1
        N1 = _N0 + n
        self.scatter = []
        for k, s in enumerate(g.sigs):
            a = s.U * N1 + slab.keep[k]
            if s.end != s.U * N1 + slab.end[k] or min(s.keep_from(), s.end) != a:
                raise RuntimeError(f"codec graphs: the step (B={B}, n={n}) leaves the steady layout at signal {k}")
            if slab.width[k]:
                self.scatter.append((k, s.view(a, s.end)))
        a, b = g.out.U * _N0 + slab.emitted, g.out.end
        if b - a != c.hop_length * n:
            raise RuntimeError(f"codec graphs: the step (B={B}, n={n}) emits {b - a} samples, expected {c.hop_length * n}")
        self.y_src = g.out.view(a, b)[:, 0]
        self.y = o.out[:B, :b - a]
        self._g = g  # keeps the views' owner alive (the capsules hold the views themselves)

    def run(self) -> None:
        """gather -> embedding -> kernels -> scatter -> samples, on the static buffers and the slab."""
        bufs = self.owner.codec.slab.bufs
        st = stream_of(self.y)
        for k, dst in self.gather:
            torch.index_select(bufs[k], 0, self.rows, out=dst)
        torch.index_select(self.owner.emb, 0, self.tokens, out=self.staging)
        self.emb_dst.copy_(self.emb_src)
        for fn, args in self.launches:
            fn(*args, st)
        for k, src in self.scatter:
            bufs[k].index_copy_(0, self.rows, src)
        self.y.copy_(self.y_src)


class CodecSlabGraphs:
    """The static steady steps of one codec: `buckets` (row counts) x `windows` (token counts).
    `rows`: the slab capacity fixed now (streams parked at once; more stay unparked, exact)."""

    def __init__(self, codec: Codec, buckets: Sequence[int], windows: Sequence[int], rows: int):
        if not isinstance(codec, Codec):
            raise TypeError(f"CodecSlabGraphs: codec must be a Codec, got {type(codec).__name__}")
        codec._check_loaded()
        self.codec = codec
        self.buckets = _check_sizes(buckets, "CodecSlabGraphs buckets")
        self.windows = _check_sizes(windows, "CodecSlabGraphs windows")
        self.max_bucket, nmax = self.buckets[-1], self.windows[-1]
        slab = codec.slab
        slab.reserve(rows)
        dev, dt = codec.device, codec.dtype
        dry = _Graph(codec, 1, dry=True).sigs
        self.bufs = [torch.empty(self.max_bucket, s.C, slab.width[k] + s.U * nmax, dtype=dt, device=dev) for k, s in enumerate(dry)]
        if codec.poison_buffers:
            for b in self.bufs:
                b.fill_(float("nan"))
        # int64 inputs of every step: rows [max_bucket], then tokens [B * n] (row-major [B, n])
        size = self.max_bucket * (1 + nmax)
        self.ints = torch.zeros(size, dtype=torch.int64, device=dev)
        pin = dev.type == "cuda"
        self._h_ints = torch.zeros(size, dtype=torch.int64, pin_memory=pin)
        self._np = self._h_ints.numpy()
        self._copied = torch.cuda.Event() if pin else None  # the last staging -> device copy
        self.staging = torch.empty(self.max_bucket * nmax, codec.code_dim, dtype=dt, device=dev)
        self.out = torch.zeros(self.max_bucket, codec.hop_length * nmax, dtype=torch.float32, device=dev)
        self.emb = codec._emb
        self._generation = slab.generation
        self.steps: Dict[Tuple[int, int], SlabStep] = {(b, n): SlabStep(self, b, n) for b in self.buckets for n in self.windows}
        self.pool = None
        self.replays = 0
        self.eager_runs = 0

    @property
    def graphs(self) -> Dict[Tuple[int, int], "torch.cuda.CUDAGraph"]:
        return {k: s.graph for k, s in self.steps.items() if s.graph is not None}

    def has(self, n: int) -> bool:
        return n in self.windows

    def step_for(self, rows: int, n: int) -> Optional[SlabStep]:
        if n not in self.windows:
            return None
        for b in self.buckets:
            if b >= rows:
                return self.steps[(b, n)]
        return None

    def _check_current(self) -> None:
        """The slab moved or the weights were reloaded since the steps were built: rebuild their
        views (the gather/scatter read slab.bufs at each run, the kernels' capsules do not) and drop
        the graphs, whose addresses are stale."""
        c = self.codec
        if self._generation == c.slab.generation and self.emb is c._emb:
            return
        stale = [k for k, s in self.steps.items() if s.graph is not None]
        if stale:
            warnings.warn(f"codec graphs: the codec's slab moved or its weights were reloaded after capture; "
                          f"{len(stale)} captured steps dropped, they run eagerly from now on", stacklevel=3)
        self.emb, self._generation = c._emb, c.slab.generation
        for s in self.steps.values():
            s.graph = None
            s._build()

    def _fill(self, step: SlabStep, rows: Sequence[int], tokens: Sequence[torch.Tensor]) -> None:
        live, B, n, off = len(rows), step.B, step.n, self.max_bucket
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy read the staging buffer (long done: its samples were read)
        h = self._np
        h[:live] = rows
        h[live:B] = self.codec.slab.SCRATCH
        if live:
            h[off:off + live * n] = np.concatenate([t.numpy() for t in tokens])
        h[off + live * n:off + B * n] = 0
        self.ints.copy_(self._h_ints, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()

    def push(self, graphs: List[_Graph], tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parked steady `graphs` (at most max_bucket), host int64 `tokens` of n = a window each ->
        [len(graphs), hop * n] float32 samples (a copy)."""
        n = int(tokens[0].numel()) if tokens else 0
        step = self.step_for(len(graphs), n)
        if step is None or len(tokens) != len(graphs) or any(int(t.numel()) != n for t in tokens):
            raise ValueError(f"CodecSlabGraphs.push: 1..{self.max_bucket} graphs with {self.windows} tokens each, got "
                             f"{len(graphs)} graphs and token counts {[int(t.numel()) for t in tokens]}")
        rows = [g.row for g in graphs]
        if None in rows:
            raise RuntimeError("CodecSlabGraphs.push: every graph must be parked in the slab")
        self._check_current()
        self._fill(step, rows, tokens)
        if step.graph is not None:
            step.graph.replay()
            self.replays += 1
        else:
            step.run()
            self.eager_runs += 1
        y = step.y[:len(graphs)].clone()
        hop = self.codec.hop_length
        for g in graphs:
            g.n_tokens += n
            g.emitted += hop * n
        return y

    def capture(self, warmup: int = 2) -> int:
        """Capture every step as a CUDA graph (largest first, one memory pool); CUDA only (elsewhere
        the steps run eagerly: returns 0). The captures run on padding rows only (scratch row, id 0)."""
        if self.codec.device.type != "cuda":
            return 0
        self._check_current()
        dev = self.codec.device
        for (b, n) in sorted(self.steps, reverse=True):
            step = self.steps[(b, n)]
            self._fill(step, [], [])
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    step.run()
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(g, pool=self.pool):
                step.run()
            if self.pool is None:
                self.pool = g.pool()
            step.graph = g
        torch.cuda.synchronize(dev)
        return len(self.steps)

"""Batched TTS AR decoding over one shared paged KV pool (spec §5; docs/architecture.md §5 "the scheduler batches
decode steps of all sessions").

`TTSBatchDecoder` owns one `PagedKVCache` (all AR layers) shared by up to `max_streams` streams.
A stream is one text segment handed to the TTS:

* `start(text_ids, seed=...)` runs the NAR decoder and the bidirectional AR prefix prefill
  `[emb(bos), NAR_out]` (positions 0..P-1, P = split*N + 1) into the stream's own pages and returns
  a stream id. `start_many` packs several segments into one NAR call and one prefill call.
* `step()` runs ONE AR step for every given (default: every active, unfinished) stream: each feeds
  its last token (sos first) at its own position; all q_len = 1 rows are packed into one forward
  through `store_kv` + `paged_attention` (via the model's `OpsHandle`), then top-k sampling with
  `ops.sample_tokens(seed=stream seed, step=stream's own step index)`.

Batching does not change what a stream samples: the sampling kernel is keyed by (seed, step) only,
and every other op is row-wise, so a stream's logits differ from its solo run only by float
rounding of the batched GEMMs (CPU GEMM blocking depends on the row count), which in practice
never changes the sampled token.

Semantics and choices (documented for the runtime):

* Admission control: `start` reserves, up front, every page the stream can ever need
  (prefix + `max_tokens` KV entries). A started stream therefore never runs out of pages mid
  generation, and `TTSCapacityError` is only ever raised by `start`/`start_many`, before any state
  changes (other streams are untouched).
* A stream emits at most `max_tokens` codec tokens. The step at which it samples eos, or the first
  step after it has emitted `max_tokens` tokens, returns `{sid: None}`; it is then finished and its
  pages go back to the pool at once (its tokens stay readable until `release`). Every stream's
  step sequence therefore ends with exactly one `None`.
* A finished stream still holds its stream slot until `release(sid)`. `release` is valid at any
  time (barge-in) and idempotent for ids this decoder issued.
* Emitted tokens are always codec ids `0 <= t < V`: bos/sos/pad (V, V+1, V+3) are excluded from
  sampling. The reference samples over all V+4 logits; a trained decoder never puts those three in
  its top-2, so this only matters for random weights, where it keeps the codec input valid.
* Sampling is softmax + top-k (config `decoder_topk`, 2) at temperature 1, as the reference
  (`penalty_window_size = -1`, no repetition penalty).
* CUDA graphs (`graph_buckets`, the engine's `cuda_graphs`): the AR step's forward (embedding ->
  AR stack -> masked logits) runs on static buffers per batch-size bucket (runtime/graphs.py), captured
  by `capture_graphs()` on CUDA, eager on the same buffers on CPU. The pool then has one extra page,
  the scratch page of the padded rows, never a stream's. Sampling stays outside the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops as _ops_pkg
from .layers import PagedKVCache, linear

__all__ = ["TTSBatchDecoder", "TTSCapacityError", "DEFAULT_SEGMENT_TEXT_TOKENS"]

#: default pool sizing: every stream slot gets room for a segment of this many text tokens + the cap
DEFAULT_SEGMENT_TEXT_TOKENS = 64

_MAX_SEED = 2**63


class TTSCapacityError(RuntimeError):
    """No free stream slot or not enough free KV pages for a new TTS segment."""


@dataclass
class _Stream:
    sid: int
    row: int
    seed: int
    prefix_len: int  # P = split*N + 1
    blocks: List[int]
    tokens: List[int] = field(default_factory=list)
    n_steps: int = 0  # AR steps run (= tokens sampled, eos included)
    last: int = -1  # last sampled token (sos before the first step)
    finished: bool = False


class TTSBatchDecoder:
    """See the module docstring. `tts` is a loaded `TTSDecoder`; its `ops` handle picks the kernels.

    max_streams: stream slots (started and not yet released).
    block_size: tokens per KV page.
    num_blocks: pages in the shared pool; default `max_streams * ceil((split*64 + 1 + max_tokens) / block_size)`
        (every slot can hold a 64-text-token segment decoded to the cap).
    max_tokens: per-stream cap on emitted codec tokens; default the config's (1000, as the reference).
    topk: sampling top-k; default the config's `decoder_topk` (2).
    """

    def __init__(self, tts, *, max_streams: int = 64, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_tokens: Optional[int] = None, topk: Optional[int] = None, graph_buckets: Optional[Sequence[int]] = None):
        c = tts.config
        if max_streams < 1 or block_size < 1:
            raise ValueError(f"TTSBatchDecoder: max_streams and block_size must be >= 1, got {max_streams}, {block_size}")
        self.tts = tts
        self.max_streams = int(max_streams)
        self.block_size = bs = int(block_size)
        self.max_tokens = int(c.max_tokens if max_tokens is None else max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"TTSBatchDecoder: max_tokens must be >= 1, got {self.max_tokens}")
        self.topk = int(c.topk if topk is None else topk)
        if num_blocks is None:
            per = -(-(tts.split * DEFAULT_SEGMENT_TEXT_TOKENS + 1 + self.max_tokens) // bs)
            num_blocks = self.max_streams * per
        if num_blocks < 1:
            raise ValueError(f"TTSBatchDecoder: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.head_dim = c.hidden // c.num_heads
        self.device, self.dtype = tts.device, tts.dtype
        extra = graph_buckets is not None  # the scratch page: the last one, never on the free list
        self.cache = PagedKVCache(c.num_blocks, self.num_blocks + extra, bs, c.num_heads, self.head_dim, self.dtype, self.device)
        self.scratch_block = self.cache.free.pop(0) if extra else None
        self._streams: Dict[int, _Stream] = {}
        self._free_rows = list(range(self.max_streams - 1, -1, -1))
        self._next_sid = 0
        self._table = torch.zeros(self.max_streams, 1, dtype=torch.int32, device=self.device)  # row -> pages
        self._arange = torch.arange(self.max_streams + 1, dtype=torch.int32, device=self.device)
        V = c.odim
        mask = torch.zeros(V + 4, dtype=torch.float32, device=self.device)
        mask[[tts.bos, tts.sos, tts.pad]] = float("-inf")
        self._logit_mask = mask
        self._graphs = None
        if graph_buckets is not None:
            self._init_graphs(graph_buckets)

    # ---- bookkeeping ---------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self.cache.free)

    def active(self) -> List[int]:
        """Stream ids started and not released (finished ones included), ascending."""
        return sorted(self._streams)

    def _get(self, sid) -> _Stream:
        s = self._streams.get(sid)
        if s is None:
            state = "was released" if isinstance(sid, int) and 0 <= sid < self._next_sid else "is unknown"
            raise KeyError(f"TTSBatchDecoder: stream {sid!r} {state}")
        return s

    def finished(self, sid) -> bool:
        return self._get(sid).finished

    def tokens(self, sid) -> List[int]:
        return list(self._get(sid).tokens)

    def _free_pages(self, s: _Stream) -> None:
        self.cache.free.extend(reversed(s.blocks))
        s.blocks = []

    def release(self, sid) -> None:
        """Free the stream's pages and slot (valid mid-generation). Releasing twice is a no-op."""
        s = self._streams.pop(sid, None)
        if s is None:
            if isinstance(sid, int) and 0 <= sid < self._next_sid:
                return
            raise KeyError(f"TTSBatchDecoder: stream {sid!r} is unknown")
        self._free_pages(s)
        self._free_rows.append(s.row)

    def _finish(self, s: _Stream) -> None:
        s.finished = True
        self._free_pages(s)

    # ---- prefill -------------------------------------------------------------------------------------
    def _pages_for(self, prefix_len: int) -> int:
        return -(-(prefix_len + self.max_tokens) // self.block_size)

    def start(self, text_ids, *, seed: int) -> int:
        """NAR + AR prefix prefill of one text segment -> stream id. Raises TTSCapacityError (nothing changed)
        when no slot or not enough pages are free."""
        return self.start_many([text_ids], [seed])[0]

    @torch.inference_mode()
    def start_many(self, texts: Sequence, seeds: Sequence[int]) -> List[int]:
        """Start several segments with one packed NAR call and one packed prefill call. All or nothing:
        on TTSCapacityError or bad input no stream is started."""
        tts = self.tts
        texts, seeds = list(texts), list(seeds)
        if len(texts) != len(seeds):
            raise ValueError(f"TTSBatchDecoder.start_many: {len(texts)} texts but {len(seeds)} seeds")
        if not texts:
            return []
        ids = [tts.check_text_ids(t) for t in texts]
        for sd in seeds:
            if isinstance(sd, bool) or not isinstance(sd, int) or not 0 <= sd < _MAX_SEED:
                raise ValueError(f"TTSBatchDecoder.start: seed must be an int in [0, 2**63), got {sd!r}")
        plens = [tts.split * x.numel() + 1 for x in ids]
        need = [self._pages_for(p) for p in plens]
        if len(texts) > len(self._free_rows):
            raise TTSCapacityError(
                f"TTSBatchDecoder: no free stream slot ({len(self._streams)} of max_streams={self.max_streams} in use, "
                f"{len(texts)} requested); release finished streams or raise max_streams")
        if sum(need) > self.free_blocks:
            raise TTSCapacityError(
                f"TTSBatchDecoder: KV pool exhausted: {sum(need)} pages needed (prefix {plens} + max_tokens {self.max_tokens}, "
                f"block_size {self.block_size}), {self.free_blocks} of {self.num_blocks} free")

        # NAR, packed (bidirectional within each segment)
        x = torch.cat([tts.text_embeddings(t) for t in ids], 0)
        nlen = [p - 1 for p in plens]
        cu = torch.tensor([0] + list(_cumsum(nlen)), dtype=torch.int32, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in nlen])
        nar = tts._stack(tts.nar_layers, x, pos, lambda i, q, k, v: tts.ops.varlen_attention(q, k, v, cu, causal=False))

        # allocate (cannot fail: checked above)
        streams = []
        for p, n, sd in zip(plens, need, seeds):
            blocks = [self.cache.free.pop() for _ in range(n)]
            s = _Stream(sid=self._next_sid, row=self._free_rows.pop(), seed=int(sd), prefix_len=p, blocks=blocks, last=tts.sos)
            self._next_sid += 1
            streams.append(s)
        try:
            width = max(len(s.blocks) for s in streams)
            if width > self._table.shape[1]:
                t = torch.zeros(self.max_streams, width, dtype=torch.int32, device=self.device)
                t[:, : self._table.shape[1]] = self._table
                self._table = t
            for s in streams:
                self._table[s.row, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)

            # AR prefix prefill, packed: [emb(bos), NAR_out] per segment at positions 0..P-1, bidirectional
            bos = tts.embedding[tts.bos : tts.bos + 1]
            xs, o = [], 0
            for n in nlen:
                xs += [bos, nar[o : o + n].to(self.dtype)]
                o += n
            xa = torch.cat(xs, 0)
            bs = self.block_size
            posa = torch.cat([torch.arange(p, device=self.device) for p in plens])
            blk = torch.cat([torch.tensor(s.blocks, dtype=torch.int64)[torch.arange(s.prefix_len) // bs] for s in streams])
            slots = (blk * bs + torch.cat([torch.arange(p) for p in plens]) % bs).to(self.device)
            rows = torch.tensor([s.row for s in streams], dtype=torch.long, device=self.device)
            bt = self._table.index_select(0, rows)[:, :width]
            kv_lens = torch.tensor(plens, dtype=torch.int32, device=self.device)
            cuq = torch.tensor([0] + list(_cumsum(plens)), dtype=torch.int32, device=self.device)
            self._run(xa, posa, slots, bt, kv_lens, cuq, causal=False, max_q_len=max(plens))
        except BaseException:
            for s in streams:
                self._free_pages(s)
                self._free_rows.append(s.row)
            raise
        for s in streams:
            self._streams[s.sid] = s
        return [s.sid for s in streams]

    def _run(self, x, positions, slots, block_table, kv_lens, cu_q, causal: bool, max_q_len: int = 1) -> torch.Tensor:
        """The AR stack over packed rows whose k/v go to `slots`; returns the final hidden states."""
        tts, cache = self.tts, self.cache
        ops = tts.ops
        c = tts.config
        # one plan per forward (host-known max_q_len and token count: no sync), run by every layer
        run = ops.paged_attention_plan(block_table, kv_lens, cu_q, num_q_heads=c.num_heads, num_kv_heads=c.num_heads,
                                       head_dim=c.hidden // c.num_heads, block_size=cache.k[0].shape[1], causal=causal,
                                       device=x.device, max_q_len=max_q_len, num_tokens=x.shape[0])

        def attn(i, q, k, v):
            ops.store_kv(k, v, cache.k[i], cache.v[i], slots)
            return run(q, cache.k[i], cache.v[i])

        return tts._stack(tts.ar_layers, x, positions, attn)

    # ---- decode --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, stream_ids: Optional[Iterable[int]] = None) -> Dict[int, Optional[int]]:
        """One batched AR step -> {sid: codec token, or None when that stream just finished (eos or cap)}.
        Streams already finished map to None without work; unknown/released ids raise KeyError."""
        if stream_ids is None:
            sids = [sid for sid in sorted(self._streams) if not self._streams[sid].finished]
        else:
            sids = list(dict.fromkeys(stream_ids))
        out: Dict[int, Optional[int]] = {}
        run: List[_Stream] = []
        for sid in sids:
            s = self._get(sid)
            if s.finished:
                out[sid] = None
            elif len(s.tokens) >= self.max_tokens:
                self._finish(s)
                out[sid] = None
            else:
                run.append(s)
        if not run:
            return out
        tts, bs, B = self.tts, self.block_size, len(run)
        if self._graphs is not None and self._graph_ok(run):
            logits, seed, stp = self._graph_logits(run)
        else:
            # one host->device copy of the per-row ints: token, position, seed, step index, table row
            host = torch.tensor([[s.last for s in run], [s.prefix_len + s.n_steps for s in run], [s.seed for s in run],
                                 [s.n_steps for s in run], [s.row for s in run]], dtype=torch.int64)
            width = max((s.prefix_len + s.n_steps) // bs for s in run) + 1
            d = host.to(self.device, non_blocking=True)
            tok, pos, seed, stp, rows = d[0], d[1], d[2], d[3], d[4]
            bt = self._table.index_select(0, rows)[:, :width]
            slots = bt.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
            kv_lens = (pos + 1).to(torch.int32)
            h = self._run(F.embedding(tok, tts.embedding), pos, slots, bt, kv_lens, self._arange[: B + 1], causal=True)
            logits = self.logits(h)
        new = _ops_pkg.sample_tokens(logits, temperature=1.0, top_k=self.topk, seed=seed, step=stp).tolist()
        for s, t in zip(run, new):
            s.n_steps += 1
            s.last = t
            if t == tts.eos:
                self._finish(s)
                out[s.sid] = None
            else:
                s.tokens.append(t)
                out[s.sid] = t
        return out

    # ---- CUDA graphs (runtime/graphs.py) -----------------------------------------------------------------
    def _init_graphs(self, buckets: Sequence[int]) -> None:
        from ..runtime.graphs import GraphRunner, StaticBatch, capture_supported, check_buckets

        c, tts = self.tts.config, self.tts
        # static block-table width: the pages of a 64-text-token segment decoded to the cap (a longer
        # segment's steps past it run eagerly)
        self._graph_width = -(-(tts.split * DEFAULT_SEGMENT_TEXT_TOKENS + 1 + self.max_tokens) // self.block_size)
        batches = {b: StaticBatch(b, max_blocks=self._graph_width, block_size=self.block_size, scratch_block=self.scratch_block,
                                  device=self.device, num_q_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=self.head_dim,
                                  extra_rows=("tokens", "seed", "step"), use_reference=tts.ops.use_reference)
                   for b in check_buckets(buckets, "graph_buckets")}
        self._graphs = GraphRunner(self._graph_step, batches)
        self._graphs_capturable = not tts.ops.use_reference and capture_supported(self.head_dim, self.device, "cuda_graphs (TTS AR step)")

    def _graph_step(self, sb) -> torch.Tensor:
        tts, cache = self.tts, self.cache
        ops = tts.ops

        def attn(i, q, k, v):
            ops.store_kv(k, v, cache.k[i], cache.v[i], sb.slots)
            return sb.attend(q, cache.k[i], cache.v[i])

        x = F.embedding(sb.row("tokens"), tts.embedding)
        return self.logits(tts._stack(tts.ar_layers, x, sb.positions, attn))

    def capture_graphs(self) -> None:
        """Capture the AR step per bucket (CUDA with the CUDA attention kernels; else a no-op: the
        buckets run eagerly). Needs `graph_buckets`."""
        if self._graphs is None:
            raise RuntimeError("TTSBatchDecoder.capture_graphs: built without graph_buckets")
        if self._graphs_capturable:
            self._graphs.capture_all()

    def _graph_ok(self, run: List[_Stream]) -> bool:
        return (self._graphs.batch_for(len(run)) is not None
                and all((s.prefix_len + s.n_steps) // self.block_size < self._graph_width for s in run))

    def _graph_logits(self, run: List[_Stream]):
        bs, n = self.block_size, len(run)
        pos = [s.prefix_len + s.n_steps for s in run]
        logits = self._graphs.replay(
            n, positions=pos, slots=[s.blocks[p // bs] * bs + p % bs for s, p in zip(run, pos)],
            blocks=[s.blocks[: p // bs + 1] for s, p in zip(run, pos)], kv_lens=[p + 1 for p in pos],
            tokens=[s.last for s in run], seed=[s.seed for s in run], step=[s.n_steps for s in run])
        sb = self._graphs.batch_for(n)
        return logits, sb.row("seed")[:n], sb.row("step")[:n]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + out_fnn, float32, with bos/sos/pad masked out -> [rows, V+4]."""
        tts = self.tts
        h = tts.ops.rms_norm(h, tts.norm, tts.config.rms_eps)
        return linear(tts.ops, h, tts.out_w, tts.out_b).float() + self._logit_mask


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t

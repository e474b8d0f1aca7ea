"""TiCodec synthesis (VITA-1.5 speech output): codebook lookup + HiFi-GAN v1 style generator.

    tokens -> embedding [B, code_dim, n] -> conv_pre -> per stage: lrelu + ConvTranspose1d,
    MRF = mean of ResBlock1 over resblock kernels, + global vector where channels == global_dim
    -> lrelu -> conv_post -> tanh -> waveform (hop = prod(upsample_rates) samples per token, 24 kHz)

Every convolution runs through `vita_engine.ops.conv1d` / `conv_transpose1d` with the activation,
bias, residual add, MRF mean (alpha = 1/num_kernels, accumulated in place) and final tanh fused.
The global vector is folded into the bias of the last conv of the last resblock of that stage:
    mean_k(R_k) + g = (1/nk) * (sum_{k<nk-1} R_k + (R_last + nk*g)).

Streaming (`Codec.stream()`) is exact: every signal of the graph keeps the tail of its samples that
its consumers still need plus its own output position, each layer computes only samples whose
receptive field is complete, and `flush()` applies the right-edge zero padding of a full decode.
For any split of a token sequence into pushes the concatenated output equals `decode()`.

`Codec.push_many` batches streams: those in the same state, and steady ones (past the start transient)
at any position, since a steady stream's next push is a translation of any other's; steady streams keep
their state in a per-codec slab (`_Slab`) so a batch costs one gather and one scatter per signal.
For a fixed row count and token count that steady push is a fixed kernel sequence: codec_graphs.py
runs it on static buffers (captured as CUDA graphs; that capture has NOT yet run on a GPU).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..ops._lib import _C, dl, dl_opt, stream_of

__all__ = ["Codec", "CodecStream", "CodecWeightsError"]

# VITA's ticodec/models.py: every LeakyReLU of the generator, the one before conv_post included,
# uses the module constant LRELU_SLOPE = 0.1 (HiFi-GAN's 0.01 default is another codebase's choice).
LRELU_SLOPE = 0.1


class CodecWeightsError(ValueError):
    """The codec state dict is missing keys or has mis-shaped tensors."""


def _same_pad(k: int, d: int) -> Tuple[int, int]:
    span = d * (k - 1)
    return span // 2, span - span // 2


class Codec(torch.nn.Module):
    """TiCodec generator + quantiser lookup. See the module docstring.

    config: the parsed `vita_tts_ckpt/codec/model.json`. Weights: `load_folded_state_dict(sd)`.
    """

    def __init__(self, config: dict, device="cpu", dtype=torch.float32):
        super().__init__()
        cfg = dict(config)

        def need(key):
            if key not in cfg:
                raise ValueError(f"codec config: missing key {key!r} (have {sorted(cfg)})")
            return cfg[key]

        self.upsample_rates = [int(r) for r in need("upsample_rates")]
        self.upsample_kernel_sizes = [int(k) for k in need("upsample_kernel_sizes")]
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise ValueError("codec config: upsample_rates and upsample_kernel_sizes must be non-empty and of equal length")
        self.upsample_initial_channel = int(need("upsample_initial_channel"))
        if str(cfg.get("resblock", "1")) != "1":
            raise ValueError(f"codec config: only resblock '1' (ResBlock1) is supported, got {cfg.get('resblock')!r}")
        self.resblock_kernel_sizes = [int(k) for k in need("resblock_kernel_sizes")]
        dil = need("resblock_dilation_sizes")
        if dil and not isinstance(dil[0], (list, tuple)):
            dil = [dil] * len(self.resblock_kernel_sizes)
        self.resblock_dilation_sizes = [[int(d) for d in ds] for ds in dil]
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            raise ValueError("codec config: resblock_dilation_sizes needs one list per resblock kernel size")
        for k in self.resblock_kernel_sizes:
            if k % 2 == 0:
                raise ValueError(f"codec config: resblock kernel sizes must be odd ('same' padding), got {k}")
        self.n_codes = int(need("n_codes"))
        if int(cfg.get("n_code_groups", 1)) != 1 or int(cfg.get("residul_layer", 1)) != 1:
            raise ValueError("codec config: only n_code_groups == 1 and residul_layer == 1 (one codebook) are supported, got "
                             f"{cfg.get('n_code_groups')} / {cfg.get('residul_layer')}")
        self.global_code_num = int(need("global_code_num"))
        self.global_tokens = [int(t) for t in need("global_tokens")]
        if len(self.global_tokens) != self.global_code_num:
            raise ValueError(f"codec config: global_tokens has {len(self.global_tokens)} entries, global_code_num is {self.global_code_num}")
        for t in self.global_tokens:
            if not 0 <= t < self.n_codes:
                raise ValueError(f"codec config: global token {t} outside [0, {self.n_codes})")
        self.code_dim = int(cfg.get("code_dim", 512))
        self.global_dim = int(cfg.get("global_dim", 128))
        if self.global_dim % self.global_code_num:
            raise ValueError(f"codec config: global_dim {self.global_dim} is not divisible by global_code_num {self.global_code_num}")
        # VITA's code has no config key for the slope; a model.json that sets one anyway is refused
        # rather than silently changing the numbers.
        for key in ("leaky_relu_slope", "final_leaky_relu_slope"):
            if key in cfg and float(cfg[key]) != LRELU_SLOPE:
                raise ValueError(f"codec config: {key}={cfg[key]!r} is not supported: VITA's generator uses LeakyReLU({LRELU_SLOPE}) throughout")
        self.lrelu_slope = LRELU_SLOPE
        self.hop_length = int(math.prod(self.upsample_rates))
        self.sample_rate = int(cfg.get("sampling_rate", 24000))
        self.num_kernels = len(self.resblock_kernel_sizes)
        self.channels = [self.upsample_initial_channel // (2 ** (i + 1)) for i in range(len(self.upsample_rates))]
        self.device = torch.device(device)
        self.dtype = dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Codec: dtype must be float32, float16 or bfloat16, got {dtype}")
        self._shapes = self._expected_shapes()
        self.loaded = False
        self._p: Dict[str, torch.Tensor] = {}
        self._lookahead = None
        self._steady_rel = None
        self._merged: Dict[int, "_Graph"] = {}  # push_many's merged graphs, pooled per batch size
        self._slab: Optional["_Slab"] = None
        # counters of push_many (calls, graph pushes run, batched pushes, streams in batched pushes)
        self.push_stats = {"calls": 0, "pushes": 0, "batched_pushes": 0, "batched_streams": 0, "graph_pushes": 0,
                           "graph_streams": 0, "slab_full": 0}
        # debug: fill every fresh streaming buffer with NaN so a read outside the written samples shows
        self.poison_buffers = False

    # ---- weights ------------------------------------------------------------------------------------

    def _expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        U, s = self.upsample_initial_channel, {}
        s["generator.conv_pre.weight"] = (U, self.code_dim, 7)
        s["generator.conv_pre.bias"] = (U,)
        cin = U
        for i, (k, ch) in enumerate(zip(self.upsample_kernel_sizes, self.channels)):
            s[f"generator.ups.{i}.weight"] = (cin, ch, k)
            s[f"generator.ups.{i}.bias"] = (ch,)
            for j, (rk, ds) in enumerate(zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)):
                r = i * self.num_kernels + j
                for c in ("convs1", "convs2"):
                    for m in range(len(ds)):
                        s[f"generator.resblocks.{r}.{c}.{m}.weight"] = (ch, ch, rk)
                        s[f"generator.resblocks.{r}.{c}.{m}.bias"] = (ch,)
            cin = ch
        s["generator.conv_post.weight"] = (1, cin, 7)
        s["generator.conv_post.bias"] = (1,)
        s["quantizer.quantizer_modules.0.embedding.weight"] = (self.n_codes, self.code_dim)
        for g in range(self.global_code_num):
            s[f"quantizer.quantizer_modules_globaltokens.{g}.embedding.weight"] = (self.n_codes, self.global_dim // self.global_code_num)
        return s

    def load_folded_state_dict(self, sd: Dict[str, torch.Tensor]) -> "Codec":
        """Load generator/quantizer tensors (weight norm already folded); extra keys are ignored."""
        missing = [k for k in self._shapes if k not in sd]
        bad = [f"{k}: expected {list(v)}, got {list(sd[k].shape)}" for k, v in self._shapes.items()
               if k in sd and tuple(sd[k].shape) != v]
        if missing or bad:
            msg = ["codec state dict does not match the configuration:"]
            if missing:
                msg.append(f"  missing {len(missing)} keys: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
            if bad:
                msg.append("  mis-shaped: " + "; ".join(bad[:20]))
            raise CodecWeightsError("\n".join(msg))
        p = {k: sd[k].detach().to(self.device, self.dtype).contiguous() for k in self._shapes}
        gvec = torch.cat([sd[f"quantizer.quantizer_modules_globaltokens.{g}.embedding.weight"][t].float()
                          for g, t in enumerate(self.global_tokens)]).to(self.device)
        self._gvec = gvec  # float32 [global_dim]
        # Fold the global add into the bias of the MRF's last conv at the global stages.
        self._bias_folded = {}
        for i, ch in enumerate(self.channels):
            if ch == self.global_dim:
                r = i * self.num_kernels + self.num_kernels - 1
                m = len(self.resblock_dilation_sizes[-1]) - 1
                key = f"generator.resblocks.{r}.convs2.{m}.bias"
                self._bias_folded[key] = (sd[key].float().to(self.device) + self.num_kernels * gvec).to(self.dtype).contiguous()
        self._p = p
        self._emb = p["quantizer.quantizer_modules.0.embedding.weight"]
        self.loaded = True
        return self

    def _w(self, key):
        return self._p[key]

    def _b(self, key, folded=True):
        if folded and key in self._bias_folded:
            return self._bias_folded[key]
        return self._p[key]

    def _check_loaded(self):
        if not self.loaded:
            raise RuntimeError("Codec: weights not loaded (call load_folded_state_dict first)")

    # ---- token validation -------------------------------------------------------------------------

    def _tokens(self, codec_tokens, ndim: int = 1, what: str = "codec_tokens", on_device: bool = True) -> torch.Tensor:
        """Validated int64 ids on self.device (on the host with on_device=False)."""
        t = codec_tokens
        if isinstance(t, np.ndarray):
            if not np.issubdtype(t.dtype, np.integer):
                raise TypeError(f"Codec: {what} must hold integers, got numpy dtype {t.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(t).astype(np.int64))
        elif isinstance(t, (list, tuple)):
            try:
                t = torch.tensor(t) if len(t) else torch.zeros((0,) * ndim, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"Codec: {what} must be a (nested) list of ints of equal lengths ({e})") from None
            if t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"Codec: {what} must be integers, got elements of type {t.dtype}")
        elif isinstance(t, torch.Tensor):
            if t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
                raise TypeError(f"Codec: {what} must be an integer tensor, got {t.dtype}")
        else:
            raise TypeError(f"Codec: {what} must be a list, numpy array or torch tensor of ints, got {type(t).__name__}")
        if t.dim() != ndim:
            shape = "[len]" if ndim == 1 else "[batch, len]"
            raise ValueError(f"Codec: {what} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.n_codes:
                raise ValueError(f"Codec: {what} must be in [0, {self.n_codes}), got values in [{lo}, {hi}]")
        return t.to(self.device if on_device else "cpu", torch.int64)

    def _lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n] ids -> [B, code_dim, n] in self.dtype (time-dense)."""
        return self._emb[tokens].transpose(1, 2).contiguous()

    # ---- full decode ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, codec_tokens, use_reference: bool = False) -> torch.Tensor:
        """1-D ids (list / numpy / torch int) -> float32 waveform [len * hop_length] on self.device."""
        self._check_loaded()
        t = self._tokens(codec_tokens)
        return self._decode(t[None], use_reference)[0]

    @torch.no_grad()
    def decode_batch(self, codec_tokens, use_reference: bool = False) -> torch.Tensor:
        """[B, len] ids (equal lengths) -> float32 waveforms [B, len * hop_length]."""
        self._check_loaded()
        t = self._tokens(codec_tokens, ndim=2)
        return self._decode(t, use_reference)

    def _decode(self, t: torch.Tensor, use_reference: bool) -> torch.Tensor:
        B, n = t.shape
        if n == 0 or B == 0:
            return torch.zeros(B, n * self.hop_length, dtype=torch.float32, device=self.device)
        x = self._lookup(t)
        y = self._generator_ref(x) if use_reference else self._generator(x)
        return y[:, 0].float()

    def _generator(self, x: torch.Tensor) -> torch.Tensor:
        x = ops.conv1d(x, self._w("generator.conv_pre.weight"), self._b("generator.conv_pre.bias"), padding="same")
        for i, (u, k) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
            up = ops.conv_transpose1d(x, self._w(f"generator.ups.{i}.weight"), self._b(f"generator.ups.{i}.bias"), stride=u,
                                      padding=(k - u) // 2, lrelu_slope=self.lrelu_slope)
            xs = torch.empty_like(up)
            tmp = torch.empty_like(up)
            xa = torch.empty_like(up)
            for j, (rk, ds) in enumerate(zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)):
                r = f"generator.resblocks.{i * self.num_kernels + j}"
                src = up
                for m, d in enumerate(ds):
                    ops.conv1d(src, self._w(f"{r}.convs1.{m}.weight"), self._b(f"{r}.convs1.{m}.bias"), padding="same", dilation=d,
                               lrelu_slope=self.lrelu_slope, out=tmp)
                    w2, b2 = self._w(f"{r}.convs2.{m}.weight"), self._b(f"{r}.convs2.{m}.bias")
                    if m < len(ds) - 1:
                        ops.conv1d(tmp, w2, b2, padding="same", lrelu_slope=self.lrelu_slope, residual=src, out=xa)
                        src = xa
                    else:
                        ops.conv1d(tmp, w2, b2, padding="same", lrelu_slope=self.lrelu_slope, residual=src,
                                   alpha=1.0 / self.num_kernels, accum=xs if j > 0 else None, beta=1.0, out=xs)
            x = xs
        return ops.conv1d(x, self._w("generator.conv_post.weight"), self._b("generator.conv_post.bias"), padding="same",
                          lrelu_slope=self.lrelu_slope, tanh=True)

    def _generator_ref(self, x: torch.Tensor) -> torch.Tensor:
        """The same graph with torch.nn.functional (unfused, global vector added explicitly)."""
        x = F.conv1d(x, self._w("generator.conv_pre.weight"), self._b("generator.conv_pre.bias", False), padding=3)
        for i, (u, k) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = F.conv_transpose1d(x, self._w(f"generator.ups.{i}.weight"), self._b(f"generator.ups.{i}.bias", False), stride=u,
                                   padding=(k - u) // 2)
            xs = None
            for j, (rk, ds) in enumerate(zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)):
                r = f"generator.resblocks.{i * self.num_kernels + j}"
                h = x
                for m, d in enumerate(ds):
                    t = F.conv1d(F.leaky_relu(h, self.lrelu_slope), self._w(f"{r}.convs1.{m}.weight"), self._b(f"{r}.convs1.{m}.bias", False),
                                 padding=d * (rk - 1) // 2, dilation=d)
                    t = F.conv1d(F.leaky_relu(t, self.lrelu_slope), self._w(f"{r}.convs2.{m}.weight"), self._b(f"{r}.convs2.{m}.bias", False),
                                 padding=(rk - 1) // 2)
                    h = t + h
                xs = h if xs is None else xs + h
            x = xs / self.num_kernels
            if x.shape[-2] == self.global_dim:
                x = x + self._gvec.to(x.dtype)[None, :, None]
        x = F.leaky_relu(x, self.lrelu_slope)
        x = F.conv1d(x, self._w("generator.conv_post.weight"), self._b("generator.conv_post.bias", False), padding=3)
        return torch.tanh(x)

    # ---- streaming --------------------------------------------------------------------------------

    def stream(self, batch: int = 1) -> "CodecStream":
        """An exact streaming decoder. `push(tokens)` -> new samples; `flush()` -> the rest."""
        self._check_loaded()
        return CodecStream(self, batch)

    @property
    def lookahead_samples(self) -> int:
        """Output samples held back in steady state: after n tokens, n*hop - lookahead_samples are final."""
        if self._lookahead is None:
            n0 = 4096
            g = _Graph(self, 1, dry=True)
            g.run(n0, final=False)
            self._lookahead = n0 * self.hop_length - g.out.end
        return self._lookahead

    @property
    def lookahead_tokens(self) -> int:
        """Tokens that must follow token i before all of token i's samples are final (from the layer config)."""
        return -(-self.lookahead_samples // self.hop_length)

    @property
    def steady_rel_ends(self) -> Tuple[int, ...]:
        """Per signal of the graph, `end - U * n_tokens` in steady state (U: the signal's cumulative
        upsample factor): a constant, so the ends of a steady stream are an affine function of its tokens."""
        if self._steady_rel is None:
            n0 = 4096
            g = _Graph(self, 1, dry=True)
            g.run(n0, final=False)
            g.n_tokens, g.emitted = n0, g.out.end  # what a push and its _take leave
            self._steady_rel = g.rel_ends()
        return self._steady_rel

    @property
    def slab(self) -> "_Slab":
        if self._slab is None:
            self._slab = _Slab(self)
        return self._slab

    @torch.no_grad()
    def push_many(self, streams: Sequence["CodecStream"], token_lists: Sequence, graphs=None) -> List[torch.Tensor]:
        """Advance many single-sequence streams of this codec, batching those that can share one step:
        streams in the same state (tokens pushed so far), and steady streams (past the start transient,
        see `_Graph.steady`) in any state, receiving the same number of tokens. Each kernel then runs
        once per group; the rest run alone. Returns the new samples of each stream, in order.
        `graphs` (a codec_graphs.CodecSlabGraphs of this codec): steady groups whose token count it
        holds a static step for run on it (padded to a row bucket; captured on CUDA), the rest as above.
        `push_stats` counts the calls, the graph pushes they ran, the streams in batched pushes, the
        static-step runs and their streams, and the steady streams left unparked by a full slab."""
        if len(streams) != len(token_lists):
            raise ValueError(f"push_many: {len(streams)} streams but {len(token_lists)} token lists")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("push_many: a stream appears more than once (concatenate its tokens instead)")
        if graphs is not None and getattr(graphs, "codec", None) is not self:
            raise TypeError("push_many: graphs must be a CodecSlabGraphs built for this codec")
        toks = [self._tokens(t, on_device=False) for t in token_lists]  # on the host: static steps stage them
        groups: Dict[tuple, List[int]] = {}
        st = self.push_stats
        for idx, (s, t) in enumerate(zip(streams, toks)):
            if not isinstance(s, CodecStream) or s.codec is not self:
                raise TypeError("push_many: every stream must come from this codec's stream()")
            if s.batch != 1:
                raise ValueError("push_many: streams must be single-sequence (stream(batch=1))")
            g, n = s._graph, int(t.numel())
            # a steady stream's next push is a translation of any other steady stream's: steady streams
            # keep their state in the slab (parked), where any of them batch with any other
            if g.row is None and g.steady():
                if self.slab.room():
                    self.slab.park(g)
                else:  # a fixed slab is full: this stream stays on its own buffers (exact, unbatched)
                    st["slab_full"] += 1
            key = ("steady", n) if g.row is not None else ("exact", n, g.n_tokens, g.finished)
            groups.setdefault(key, []).append(idx)
        out: List[Optional[torch.Tensor]] = [None] * len(streams)
        st["calls"] += 1
        for key, idxs in groups.items():
            if key[0] == "steady" and graphs is not None and graphs.has(key[1]):
                for a in range(0, len(idxs), graphs.max_bucket):
                    part = idxs[a:a + graphs.max_bucket]
                    y = graphs.push([streams[i]._graph for i in part], [toks[i] for i in part])
                    for row, i in enumerate(part):
                        out[i] = y[row]
                    st["pushes"] += 1
                    st["graph_pushes"] += 1
                    st["graph_streams"] += len(part)
                    if len(part) > 1:
                        st["batched_pushes"] += 1
                        st["batched_streams"] += len(part)
                continue
            st["pushes"] += 1
            if len(idxs) == 1:
                i = idxs[0]
                out[i] = streams[i].push(toks[i])
                continue
            st["batched_pushes"] += 1
            st["batched_streams"] += len(idxs)
            batch = torch.stack([toks[i] for i in idxs]).to(self.device)
            if key[0] == "steady":
                y = self.slab.push([streams[i]._graph for i in idxs], batch)
                for row, i in enumerate(idxs):
                    out[i] = y[row]
                continue
            merged = _Graph.stack([streams[i]._graph for i in idxs])
            y = merged.push(batch)
            for row, (i, g) in enumerate(zip(idxs, merged.unstack())):
                streams[i]._graph = g
                out[i] = y[row]
        return out  # type: ignore[return-value]


# ---- streaming graph ----------------------------------------------------------------------------------

class _Sig:
    """A [B, C, time] signal known on [0, end); buf holds [start, start + cap) (absolute indices).
    U: samples per token at this signal (the product of the upsample rates before it)."""

    def __init__(self, B, C, dtype, device, dry, U=1, poison=False):
        self.B, self.C, self.dtype, self.device, self.dry = B, C, dtype, device, dry
        self.U, self.poison = U, poison
        self.start = 0
        self.end = 0
        self.total = None  # full length once the input is final
        self.buf = None if dry else torch.empty(B, C, 0, dtype=dtype, device=device)
        self.consumers: List["_Node"] = []

    def keep_from(self) -> int:
        if not self.consumers:
            return self.end
        return max(0, min(c.need_from(self) for c in self.consumers))

    def view(self, a: int, b: int) -> torch.Tensor:
        assert self.start <= a <= b <= self.start + self.buf.shape[-1], (self.start, a, b, self.buf.shape)
        return self.buf[:, :, a - self.start: b - self.start]

    def reserve(self, b: int) -> None:
        """Make room for writing up to absolute index b (drops samples no consumer needs)."""
        if self.dry or b <= self.start + self.buf.shape[-1]:
            return
        keep = min(self.keep_from(), self.end)
        live = self.end - keep
        cap = max(2 * (b - keep), 64)
        nb = self.empty(cap)
        if live > 0:
            nb[:, :, :live] = self.view(keep, self.end)
        self.buf, self.start = nb, keep

    def empty(self, cap: int) -> torch.Tensor:
        nb = torch.empty(self.B, self.C, cap, dtype=self.dtype, device=self.device)
        return nb.fill_(float("nan")) if self.poison else nb


class _Node:
    out: _Sig

    def need_from(self, sig: _Sig) -> int:
        raise NotImplementedError

    def limit(self) -> int:
        """How far the output can be computed now."""
        raise NotImplementedError

    def launches(self, t0: int, t1: int) -> List[tuple]:
        """The kernel calls computing out[t0, t1) as (fn, args), run as fn(*args, stream). The args
        are DLPack views of the current buffers (the kernels read them, never consume them), so a
        static layout (codec_graphs.SlabStep) prepares them once and reuses them on every run."""
        raise NotImplementedError

    def compute(self, t0: int, t1: int) -> None:
        st = stream_of(self.out.buf)
        for fn, args in self.launches(t0, t1):
            fn(*args, st)


class _Conv(_Node):
    """Stride-1 conv, 'same'-style padding (pl, pr); optional lrelu / residual / accumulate / tanh."""

    def __init__(self, x: _Sig, out: _Sig, w, b, K, d, slope, residual: Optional[_Sig] = None, alpha=1.0, accum=False, tanh=False):
        self.x, self.out, self.w, self.b, self.K, self.d, self.slope = x, out, w, b, K, d, slope
        self.pl, self.pr = _same_pad(K, d)
        self.residual, self.alpha, self.accum, self.tanh = residual, alpha, accum, tanh
        x.consumers.append(self)
        if residual is not None:
            residual.consumers.append(self)

    def full_len(self):
        return self.x.total + self.pl + self.pr - self.d * (self.K - 1)

    def need_from(self, sig):
        return self.out.end if sig is self.residual else self.out.end - self.pl

    def unclipped(self):
        """The next compute range (from out.end) reads no left zero padding: it translates with the stream."""
        return self.out.end - self.pl >= 0

    def limit(self):
        lim = self.full_len() if self.x.total is not None else self.x.end - (self.d * (self.K - 1) - self.pl)
        if self.residual is not None:
            lim = min(lim, self.residual.end)
        return max(lim, self.out.end)

    def launches(self, t0, t1):
        # the arguments ops.conv1d passes to the kernel (right padding: implied by out's length)
        lo, hi = t0 - self.pl, t1 + self.d * (self.K - 1) - self.pl
        a, b = max(lo, 0), min(hi, self.x.end)
        if a > b:
            raise RuntimeError(f"codec: conv input range [{a}, {b}) does not cover outputs [{t0}, {t1})")
        o = self.out.view(t0, t1)
        res = self.residual.view(t0, t1) if self.residual is not None else None
        slope = None if self.slope is None else float(self.slope)
        return [(_C.conv1d, (dl(self.x.view(a, b)), dl(self.w), dl_opt(self.b), dl(o), dl_opt(res), dl(o) if self.accum else None,
                             a - lo, int(self.d), slope, float(self.alpha), 1.0 if self.accum else 0.0, bool(self.tanh)))]


class _ConvT(_Node):
    def __init__(self, x: _Sig, out: _Sig, w, b, K, s, p, slope):
        self.x, self.out, self.w, self.b, self.K, self.s, self.p, self.slope = x, out, w, b, K, s, p, slope
        x.consumers.append(self)

    def full_len(self):
        n = self.x.total
        return 0 if n == 0 else (n - 1) * self.s - 2 * self.p + self.K

    def _j0(self, t0):
        return max(0, -(-(t0 + self.p - self.K + 1) // self.s))

    def need_from(self, sig):
        return self._j0(self.out.end)

    def unclipped(self):
        return self.out.end + self.p - self.K + 1 >= 0

    def limit(self):
        lim = self.full_len() if self.x.total is not None else self.s * self.x.end - self.p
        return max(lim, self.out.end)

    def launches(self, t0, t1):
        j0 = self._j0(t0)
        j1 = min(self.x.end, (t1 - 1 + self.p) // self.s + 1)
        j1 = max(j1, j0)
        o = self.out.view(t0, t1)
        x = self.x.view(j0, j1)
        return [(_C.conv_transpose1d, (dl(x), dl(self.w), dl_opt(self.b), dl(o), self.s, t0 + self.p - self.s * j0, self.slope))]


class _MRF(_Node):
    """The last convs of all resblocks of a stage: they accumulate into one output, so they advance together."""

    def __init__(self, convs: List[_Conv]):
        self.convs = convs
        self.out = convs[0].out

    def limit(self):
        return min(c.limit() for c in self.convs)

    def unclipped(self):
        return all(c.unclipped() for c in self.convs)

    def launches(self, t0, t1):
        return [call for c in self.convs for call in c.launches(t0, t1)]


class _Graph:
    """The generator as a list of streaming nodes over [B, C, time] signals."""

    def __init__(self, codec: Codec, B: int, dry: bool = False):
        self.codec, self.B, self.dry = codec, B, dry
        c = codec
        dt, dev = c.dtype, c.device
        sigs: List[_Sig] = []
        poison = bool(getattr(c, "poison_buffers", False))
        U = 1

        def sig(C):
            s = _Sig(B, C, dt, dev, dry, U, poison)
            sigs.append(s)
            return s

        W = (lambda k: None) if dry else c._w
        Bf = (lambda k: None) if dry else c._b
        nodes: List[_Node] = []
        self.emb = sig(c.code_dim)
        x = sig(c.upsample_initial_channel)
        nodes.append(_Conv(self.emb, x, W("generator.conv_pre.weight"), Bf("generator.conv_pre.bias"), 7, 1, None))
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            ch = c.channels[i]
            U *= u
            up = sig(ch)
            nodes.append(_ConvT(x, up, W(f"generator.ups.{i}.weight"), Bf(f"generator.ups.{i}.bias"), k, u, (k - u) // 2, c.lrelu_slope))
            xs = sig(ch)
            last = []
            for j, (rk, ds) in enumerate(zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)):
                r = f"generator.resblocks.{i * c.num_kernels + j}"
                src = up
                for m, d in enumerate(ds):
                    t = sig(ch)
                    nodes.append(_Conv(src, t, W(f"{r}.convs1.{m}.weight"), Bf(f"{r}.convs1.{m}.bias"), rk, d, c.lrelu_slope))
                    w2, b2 = W(f"{r}.convs2.{m}.weight"), Bf(f"{r}.convs2.{m}.bias")
                    if m < len(ds) - 1:
                        nxt = sig(ch)
                        nodes.append(_Conv(t, nxt, w2, b2, rk, 1, c.lrelu_slope, residual=src))
                        src = nxt
                    else:
                        last.append(_Conv(t, xs, w2, b2, rk, 1, c.lrelu_slope, residual=src, alpha=1.0 / c.num_kernels, accum=j > 0))
            nodes.append(_MRF(last))
            x = xs
        self.out = sig(1)
        nodes.append(_Conv(x, self.out, W("generator.conv_post.weight"), Bf("generator.conv_post.bias"), 7, 1, c.lrelu_slope, tanh=True))
        self.nodes, self.sigs = nodes, sigs
        self.n_tokens = 0
        self.finished = False
        self.emitted = 0
        self._steady = False
        self.row: Optional[int] = None  # the slab row holding this graph's state while parked
        self._release = None

    def run(self, n_tokens: int, final: bool):
        """Dry or real pass: advance every node as far as its inputs allow."""
        self.emb.end = n_tokens
        if final:
            self.emb.total = n_tokens
        for node in self.nodes:
            t0 = node.out.end
            t1 = node.limit()
            if final and self._inputs_final(node):
                node.out.total = node.full_len() if not isinstance(node, _MRF) else node.convs[0].full_len()
            if t1 > t0:
                if not self.dry:
                    node.out.reserve(t1)
                    node.compute(t0, t1)
                node.out.end = t1

    @staticmethod
    def _inputs_final(node) -> bool:
        if isinstance(node, _MRF):
            return all(_Graph._inputs_final(c) for c in node.convs)
        ok = node.x.total is not None
        res = getattr(node, "residual", None)
        return ok and (res is None or res.total is not None)

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, n] validated ids -> [B, new_samples] float32."""
        if self.finished:
            raise RuntimeError("CodecStream: push after flush()")
        if self.row is not None:
            return self.codec.slab.push([self], tokens)
        n = tokens.shape[1]
        if n:
            self.emb.reserve(self.n_tokens + n)
            self.emb.view(self.n_tokens, self.n_tokens + n).copy_(self.codec._lookup(tokens))
            self.n_tokens += n
        self.run(self.n_tokens, final=False)
        return self._take()

    def flush(self) -> torch.Tensor:
        if self.finished:
            return torch.zeros(self.B, 0, dtype=torch.float32, device=self.codec.device)
        if self.row is not None:
            self.codec.slab.unpark(self)
        self.run(self.n_tokens, final=True)
        self.finished = True
        return self._take()

    def _take(self) -> torch.Tensor:
        a, b = self.emitted, self.out.end
        self.emitted = b
        if b <= a:
            return torch.zeros(self.B, 0, dtype=torch.float32, device=self.codec.device)
        return self.out.view(a, b)[:, 0].float().clone()

    # ---- batching of independent streams ---------------------------------------------------------
    # Without the final right edge, every end is a function of n_tokens only (each limit() depends on its
    # inputs' ends). Once no node's compute range is clipped at index 0, end_k = U_k * n_tokens - c_k and
    # the next push's index arithmetic is translation invariant: shifting every signal k of a stream by
    # D * U_k gives another stream's push, D tokens further on. Steady streams therefore live in the
    # codec's `_Slab` and batch with each other whatever their positions; streams in the start transient
    # batch only in identical states (stack / unstack).

    def rel_ends(self) -> Tuple[int, ...]:
        """end - U * n_tokens per signal, and the same for the emitted samples (equal for steady streams)."""
        n = self.n_tokens
        return tuple(s.end - s.U * n for s in self.sigs) + (self.emitted - self.out.U * n,)

    def steady(self) -> bool:
        """Past the start transient: ends at their steady offsets and no compute range clipped at 0
        (cached: ends only grow while the stream is not flushed)."""
        if self._steady:
            return not self.finished
        if self.dry or self.finished or self.B != 1 or self.rel_ends() != self.codec.steady_rel_ends:
            return False
        self._steady = all(node.unclipped() for node in self.nodes)
        return self._steady

    @staticmethod
    def stack(graphs: List["_Graph"]) -> "_Graph":
        """One graph holding the rows of `graphs` (all in the same state). The merged graph object is
        pooled per batch size (building one costs more than a small push)."""
        g0 = graphs[0]
        codec = g0.codec
        m = codec._merged.pop(sum(g.B for g in graphs), None) or _Graph(codec, sum(g.B for g in graphs))
        for idx, s in enumerate(m.sigs):
            parts = [g.sigs[idx] for g in graphs]
            p0 = parts[0]
            keep = min(min(p.keep_from(), p.end) for p in parts)
            if any(keep < p.start or p.end != p0.end for p in parts):
                raise RuntimeError("codec push_many: the live regions of the batched streams do not line up")
            live = p0.end - keep
            s.start, s.end, s.total = keep, p0.end, p0.total
            s.buf = s.empty(live) if live <= 0 else torch.cat([p.view(keep, p.end) for p in parts], 0)
        m.n_tokens, m.finished, m.emitted = g0.n_tokens, g0.finished, g0.emitted
        m._parts = list(graphs)
        return m

    def unstack(self) -> List["_Graph"]:
        """Write the rows back into the stacked graphs and return them; each holds a compact copy of
        what its consumers still need, so the merged buffers are freed at once."""
        live = []
        for src in self.sigs:
            keep = min(src.keep_from(), src.end)
            live.append((keep, src.buf[:, :, keep - src.start:src.end - src.start].clone()))
            src.buf = None
        row = 0
        for g in self._parts:
            for s, src, (keep, buf) in zip(g.sigs, self.sigs, live):
                s.start, s.end, s.total = keep, src.end, src.total
                s.buf = buf[row:row + g.B]
            g.n_tokens, g.finished, g.emitted = self.n_tokens, self.finished, self.emitted
            row += g.B
        out, self._parts = self._parts, []
        self.codec._merged[self.B] = self
        return out


class _Slab:
    """The state of the steady (parked) streams of a codec, one row per stream. A steady stream's live
    region of signal k is [keep_k, end_k) with keep_k - U_k * n_tokens and end_k - U_k * n_tokens the
    same for every steady stream, so each signal is one [rows, C_k, W_k] tensor and a push of any set of
    rows gathers one tensor per signal into a merged graph (in the coordinates of the first row's
    stream), runs it, and scatters the new live regions back. Rows are freed by flush() or when the
    stream's graph is collected (a turn dropped without a flush).

    Row 0 is a scratch row, never a stream's: the padded rows of a static step (codec_graphs.py) read
    and write it, so its contents are garbage by design. The slab grows on demand (new tensors, every
    row copied: `generation` counts the moves) unless `reserve` fixed its capacity: captured graphs
    hold its addresses, so a fixed slab never moves, and a steady stream that finds it full stays on
    its own buffers (`room()` false: exact, unbatched)."""

    SCRATCH = 0

    def __init__(self, codec: Codec):
        self.codec = codec
        n0 = 4096
        g = _Graph(codec, 1, dry=True)
        g.run(n0, final=False)
        g.n_tokens, g.emitted = n0, g.out.end
        if not all(node.unclipped() for node in g.nodes):  # the layout below assumes a steady graph
            raise RuntimeError("codec: the streaming graph is not steady after 4096 tokens")
        self.keep = [min(s.keep_from(), s.end) - s.U * n0 for s in g.sigs]  # relative keep per signal
        self.end = [s.end - s.U * n0 for s in g.sigs]
        self.width = [e - k for k, e in zip(self.keep, self.end)]
        self.emitted = g.emitted - g.out.U * n0
        self.U = [s.U for s in g.sigs]
        self.bufs: List[torch.Tensor] = []
        self.rows = 0  # rows of bufs, the scratch row included
        self.free: List[int] = []
        self.fixed = False
        self.generation = 0  # bumped whenever bufs are reallocated

    def _alloc(self, n: int) -> None:
        c, new = self.codec, []
        for k, s in enumerate(_Graph(c, 1, dry=True).sigs):
            b = torch.empty(n, s.C, self.width[k], dtype=c.dtype, device=c.device)
            if c.poison_buffers:
                b.fill_(float("nan"))
            if self.rows:
                b[:self.rows].copy_(self.bufs[k])
            new.append(b)
        self.free.extend(range(n - 1, max(self.rows, self.SCRATCH + 1) - 1, -1))
        self.bufs, self.rows = new, n
        self.generation += 1

    def _grow(self) -> None:
        self._alloc(max(8, 2 * self.rows))

    @property
    def capacity(self) -> int:
        """Stream rows (the scratch row excluded)."""
        return max(0, self.rows - 1)

    def room(self) -> bool:
        """Can a stream be parked now (a free row, or the slab may grow)?"""
        return bool(self.free) or not self.fixed

    def reserve(self, streams: int) -> None:
        """Fix the capacity at >= `streams` stream rows: allocated now (moving the slab once if it
        holds fewer), never grown or moved afterwards."""
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"codec slab reserve: streams must be an int >= 1, got {streams!r}")
        if self.capacity < streams:
            self._alloc(streams + 1)
        self.fixed = True

    def park(self, g: "_Graph") -> None:
        """Move a steady graph's live regions into a slab row (its own buffers are dropped)."""
        import weakref

        if g.rel_ends() != self.codec.steady_rel_ends:
            raise RuntimeError("codec: parking a stream that is not steady")
        if not self.free:
            if self.fixed:
                raise RuntimeError(f"codec: the slab is full ({self.capacity} rows, fixed by reserve); check room() first")
            self._grow()
        row = self.free.pop()
        N = g.n_tokens
        for k, s in enumerate(g.sigs):
            a = s.U * N + self.keep[k]
            self.bufs[k][row].copy_(s.view(a, s.end)[0])
            s.buf = None
        g.row = row
        g._release = weakref.finalize(g, self.free.append, row)

    def unpark(self, g: "_Graph") -> None:
        """Give a parked graph its own buffers back (before its flush)."""
        row, N = g.row, g.n_tokens
        for k, s in enumerate(g.sigs):
            s.start, s.end = s.U * N + self.keep[k], s.U * N + self.end[k]
            s.buf = self.bufs[k][row:row + 1].clone()
        g.row = None
        g._release()  # the row is free again
        g._release = None

    def push(self, graphs: List["_Graph"], tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] for the parked `graphs` -> [B, new samples] float32."""
        B, n = tokens.shape
        c = self.codec
        rows = torch.tensor([g.row for g in graphs], dtype=torch.long, device=c.device)
        N = graphs[0].n_tokens  # the merged graph runs in the first stream's coordinates
        m = c._merged.pop(B, None) or _Graph(c, B)
        for k, s in enumerate(m.sigs):
            U = self.U[k]
            s.start, s.end, s.total = U * N + self.keep[k], U * N + self.end[k], None
            s.buf = s.empty(self.width[k] + U * n)  # room for this push: no reallocation in reserve
            torch.index_select(self.bufs[k], 0, rows, out=s.buf[:, :, :self.width[k]])
        m.n_tokens, m.finished, m.emitted = N, False, m.out.U * N + self.emitted
        y = m.push(tokens)
        N1 = N + n
        for k, s in enumerate(m.sigs):
            a = self.U[k] * N1 + self.keep[k]
            if s.end != self.U[k] * N1 + self.end[k] or min(s.keep_from(), s.end) != a:
                raise RuntimeError("codec: a steady push left the steady layout")
            self.bufs[k].index_copy_(0, rows, s.buf[:, :, a - s.start:s.end - s.start])
            s.buf = None
        c._merged[B] = m
        for g in graphs:
            g.n_tokens += n
            g.emitted += m.out.U * n
        return y


class CodecStream:
    """Exact streaming codec decode (see `Codec.stream`).

    push(tokens) -> float32 samples whose receptive field is complete (1-D for batch 1, else
    [batch, n] with tokens [batch, n]); flush() -> the remaining samples (right-edge zero padding as in
    decode()). `lookahead_tokens`: tokens that must follow a token before its samples are final.
    """

    def __init__(self, codec: Codec, batch: int = 1):
        self.codec = codec
        self.batch = int(batch)
        if self.batch < 1:
            raise ValueError(f"Codec.stream: batch must be >= 1, got {batch}")
        self._graph = _Graph(codec, self.batch)
        self.lookahead_tokens = codec.lookahead_tokens
        self.lookahead_samples = codec.lookahead_samples

    @property
    def tokens_pushed(self) -> int:
        return self._graph.n_tokens

    @property
    def samples_emitted(self) -> int:
        return self._graph.emitted

    @torch.no_grad()
    def push(self, tokens) -> torch.Tensor:
        if self.batch == 1:
            t = self.codec._tokens(tokens)[None]
            return self._graph.push(t)[0]
        t = self.codec._tokens(tokens, ndim=2, what="tokens")
        if t.shape[0] != self.batch:
            raise ValueError(f"CodecStream.push: tokens must be [{self.batch}, n], got {tuple(t.shape)}")
        return self._graph.push(t)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        y = self._graph.flush()
        return y[0] if self.batch == 1 else y

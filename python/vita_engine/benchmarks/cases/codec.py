"""The codec generator's convolutions at the real layer shapes (512 -> 32 channels, upsample rates
[8, 5, 5, 3], resblock kernels 3/7/11 with dilations 1/3/5) for one second of audio (40 tokens) at
batch 1, and the streaming decoder at the real configuration.

Conv references: F.leaky_relu + F.conv1d / F.conv_transpose1d with the padding passed to the conv
(+ the residual add, + tanh for conv_post), which is what the unfused generator does.

Stream references (plain torch, exact): a torch generator cannot keep state across pushes, so it
re-decodes a window of tokens around the new samples: the left receptive field (LEFT_CONTEXT
tokens, exact to 1e-7 in fp32) + the new tokens + the look-ahead, and keeps the samples that are
final. `check` verifies the window reproduces our streamed samples."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from ..models import FULL_CODEC, cached
from ._spec import Spec, dtype_name, randn, rel_err

SLOPE = 0.1  # model/codec.py LRELU_SLOPE (VITA's)
TOKENS = 40  # one second of audio at 24 kHz, hop 600
LEFT_CONTEXT = 12  # tokens: the generator's left receptive field (10 already gives 1e-6)


def _stage_shapes():
    """(stage index, channels in, channels out, kernel, rate, input length) of each upsample stage."""
    c = FULL_CODEC
    cin, T, out = c["upsample_initial_channel"], TOKENS, []
    for i, (u, k) in enumerate(zip(c["upsample_rates"], c["upsample_kernel_sizes"])):
        ch = c["upsample_initial_channel"] // 2 ** (i + 1)
        out.append((i, cin, ch, k, u, T))
        cin, T = ch, T * u
    return out


def _conv(name, C_in, C_out, K, dil, T, residual=False, tanh=False, slope=SLOPE):
    def build(device, dtype):
        from ... import ops

        g = torch.Generator().manual_seed(30)
        x = randn(g, 1, C_in, T, device=device, dtype=dtype)
        w = randn(g, C_out, C_in, K, device=device, dtype=dtype, scale=(C_in * K) ** -0.5)
        b = randn(g, C_out, device=device, dtype=dtype, scale=0.1)
        r = randn(g, 1, C_out, T, device=device, dtype=dtype) if residual else None
        pad = dil * (K - 1) // 2

        def ref():
            y = F.conv1d(F.leaky_relu(x, slope) if slope is not None else x, w, b, padding=pad, dilation=dil)
            if residual:
                y = y + r
            return torch.tanh(y) if tanh else y

        ours = lambda: ops.conv1d(x, w, b, padding="same", dilation=dil, lrelu_slope=slope, residual=r, tanh=tanh)  # noqa: E731
        extra = (" + residual" if residual else "") + (" + tanh" if tanh else "")
        return Case(name, "codec_conv1d", dtype_name(dtype), f"[1, {C_in}, {T}] -> {C_out}, k{K} d{dil}{extra}", ours, {"F.conv1d": ref},
                    flops=2 * C_out * C_in * K * T, bytes=(C_in + C_out * (2 if residual else 1)) * T * x.element_size(),
                    check=lambda: rel_err(ours(), ref()))
    return build


def _convt(name, C_in, C_out, K, u, T):
    def build(device, dtype):
        from ... import ops

        g = torch.Generator().manual_seed(31)
        x = randn(g, 1, C_in, T, device=device, dtype=dtype)
        w = randn(g, C_in, C_out, K, device=device, dtype=dtype, scale=(C_in * K / u) ** -0.5)
        b = randn(g, C_out, device=device, dtype=dtype, scale=0.1)
        p = (K - u) // 2
        ours = lambda: ops.conv_transpose1d(x, w, b, stride=u, padding=p, lrelu_slope=SLOPE)  # noqa: E731
        ref = lambda: F.conv_transpose1d(F.leaky_relu(x, SLOPE), w, b, stride=u, padding=p)  # noqa: E731
        return Case(name, "codec_conv_transpose1d", dtype_name(dtype), f"[1, {C_in}, {T}] -> {C_out}, k{K} x{u}", ours,
                    {"F.conv_transpose1d": ref}, flops=2 * C_in * C_out * K * T,
                    bytes=(C_in * T + C_out * T * u) * x.element_size(), check=lambda: rel_err(ours(), ref()))
    return build


def _conv_specs():
    c = FULL_CODEC
    U = c["upsample_initial_channel"]
    specs = [Spec("codec_conv_pre", "codec_conv1d", _conv("codec_conv_pre", c["code_dim"], U, 7, 1, TOKENS, slope=None))]
    for i, cin, ch, k, u, T in _stage_shapes():
        To = T * u
        specs.append(Spec(f"codec_ups{i}", "codec_conv_transpose1d", _convt(f"codec_ups{i}", cin, ch, k, u, T)))
        # convs1 of the largest resblock kernel (and of the smallest with --full); convs2 (dilation 1,
        # + residual) of the middle one
        specs.append(Spec(f"codec_rb{i}_k3d1", "codec_conv1d", _conv(f"codec_rb{i}_k3d1", ch, ch, 3, 1, To), full_only=True))
        specs.append(Spec(f"codec_rb{i}_k11d5", "codec_conv1d", _conv(f"codec_rb{i}_k11d5", ch, ch, 11, 5, To)))
        specs.append(Spec(f"codec_rb{i}_k7d1_res", "codec_conv1d", _conv(f"codec_rb{i}_k7d1_res", ch, ch, 7, 1, To, residual=True)))
        last = ch, To
    specs.append(Spec("codec_conv_post", "codec_conv1d", _conv("codec_conv_post", last[0], 1, 7, 1, last[1], tanh=True)))
    return specs


# ---- streaming --------------------------------------------------------------------------------------

def _window(codec, n_new: int):
    """Tokens a torch re-decode needs for the samples one push of n_new tokens makes final, in steady
    state: LEFT_CONTEXT + n_new + look-ahead; and the sample offset of those samples in its output."""
    hop, la = codec.hop_length, codec.lookahead_samples
    # after n pushed tokens, samples < n*hop - la are final; the push emits [a, a + n_new*hop)
    n = 4 * (LEFT_CONTEXT + codec.lookahead_tokens + n_new)  # any steady-state position
    a = (n - n_new) * hop - la
    t0 = a // hop - LEFT_CONTEXT
    return n, t0, a - t0 * hop


def _stream_push(batch: int):
    name = "codec_stream_push1" if batch == 1 else f"codec_stream_push1_x{batch}"

    def build(device, dtype):
        codec = cached("codec", device, dtype)
        hop = codec.hop_length
        g = torch.Generator().manual_seed(32)
        n, t0, off = _window(codec, 1)
        toks = torch.randint(0, codec.n_codes, (batch, n + 8), generator=g)
        streams = [codec.stream() for _ in range(batch)]
        warm = toks[:, : n - 1]
        if batch == 1:
            streams[0].push(warm[0])
        else:
            codec.push_many(streams, list(warm))
        one = toks[:, n - 1: n]
        win = toks[:, t0: n]

        if batch == 1:
            ours = lambda: streams[0].push(one[0])  # noqa: E731
            ref = lambda: codec.decode(win[0], use_reference=True)[off: off + hop]  # noqa: E731
        else:
            ours = lambda: codec.push_many(streams, list(one))  # noqa: E731
            ref = lambda: codec.decode_batch(win, use_reference=True)[:, off: off + hop]  # noqa: E731

        def check():  # a fresh stream over the same tokens: its n-th push vs the torch window
            s = codec.stream()
            s.push(toks[0, : n - 1])
            got = s.push(toks[0, n - 1: n])
            return rel_err(got, codec.decode(win[0], use_reference=True)[off: off + hop])

        what = "1 stream" if batch == 1 else f"{batch} streams (push_many)"
        return Case(name, "codec_stream", dtype_name(dtype), f"{what}, 1 token -> {hop} samples; torch re-decodes {n - t0} tokens",
                    ours, {"window_redecode": ref}, check=check, rounds=3)
    return build


def stream_first_case(device, dtype):
    codec = cached("codec", device, dtype)
    g = torch.Generator().manual_seed(33)
    n = codec.lookahead_tokens + 1
    tok = torch.randint(0, codec.n_codes, (n,), generator=g)
    final = n * codec.hop_length - codec.lookahead_samples

    def ours():
        return codec.stream().push(tok)

    ref = lambda: codec.decode(tok, use_reference=True)[:final]  # noqa: E731
    return Case("codec_stream_first", "codec_stream", dtype_name(dtype),
                f"fresh stream, {n} tokens (look-ahead + 1) -> first {final} samples", ours, {"decode": ref},
                check=lambda: rel_err(ours(), ref()), rounds=3)


def decode_case(device, dtype, batch: int, tokens: int) -> Case:
    """A full decode of `tokens` tokens per row: ours (fused kernels) vs the same graph in
    torch.nn.functional (`Codec.decode_batch(use_reference=True)`)."""
    codec = cached("codec", device, dtype)
    g = torch.Generator().manual_seed(34)
    tok = torch.randint(0, codec.n_codes, (batch, tokens), generator=g)
    ours = lambda: codec.decode_batch(tok)  # noqa: E731
    ref = lambda: codec.decode_batch(tok, use_reference=True)  # noqa: E731
    sec = tokens * codec.hop_length / codec.sample_rate
    return Case(f"codec_decode_b{batch}", "codec_decode", dtype_name(dtype), f"batch {batch} x {tokens} tokens ({sec:.2f} s of audio)",
                ours, {"F.conv graph": ref}, check=lambda: rel_err(ours(), ref()), rounds=5)


SPECS = _conv_specs() + [
    Spec("codec_decode_b1", "codec_decode", lambda d, t: decode_case(d, t, 1, TOKENS), full_only=True),
    Spec("codec_decode_b8", "codec_decode", lambda d, t: decode_case(d, t, 8, TOKENS), full_only=True),
    Spec("codec_stream_first", "codec_stream", stream_first_case),
    Spec("codec_stream_push1", "codec_stream", _stream_push(1)),
    Spec("codec_stream_push1_x8", "codec_stream", _stream_push(8), full_only=True),
]

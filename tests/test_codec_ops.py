"""Codec kernels (fused conv1d / conv_transpose1d) vs float64 torch.nn.functional references."""
import pytest
import torch
import torch.nn.functional as F

from vita_engine import _C, ops
from vita_engine.ops import reference as R
from cpu_isa import ISA_ORDER, isa  # noqa: F401

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(y, ref, dtype, what=""):
    assert torch.isfinite(y).all(), f"{what}: non-finite output (poisoned element left unwritten?)"
    scale = max(1.0, ref.abs().max().item())
    err = (y.double().cpu() - ref.double().cpu()).abs().max().item()
    assert err <= TOL[dtype] * scale * 4, f"{what}: max err {err} (scale {scale})"


# The CPU builds of these kernels (csrc/cpu/conv1d*.cpp): the tests that take `isa` (tests/cpu_isa.py) run on each.


def _rand(*shape, dtype, device, s=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * s).to(dtype).to(device)


CONV_CASES = [
    # B, Cin, Cout, K, dil, T, pad_l, pad_r
    (1, 3, 5, 3, 1, 17, 1, 1),
    (2, 16, 8, 11, 5, 61, 25, 25),
    (3, 7, 1, 7, 1, 29, 3, 3),       # conv_post-like (Cout 1)
    (2, 8, 13, 5, 3, 3, 6, 6),       # input shorter than the dilated kernel
    (1, 9, 6, 4, 2, 40, 0, 9),       # asymmetric (streaming-style) padding
    (2, 32, 32, 11, 1, 100, 5, 5),
    (1, 5, 4, 1, 1, 23, 0, 0),       # pointwise
    (2, 4, 4, 3, 1, 1, 2, 0),        # single step, left pad only
    (3, 48, 80, 11, 5, 150, 25, 25), # CUDA tensor-core path: partial M tile, several N tiles
    (2, 20, 24, 3, 3, 70, 3, 3),     # CUDA tensor-core path: Cin not a multiple of 16
    (1, 17, 19, 7, 3, 97, 9, 9),     # CPU: 8-channel tiles + 3 left over, 48-step tiles + a partial one
    (2, 9, 9, 3, 1, 48, 1, 1),       # CPU: exactly one 48-step tile, one channel past a tile
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv1d_fused(device, dtype, case, isa):
    B, Ci, Co, K, d, T, pl, pr = case
    x = _rand(B, Ci, T, dtype=dtype, device=device)
    w = _rand(Co, Ci, K, dtype=dtype, device=device, s=(Ci * K) ** -0.5)
    b = _rand(Co, dtype=dtype, device=device)
    To = T + pl + pr - d * (K - 1)
    res = _rand(B, Co, To, dtype=dtype, device=device)
    acc = _rand(B, Co, To, dtype=dtype, device=device)
    out = torch.full((B, Co, To), float("nan"), dtype=dtype, device=device)
    y = ops.conv1d(x, w, b, padding=(pl, pr), dilation=d, lrelu_slope=0.1, residual=res, alpha=1 / 3, accum=acc, beta=0.5,
                   out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = R.conv1d_ref(x.double(), w.double(), b.double(), padding=(pl, pr), dilation=d, lrelu_slope=0.1, residual=res.double(),
                       alpha=1 / 3, accum=acc.double(), beta=0.5)
    _close(y, ref, dtype, "fused")
    # plain conv, no bias, tanh epilogue
    y2 = ops.conv1d(x, w, None, padding=(pl, pr), dilation=d, tanh=True)
    _close(y2, torch.tanh(F.conv1d(F.pad(x.double(), (pl, pr)), w.double(), dilation=d)), dtype, "tanh")


def test_conv1d_same_padding_and_default_out():
    x = torch.randn(2, 6, 33)
    w = torch.randn(4, 6, 7)
    for d in (1, 2, 3):
        y = ops.conv1d(x, w, padding="same", dilation=d)
        ref = F.conv1d(x.double(), w.double(), padding="same", dilation=d)
        assert y.shape == ref.shape
        _close(y, ref, torch.float32)


def test_conv1d_inplace_residual_and_accum(device, isa):
    """The MRF pattern: out aliases residual (x = x + conv(...)) and accum (xs += conv/3)."""
    x = torch.randn(2, 8, 50, device=device)
    w = torch.randn(8, 8, 3, device=device) * 0.2
    b = torch.randn(8, device=device)
    buf = torch.randn(2, 8, 50, device=device)
    ref = R.conv1d_ref(x.double(), w.double(), b.double(), padding=1, lrelu_slope=0.1, residual=buf.double())
    ops.conv1d(x, w, b, padding=1, lrelu_slope=0.1, residual=buf, out=buf)
    _close(buf, ref, torch.float32, "residual alias")
    acc = torch.randn(2, 8, 50, device=device)
    res = torch.randn(2, 8, 50, device=device)
    ref = R.conv1d_ref(x.double(), w.double(), b.double(), padding=1, lrelu_slope=0.1, residual=res.double(), alpha=0.25,
                       accum=acc.double(), beta=1.0)
    ops.conv1d(x, w, b, padding=1, lrelu_slope=0.1, residual=res, alpha=0.25, accum=acc, out=acc)
    _close(acc, ref, torch.float32, "accum alias")


def test_conv1d_strided_views(device, isa):
    """Slices of a time buffer (dense time dim, other strides free) are read and written in place."""
    big = torch.randn(3, 10, 80, device=device)
    x = big[:, 2:8, 5:45]  # [3, 6, 40], channel stride 80
    w = torch.randn(4, 6, 5, device=device)
    dst = torch.full((3, 4, 100), float("nan"), device=device)
    out = dst[:, :, 10:50]
    ops.conv1d(x, w, None, padding=2, lrelu_slope=0.2, out=out)
    ref = R.conv1d_ref(x.double(), w.double(), padding=2, lrelu_slope=0.2)
    _close(out, ref, torch.float32)
    assert torch.isnan(dst[:, :, :10]).all() and torch.isnan(dst[:, :, 50:]).all()
    xt = torch.randn(2, 40, 6, device=device).transpose(1, 2)  # time not dense -> wrapper makes it dense
    _close(ops.conv1d(xt, w, padding=2), R.conv1d_ref(xt.double(), w.double(), padding=2), torch.float32)


CONVT_CASES = [
    # B, Cin, Cout, K, stride, T, pad (l, r)
    (1, 8, 4, 16, 8, 5, (4, 4)),
    (2, 6, 5, 11, 5, 9, (3, 3)),
    (2, 4, 3, 5, 3, 13, (1, 1)),
    (1, 3, 2, 2, 4, 6, (0, 0)),   # K < stride: phases without taps
    (3, 5, 7, 7, 2, 1, (1, 4)),   # single input step, asymmetric crop
    (1, 16, 16, 8, 4, 30, (2, 2)),
    (2, 3, 1, 3, 1, 10, (1, 1)),  # stride 1
    (2, 64, 32, 11, 5, 40, (3, 3)),  # CUDA tensor-core phases
    # CPU phase-major tiles: every stride up to two register blocks, K below / a multiple of /
    # not a multiple of the stride, channel counts that leave partial tiles, long crops
    (1, 7, 9, 6, 6, 11, (2, 1)),
    (2, 5, 3, 14, 7, 8, (5, 5)),
    (1, 9, 10, 9, 9, 7, (0, 3)),
    (1, 6, 5, 20, 10, 6, (4, 6)),
    (2, 4, 17, 12, 4, 25, (4, 4)),
    (1, 3, 11, 3, 2, 60, (7, 2)),
    (1, 5, 6, 16, 16, 4, (8, 8)),
    (1, 4, 3, 5, 12, 5, (1, 1)),    # K < stride, stride a multiple of the AVX2 block
    (1, 512, 16, 16, 8, 41, (4, 4)),  # the codec's first upsampler, a 48-step tile + 1 q
    (1, 20, 6, 11, 5, 101, (3, 3)),   # several wide phase tiles and a narrower last one (strides 5, 6)
    (2, 9, 4, 12, 6, 70, (3, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONVT_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_conv_transpose1d(device, dtype, case, isa):
    B, Ci, Co, K, s, T, pad = case
    x = _rand(B, Ci, T, dtype=dtype, device=device)
    w = _rand(Ci, Co, K, dtype=dtype, device=device, s=(Ci * K / s) ** -0.5)
    b = _rand(Co, dtype=dtype, device=device)
    To = (T - 1) * s - pad[0] - pad[1] + K
    out = torch.full((B, Co, To), float("nan"), dtype=dtype, device=device)
    y = ops.conv_transpose1d(x, w, b, stride=s, padding=pad, lrelu_slope=0.1, out=out)
    ref = R.conv_transpose1d_ref(x.double(), w.double(), b.double(), stride=s, padding=pad, lrelu_slope=0.1)
    assert y.shape == ref.shape
    _close(y, ref, dtype)
    if pad[0] == pad[1]:
        y2 = ops.conv_transpose1d(x, w, None, stride=s, padding=pad[0], output_padding=min(s - 1, 1))
        ref2 = F.conv_transpose1d(x.double(), w.double(), stride=s, padding=pad[0], output_padding=min(s - 1, 1))
        _close(y2, ref2, dtype, "output_padding")


def test_conv_transpose1d_window_equals_slice(device, isa):
    """A left crop (pad_left) and a short out give exactly a window of the full output (streaming)."""
    x = torch.randn(1, 6, 20, device=device)
    w = torch.randn(6, 3, 11, device=device)
    full = ops.conv_transpose1d(x, w, stride=5, padding=3)
    part = torch.empty(1, 3, 17, device=device)
    from vita_engine.ops._lib import _C, dl
    _C.conv_transpose1d(dl(x), dl(w), None, dl(part), 5, 3 + 23, None, 0)
    torch.testing.assert_close(part, full[:, :, 23:40], rtol=1e-5, atol=1e-5)


def test_errors():
    x = torch.randn(1, 4, 10)
    w = torch.randn(3, 4, 3)
    with pytest.raises(ValueError, match="conv1d: weight dim 1"):
        ops.conv1d(x, torch.randn(3, 5, 3))
    with pytest.raises(TypeError, match="conv1d: weight must have the dtype"):
        ops.conv1d(x, w.half())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.conv1d(x.double(), w.double())
    with pytest.raises(ValueError, match="conv1d: x must be 3-D"):
        ops.conv1d(x[0], w)
    with pytest.raises(ValueError, match="bias dim 0"):
        ops.conv1d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="residual must have the shape"):
        ops.conv1d(x, w, residual=torch.randn(1, 3, 9))
    with pytest.raises(ValueError, match="dilation"):
        ops.conv1d(x, w, dilation=0)
    with pytest.raises(ValueError, match="shorter than the dilated kernel"):
        ops.conv1d(torch.randn(1, 4, 2), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="out must be"):
        ops.conv1d(x, w, out=torch.empty(1, 3, 7))
    with pytest.raises(ValueError, match="conv_transpose1d: weight dim 0"):
        ops.conv_transpose1d(x, torch.randn(5, 3, 4), stride=2)
    with pytest.raises(ValueError, match="stride"):
        ops.conv_transpose1d(x, torch.randn(4, 3, 4), stride=0)
    with pytest.raises(ValueError, match="alias"):
        ops.conv1d(x, torch.randn(4, 4, 1), out=x)


def test_empty_batch_and_zero_length():
    w = torch.randn(3, 4, 3)
    assert ops.conv1d(torch.randn(0, 4, 10), w, padding=1).shape == (0, 3, 10)
    assert ops.conv1d(torch.randn(2, 4, 0), w, padding=(1, 1)).shape == (2, 3, 0)
    y = ops.conv1d(torch.randn(2, 4, 0), w, torch.ones(3), padding=(2, 2))  # all padding -> bias only
    assert torch.equal(y, torch.ones(2, 3, 2))


def test_cpu_isa_names_a_path_and_caps(monkeypatch):
    monkeypatch.delenv("VITA_CPU_ISA", raising=False)
    best = _C.cpu_isa()
    assert best in ISA_ORDER
    monkeypatch.setenv("VITA_CPU_ISA", "avx2")
    assert _C.cpu_isa() == "avx2"
    monkeypatch.setenv("VITA_CPU_ISA", "amx")  # a cap above what the CPU has changes nothing
    assert _C.cpu_isa() == best


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codec_layer_shapes_match_between_cpu_paths(dtype, isa, monkeypatch):
    """Real codec widths (512 -> 256 upsampler x8, a 256-channel k11 d5 resblock conv) on the path
    under test vs float64."""
    x = _rand(2, 512, 13, dtype=dtype, device="cpu")
    w = _rand(512, 256, 16, dtype=dtype, device="cpu", s=(512 * 2) ** -0.5)
    b = _rand(256, dtype=dtype, device="cpu")
    out = torch.full((2, 256, 13 * 8), float("nan"), dtype=dtype)  # (13 - 1) * 8 - 8 + 16
    ops.conv_transpose1d(x, w, b, stride=8, padding=4, lrelu_slope=0.1, out=out)
    _close(out, R.conv_transpose1d_ref(x.double(), w.double(), b.double(), stride=8, padding=4, lrelu_slope=0.1), dtype, "ups0")
    h = _rand(1, 256, 101, dtype=dtype, device="cpu")
    w2 = _rand(256, 256, 11, dtype=dtype, device="cpu", s=(256 * 11) ** -0.5)
    res = _rand(1, 256, 101, dtype=dtype, device="cpu")
    y = ops.conv1d(h, w2, b, padding="same", dilation=5, lrelu_slope=0.1, residual=res)
    _close(y, R.conv1d_ref(h.double(), w2.double(), b.double(), padding=25, dilation=5, lrelu_slope=0.1, residual=res.double()),
           dtype, "resblock")

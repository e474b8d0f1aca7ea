"""linear_small_m (csrc/cpu/linear_small_m*.cpp) vs a float64 torch reference and vs F.linear."""
import pytest
import torch
import torch.nn.functional as F

import vita_engine
from vita_engine import ops
from vita_engine.ops._lib import dl
from cpu_isa import isa  # noqa: F401

MAXM = ops.LINEAR_SMALL_M_MAX_ROWS


def make(M, K, N, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed * 1000003 + M * 7919 + K * 31 + N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def ref64(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def check(y, x, w, b):
    """fp32: within a few float32 ulps of the float64 result (scaled by the dot-product size) and no
    worse than 4x torch's own error; bf16: one bfloat16 rounding of the fp32 sum, as F.linear."""
    want = ref64(x, w, b)
    assert y.dtype == x.dtype and y.shape == want.shape
    assert torch.isfinite(y).all()
    err = (y.double() - want).abs()
    scale = (x.double().abs() @ w.double().abs().T) + (b.double().abs() if b is not None else 0)
    if x.dtype == torch.float32:
        torch_err = (F.linear(x, w, b).double() - want).abs().max().item()
        assert (err <= 1e-6 * (scale + 1e-3)).all(), err.max().item()
        assert err.max().item() <= 4 * torch_err + 1e-6
    else:
        # |y - want| <= half a bfloat16 ulp of want (2^-8 relative) + the fp32 accumulation error
        assert (err <= 2 ** -8 * want.abs() + 1e-5 * (scale + 1e-3)).all(), (err / (want.abs() + 1e-9)).max().item()
        torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=1.6e-2, atol=1.6e-2 * scale.max().item() ** 0 * 1e-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 7, 16, MAXM])
@pytest.mark.parametrize("K,N", [(67, 1000), (896, 131), (1000, 67), (4864, 37), (16, 9), (1, 5)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64(isa, dtype, M, K, N, bias):
    x, w, b = make(M, K, N, dtype, bias)
    check(ops.linear_small_m(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_width(isa, dtype):
    # The TTS's gate|up projection: K = 896, N = 2 x 4864, at decode batch 16.
    x, w, b = make(16, 896, 9728, dtype, False, seed=1)
    check(ops.linear_small_m(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_poisoned_strided_out(isa, dtype):
    # out is a view of a NaN buffer with padded rows: every element is written, the padding is not.
    M, K, N = 7, 131, 45
    x, w, b = make(M, K, N, dtype, True, seed=2)
    buf = torch.full((M, N + 5), float("nan"), dtype=dtype)
    out = buf[:, :N]
    vita_engine._C.linear_small_m(dl(x), dl(w), dl(b), dl(out))
    check(out, x, w, b)
    assert torch.isnan(buf[:, N:]).all()


def test_strided_rows_and_leading_dims(isa):
    x, w, b = make(6, 67, 50, torch.float32, True, seed=3)
    big = torch.full((6, 80), float("nan"))
    big[:, :67] = x
    xs = big[:, :67]  # strided rows, dense last dim: read in place
    check(ops.linear_small_m(xs, w, b), x, w, b)
    xt = x.T.contiguous().T  # column-major: the wrapper's reshape copies it
    check(ops.linear_small_m(xt, w, b), x, w, b)
    y3 = ops.linear_small_m(x.view(2, 3, 67), w, b)
    assert y3.shape == (2, 3, 50)
    check(y3.reshape(6, 50), x, w, b)


def test_threads_do_not_change_results(isa):
    x, w, b = make(16, 896, 1000, torch.float32, True, seed=4)
    n = vita_engine._C.num_threads()
    try:
        vita_engine._C.set_num_threads(1)
        y1 = ops.linear_small_m(x, w, b)
        vita_engine._C.set_num_threads(2)
        y2 = ops.linear_small_m(x, w, b)
    finally:
        vita_engine._C.set_num_threads(n)
    assert torch.equal(y1, y2)


def test_empty_sizes():
    w = torch.randn(5, 0)
    b = torch.randn(5)
    torch.testing.assert_close(ops.linear_small_m(torch.randn(3, 0), w, b), b.expand(3, 5))
    assert ops.linear_small_m(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)


def test_special_values_propagate():
    x, w, _ = make(2, 40, 6, torch.float32, False, seed=5)
    x[0, 3] = float("nan")
    w[2, 7] = float("inf")
    y, want = ops.linear_small_m(x, w), F.linear(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.equal(torch.isinf(y), torch.isinf(want))


def test_bad_arguments():
    C = vita_engine._C
    x, w, b = make(3, 16, 8, torch.float32, True)
    out = torch.empty(3, 8)
    with pytest.raises(ValueError, match=r"linear_small_m.*x.*at most"):
        ops.linear_small_m(torch.randn(MAXM + 1, 16), w)
    with pytest.raises(ValueError, match=r"linear_small_m.*weight"):
        ops.linear_small_m(x, torch.randn(8, 17))
    with pytest.raises((TypeError, ValueError), match=r"linear_small_m.*weight"):
        ops.linear_small_m(x, w.bfloat16())
    with pytest.raises(TypeError, match=r"linear_small_m.*x.*float32 or bfloat16"):
        ops.linear_small_m(x.half(), w.half())
    with pytest.raises(ValueError, match=r"linear_small_m.*weight.*contiguous"):
        ops.linear_small_m(x, torch.randn(16, 8).T)
    with pytest.raises(ValueError, match=r"linear_small_m.*bias"):
        ops.linear_small_m(x, w, torch.randn(9))
    with pytest.raises(ValueError, match=r"linear_small_m.*out"):
        C.linear_small_m(dl(x), dl(w), dl(b), dl(torch.empty(3, 9)))
    with pytest.raises(ValueError, match=r"linear_small_m.*x.*dense last dimension"):
        C.linear_small_m(dl(x.T.contiguous().T), dl(w), dl(b), dl(out))
    with pytest.raises(ValueError, match=r"linear_small_m.*x"):
        C.linear_small_m(dl(torch.randn(16)), dl(w), dl(b), dl(out))


@pytest.mark.parametrize("isa_cap", [None, "avx2"])
def test_model_dispatch(monkeypatch, isa_cap):
    """model.layers.linear: linear_small_m only where it wins (CPU, 2-D, rows in _SMALL_M_ROWS,
    one dtype), never on the reference path or when autograd needs a graph."""
    from vita_engine.model import layers
    from vita_engine.model._ops import OpsHandle

    if isa_cap:
        monkeypatch.setenv("VITA_CPU_ISA", isa_cap)
    calls = []
    real = layers._fast.linear_small_m

    class Spy:
        @staticmethod
        def linear_small_m(x, w, b=None):
            calls.append((x.dtype, x.shape[0]))
            return real(x, w, b)

    monkeypatch.setattr(layers, "_fast", Spy)
    fast, ref = OpsHandle(False), OpsHandle(True)
    wide_fp32 = vita_engine._C.cpu_isa() != "avx2"  # the AVX2 build takes fp32 at 4-8 rows only
    for dtype, M, taken in [(torch.bfloat16, 1, True), (torch.bfloat16, 32, True), (torch.bfloat16, 33, False),
                            (torch.float32, 3, False), (torch.float32, 4, True), (torch.float32, 8, True),
                            (torch.float32, 16, wide_fp32), (torch.float32, 17, False), (torch.float16, 4, False)]:
        x, w, b = make(M, 40, 24, dtype, True, seed=6)
        calls.clear()
        y = layers.linear(fast, x, w, b)
        assert bool(calls) == taken, (dtype, M)
        torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=1.6e-2, atol=1e-2)
        calls.clear()
        layers.linear(ref, x, w, b)
        assert not calls
    x, w, b = make(8, 40, 24, torch.float32, True, seed=7)
    w.requires_grad_(True)
    calls.clear()
    y = layers.linear(fast, x, w, b)
    assert not calls and y.requires_grad
    with torch.no_grad():
        layers.linear(fast, x, w, b)
    assert calls

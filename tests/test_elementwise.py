"""rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul vs the torch references."""
import numpy as np
import pytest
import torch

import vita_engine
from vita_engine import ops
from vita_engine.ops import reference as ref
from cpu_isa import isa  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float64: (1e-10, 1e-10)}


def close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=atol)


# The CPU builds of these kernels (csrc/cpu/rowops*.cpp): the tests that take `isa` (tests/cpu_isa.py) run on each.


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 17), (5, 4097), (3, 2, 128), (64, 3584), (0, 32)])
def test_rms_norm(device, dtype, shape, isa):
    x = rand(*shape, dtype=dtype, device=device) * 3
    w = rand(shape[-1], dtype=dtype, device=device)
    y = ops.rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    close(y, ref.rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_float64_reference_agrees(isa):
    # The fp32 kernel vs the same math in float64: catches accumulation-order bugs.
    x = torch.randn(33, 4097) * 10
    w = torch.randn(4097)
    y = ops.rms_norm(x, w, 1e-5)
    y64 = ref.rms_norm(x.double(), w.double(), 1e-5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 17), (7, 4097), (2, 3, 96)])
def test_fused_add_rms_norm(device, dtype, shape, isa):
    x = rand(*shape, dtype=dtype, device=device)
    r = rand(*shape, dtype=dtype, device=device)
    w = rand(shape[-1], dtype=dtype, device=device)
    y, s = ops.fused_add_rms_norm(x, r, w, 1e-6)
    ry, rs = ref.fused_add_rms_norm(x, r, w, 1e-6)
    close(s, rs, dtype)
    close(y, ry, dtype)


def test_norm_noncontiguous_rows_are_handled(isa):
    base = torch.randn(6, 2, 64)
    x = base[:, 0, :]  # strided rows, dense last dim
    w = torch.randn(64)
    close(ops.rms_norm(x, w), ref.rms_norm(x, w), torch.float32)
    xt = torch.randn(64, 6).t()  # last dim not dense -> wrapper makes it contiguous
    close(ops.rms_norm(xt, w), ref.rms_norm(xt, w), torch.float32)


def test_norm_writes_every_element_of_poisoned_output(isa):
    x = torch.randn(9, 4097)
    w = torch.randn(4097)
    out = torch.full_like(x, float("nan"))
    vita_engine._C.rms_norm(x, w, out, 1e-6, 0)
    assert torch.isfinite(out).all()
    close(out, ref.rms_norm(x, w), torch.float32)
    res_out = torch.full_like(x, float("nan"))
    r = torch.randn_like(x)
    vita_engine._C.fused_add_rms_norm(x, r, w, out.fill_(float("nan")), res_out, 1e-6, 0)
    assert torch.isfinite(out).all() and torch.isfinite(res_out).all()


def test_fused_add_rms_norm_in_place_aliasing(isa):
    x = torch.randn(4, 100)
    r = torch.randn(4, 100)
    w = torch.randn(100)
    ry, rs = ref.fused_add_rms_norm(x, r, w)
    vita_engine._C.fused_add_rms_norm(x, r, w, x, r, 1e-6, 0)  # out -> x, residual_out -> r
    close(x, ry, torch.float32)
    close(r, rs, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,rd", [(28, 4, 128, None), (4, 2, 32, None), (3, 1, 64, 32), (2, 2, 18, 10), (3, 2, 80, 72)])
def test_rotary_embedding(device, dtype, hq, hk, d, rd, isa):
    T = 37
    q = rand(T, hq, d, dtype=dtype, device=device)
    k = rand(T, hk, d, dtype=dtype, device=device)
    pos = torch.randint(0, 32768, (T,), device=device)
    qo, ko = ops.rotary_embedding(q, k, pos, 1e6, rotary_dim=rd)
    # The reference runs on the CPU: torch's CUDA powf/cosf round differently (angles up to 3e4 rad
    # amplify one ulp of inv_freq), and the kernels reproduce torch-CPU's (= HF's usual) rounding.
    qr, kr = ref.rotary_embedding(q.cpu(), k.cpu(), pos.cpu(), 1e6, rotary_dim=rd)
    # fp32: cos/sin of angles up to 3e4 rad differ by a few ulp between libm and torch
    tol = (2e-5, 2e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(qo.float().cpu(), qr.float().cpu(), rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(ko.float().cpu(), kr.float().cpu(), rtol=tol[0], atol=tol[1])
    assert torch.equal(q, q)  # inputs untouched (out of place)


def test_rotary_on_strided_qkv_views_and_int32_positions(isa):
    T, hq, hk, d = 11, 4, 2, 32
    qkv = torch.randn(T, (hq + 2 * hk) * d)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(T, hk, d)
    assert not q.is_contiguous()
    pos = torch.arange(T, dtype=torch.int32) + 5
    qo, ko = ops.rotary_embedding(q, k, pos, 10000.0)
    qr, kr = ref.rotary_embedding(q, k, pos.long(), 10000.0)
    close(qo, qr, torch.float32)
    close(ko, kr, torch.float32)


def test_rotary_matches_hf_qwen2():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2 import modeling_qwen2 as mq

    cfg = transformers.Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    rot = mq.Qwen2RotaryEmbedding(config=cfg)
    T = 9
    q = torch.randn(1, 4, T, 64)
    k = torch.randn(1, 2, T, 64)
    pos = torch.arange(T)[None] * 97
    cos, sin = rot(q, pos)
    qh, kh = mq.apply_rotary_pos_emb(q, k, cos, sin)
    qo, ko = ops.rotary_embedding(q[0].transpose(0, 1), k[0].transpose(0, 1), pos[0], 1e6)
    close(qo, qh[0].transpose(0, 1), torch.float32)
    close(ko, kh[0].transpose(0, 1), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 34), (3, 4, 18944), (0, 8), (2, 2 * 4099), (1, 2 * 8203)])
def test_silu_and_mul(device, dtype, shape, isa):
    x = rand(*shape, dtype=dtype, device=device) * 4
    y = ops.silu_and_mul(x)
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    close(y, ref.silu_and_mul(x), dtype)


def test_requires_grad_inputs_are_detached():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    close(ops.rms_norm(x, w), ref.rms_norm(x.detach(), w.detach()), torch.float32)


def test_numpy_inputs_through_C():
    C = vita_engine._C
    x = np.random.randn(5, 33).astype(np.float32)
    w = np.random.randn(33).astype(np.float32)
    out = np.empty_like(x)
    C.rms_norm(x, w, out, 1e-6)
    expect = ref.rms_norm(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    g = np.random.randn(4, 20).astype(np.float32)
    o = np.empty((4, 10), np.float32)
    C.silu_and_mul(g, o)
    np.testing.assert_allclose(o, ref.silu_and_mul(torch.from_numpy(g)).numpy(), rtol=1e-5, atol=1e-6)
    # raw DLPack capsules are accepted too
    o2 = torch.empty(4, 10)
    C.silu_and_mul(torch.from_numpy(g).__dlpack__(), o2)
    np.testing.assert_allclose(o2.numpy(), o, rtol=0, atol=0)


def test_read_only_output_is_rejected():
    x = np.random.randn(2, 8).astype(np.float32)
    w = np.ones(8, np.float32)
    out = np.empty_like(x)
    out.setflags(write=False)
    with pytest.raises((ValueError, BufferError, TypeError), match="read-only|readonly|writ"):
        vita_engine._C.rms_norm(x, w, out, 1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.rms_norm(torch.randn(3, 8), torch.randn(7)), r"rms_norm: weight dim 0 \(hidden of x\) must be 8, got \(7,\)"),
        (lambda: ops.rms_norm(torch.randn(3, 8), torch.randn(8, dtype=torch.float64)), "rms_norm: weight must have the dtype of x"),
        (lambda: ops.rms_norm(torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)), "x must be float32, float16 or bfloat16, got float64"),
        (lambda: ops.rms_norm(torch.randint(0, 3, (3, 8)), torch.randn(8)), "x must be float32, float16 or bfloat16, got int64"),
        (lambda: ops.rms_norm(torch.randn(3, 8), torch.randn(8), -1.0), "eps must be >= 0"),
        (lambda: ops.fused_add_rms_norm(torch.randn(3, 8), torch.randn(3, 9), torch.randn(8)), "residual must have the shape of x"),
        (lambda: ops.silu_and_mul(torch.randn(3, 7)), r"silu_and_mul: x must be \[..., 2N\]"),
        (lambda: ops.rotary_embedding(torch.randn(4, 2, 8), torch.randn(4, 1, 6), torch.arange(4), 1e4), "k dim 2 .head_dim of q. must be 8"),
        (lambda: ops.rotary_embedding(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(3), 1e4), "positions dim 0"),
        (lambda: ops.rotary_embedding(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4.0), 1e4), "positions must be int32 or int64"),
        (lambda: ops.rotary_embedding(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4), 1e4, rotary_dim=5), "rotary_dim must be even"),
        (lambda: ops.rotary_embedding(torch.randn(4, 16), torch.randn(4, 1, 8), torch.arange(4), 1e4), r"q must be 3-D \[tokens, q_heads, head_dim\]"),
        (lambda: vita_engine._C.rms_norm([1, 2], torch.ones(2), torch.ones(2), 1e-6), "x must be a tensor or array supporting DLPack"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_error_types():
    with pytest.raises(TypeError):
        ops.rms_norm(torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError):
        ops.rms_norm(torch.randn(3, 8), torch.randn(7))


@pytest.mark.cuda
def test_cpu_cuda_mix_is_rejected():
    with pytest.raises(TypeError, match="must be on the device of x"):
        ops.rms_norm(torch.randn(3, 8, device="cuda"), torch.randn(8))


def test_torch_compile_sees_custom_ops():
    def f(x, w, r):
        y, s = ops.fused_add_rms_norm(x, r, w)
        return ops.silu_and_mul(torch.cat([y, s], -1)), ops.rms_norm(s, w)

    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    cf = torch.compile(f, backend="eager", fullgraph=True)
    a, b = cf(x, w, r)
    ea, eb = f(x, w, r)
    close(a, ea, torch.float32)
    close(b, eb, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_sum_rounds_exactly_like_torch(dtype, isa):
    """residual_out = round(x + r) in the storage dtype: bit-identical to torch for every value,
    ties (random pairs of 16-bit values give many), overflow to inf, subnormals, inf and NaN, at a
    width with whole vectors and a partial one."""
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-32768, 32768, (6, 1003), generator=g, dtype=torch.int16)
    x = bits.view(dtype).clone()
    r = torch.randint(-32768, 32768, (6, 1003), generator=g, dtype=torch.int16).view(dtype).clone()
    x[0, :8] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, 3e38, -3e38], dtype=torch.float32).to(dtype)
    w = torch.ones(1003, dtype=dtype)
    out = torch.empty_like(x)
    res_out = torch.full_like(x, 7.0)
    vita_engine._C.fused_add_rms_norm(x, r, w, out, res_out, 1e-6, 0)
    expect = x + r
    same = (res_out.view(torch.int16) == expect.view(torch.int16)) | (torch.isnan(res_out) & torch.isnan(expect))
    assert same.all(), f"{int((~same).sum())} sums rounded differently, e.g. {x[~same][:3]} + {r[~same][:3]} -> {res_out[~same][:3]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_ops_write_every_element_and_nothing_else(dtype, isa):
    """Odd widths (a partial vector at each row end) into poisoned, row-strided outputs: every
    element written, the gaps between rows untouched."""
    x = rand(3, 2 * 1029, dtype=dtype) * 3
    buf = torch.full((3, 1029 + 5), float("nan"), dtype=dtype)
    out = buf[:, :1029]
    vita_engine._C.silu_and_mul(x, out, 0)
    close(out, ref.silu_and_mul(x), dtype)
    assert torch.isnan(buf[:, 1029:]).all()
    w = rand(1029, dtype=dtype)
    buf.fill_(float("nan"))
    vita_engine._C.rms_norm(x[:, :1029], w, out, 1e-6, 0)
    close(out, ref.rms_norm(x[:, :1029], w), dtype)
    assert torch.isnan(buf[:, 1029:]).all()

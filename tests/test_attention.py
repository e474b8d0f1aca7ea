"""store_kv / paged_attention / varlen_attention vs float64 torch references (ops.reference).

Caches are poisoned (NaN everywhere outside each sequence's live rows, including the tail of the
last page) and outputs are pre-filled with NaN, so a kernel that reads a page it should not, or
forgets to write a row, fails. CPU runs both the AVX-512 and the AVX2 build where available.
"""
import math

import numpy as np
import pytest
import torch

import vita_engine
from vita_engine import _C, ops
from vita_engine.ops import reference as ref

HAS_CUDA = torch.cuda.is_available() and vita_engine.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")])]
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 1e-2)}


@pytest.fixture(params=["native", "avx2"])
def isa(request, monkeypatch):
    if request.param == "avx2":
        monkeypatch.setenv("VITA_CPU_ISA", "avx2")
    return request.param


def _close(out, expect, dtype):
    atol, rtol = TOL[dtype]
    assert not torch.isnan(out).any(), "NaN in output"
    torch.testing.assert_close(out.double().cpu(), expect.double().cpu(), atol=atol, rtol=rtol)


def make_paged(q_lens, kv_lens, Hq, Hkv, D, bs, dtype, device="cpu", extra_blocks=3, extra_cols=2, seed=0, poison=float("nan")):
    """Random paged problem: shuffled, non-contiguous pages; everything outside the live rows poisoned."""
    g = torch.Generator().manual_seed(seed)
    B = len(kv_lens)
    need = [math.ceil(k / bs) for k in kv_lens]
    nblk = sum(need) + extra_blocks
    perm = torch.randperm(nblk, generator=g)
    maxb = max(need) + extra_cols
    bt = torch.full((B, maxb), nblk - 1, dtype=torch.int32)  # unused columns point at a poisoned page
    used, pos = [], 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[pos:pos + n].int()
        pos += n
    # perm[pos:] are pages no sequence owns: make sure the filler column id is one of them
    bt[bt == nblk - 1] = int(perm[-1])
    bt[torch.arange(B)[:, None], torch.arange(maxb)[None, :]] = torch.where(
        torch.arange(maxb)[None, :] < torch.tensor(need)[:, None], bt, torch.full_like(bt, int(perm[-1])))
    k_cache = torch.full((nblk, bs, Hkv, D), poison, dtype=dtype)
    v_cache = torch.full((nblk, bs, Hkv, D), poison, dtype=dtype)
    for b, kl in enumerate(kv_lens):
        kd = torch.randn(kl, Hkv, D, generator=g).to(dtype)
        vd = torch.randn(kl, Hkv, D, generator=g).to(dtype)
        slots = bt[b].long()[torch.arange(kl) // bs] * bs + torch.arange(kl) % bs
        ref.store_kv(kd, vd, k_cache, v_cache, slots)
    cu = torch.tensor([0] + list(np.cumsum(q_lens)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, D, generator=g).to(dtype)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    dev = torch.device(device)
    return q.to(dev), k_cache.to(dev), v_cache.to(dev), bt.to(dev), kv.to(dev), cu.to(dev)


def expect_paged(q, kc, vc, bt, kv, cu, causal=True, scale=None):
    return ref.paged_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), bt.cpu(), kv.cpu(), cu.cpu(), causal=causal, scale=scale)


def run_c(q, kc, vc, bt, kv, cu, causal=True, scale=None, num_splits=1):
    """Through _C directly with a NaN-poisoned output."""
    out = torch.full_like(q, float("nan"))
    ws = None
    max_q = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if q.is_cuda and num_splits > 1:
        ws = torch.empty(_C.paged_attention_workspace_floats(q.shape[0], q.shape[1], q.shape[2], num_splits), device=q.device)
    _C.paged_attention(q, kc, vc, bt, kv, cu, out, scale, causal, max_q, num_splits, ws,
                       torch.cuda.current_stream().cuda_stream if q.is_cuda else 0)
    return out


# (dtype, D, Hq, Hkv, block_size): GQA ratios 1, 2, 4, 7, 8; head dims 64, 128 (+72, 256); block sizes 16, 32, 8, 64
CONFIGS = [
    (torch.float32, 128, 28, 4, 16),
    (torch.float32, 64, 8, 8, 32),
    (torch.float32, 64, 8, 4, 8),
    (torch.bfloat16, 128, 16, 4, 16),
    (torch.float16, 128, 16, 2, 32),
    (torch.bfloat16, 64, 7, 1, 64),
    (torch.float32, 72, 4, 2, 16),
    (torch.bfloat16, 256, 4, 4, 16),
]


def _lens(bs):
    # q_len 1/2/7/64 mixed; kv lengths ending exactly on and one past a page boundary, 1, and a longer one
    q_lens = [1, 2, 7, 64, 1, 3]
    kv_lens = [1, 2 * bs, 5 * bs + 1, 64 + 3 * bs, 700, 3]
    return q_lens, kv_lens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{str(c[0])[6:]}-D{c[1]}-{c[2]}x{c[3]}-bs{c[4]}")
def test_paged_attention_mixed_batch(cfg, device, isa):
    if device == "cuda" and isa == "avx2":
        pytest.skip("ISA switch is CPU-only")
    dtype, D, Hq, Hkv, bs = cfg
    q_lens, kv_lens = _lens(bs)
    t = make_paged(q_lens, kv_lens, Hq, Hkv, D, bs, dtype, device)
    if device == "cuda" and D not in (64, 128):
        # no CUDA kernel for this head dim: _C refuses clearly, the wrapper falls back to the reference
        with pytest.raises(ValueError, match="head_dim must be 64 or 128"):
            run_c(*t)
        with pytest.warns(UserWarning, match="no CUDA kernel"):
            ops.attention._warned.discard("paged_attention")
            out = ops.paged_attention(*t)
        _close(out, expect_paged(*t), dtype)
        return
    for causal in (True, False):
        out = run_c(*t, causal=causal)
        _close(out, expect_paged(*t, causal=causal), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_split_kv_long(dtype, device, isa):
    """Long histories (up to 4100) with few work items take the split-KV + LSE-merge path."""
    if device == "cuda" and isa == "avx2":
        pytest.skip("ISA switch is CPU-only")
    t = make_paged([1, 5], [4100, 2049], 8, 1, 64, 16, dtype, device)
    expect = expect_paged(*t)
    _close(run_c(*t), expect, dtype)  # automatic split choice (2 items on CPU -> split)
    _close(run_c(*t, num_splits=4), expect, dtype)  # forced
    _close(run_c(*t, num_splits=7), expect, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_wrapper_int64_and_scale(device):
    q, kc, vc, bt, kv, cu = make_paged([3, 1, 16], [40, 17, 16], 8, 2, 64, 16, torch.float32, device)
    out = ops.paged_attention(q, kc, vc, bt.long(), kv.long(), cu.long(), scale=0.3)
    _close(out, expect_paged(q, kc, vc, bt, kv, cu, scale=0.3), torch.float32)
    # metadata on the host while q is on the device works too (the plan moves it)
    out = ops.paged_attention(q, kc, vc, bt.cpu().long(), kv.cpu(), cu.cpu(), causal=False)
    _close(out, expect_paged(q, kc, vc, bt, kv, cu, causal=False), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_plan_run_update(device):
    bs, Hq, Hkv, D = 16, 8, 2, 64
    q, kc, vc, bt, kv, cu = make_paged([1, 1, 1], [15, 16, 33], Hq, Hkv, D, bs, torch.float32, device, extra_blocks=4)
    plan = ops.PagedAttentionPlan(bt.long(), kv, cu, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=bs)
    assert plan.max_q_len == 1 and plan.block_table.dtype == torch.int32
    out = torch.full_like(q, float("nan"))
    res = plan.run(q, kc, vc, out=out)
    assert res is out
    _close(out, expect_paged(q, kc, vc, bt, kv, cu), torch.float32)
    # one decode step: store a new token for every sequence, bump kv_lens in place, run again
    kv2 = kv + 1
    k_new = torch.randn(3, Hkv, D, device=q.device)
    v_new = torch.randn(3, Hkv, D, device=q.device)
    slots = torch.stack([bt[b, kv[b] // bs].long() * bs + kv[b] % bs for b in range(3)])
    ops.store_kv(k_new, v_new, kc, vc, slots)
    kv_before = plan.kv_lens
    plan.update(kv_lens=kv2.long())
    assert plan.kv_lens is kv_before
    q2 = torch.randn_like(q)
    out.fill_(float("nan"))
    plan.run(q2, kc, vc, out=out)
    _close(out, expect_paged(q2, kc, vc, bt, kv2, cu), torch.float32)
    with pytest.raises(ValueError, match="kv_lens must keep shape"):
        plan.update(kv_lens=torch.ones(4, dtype=torch.int32))


def test_paged_attention_numpy_through_C():
    q, kc, vc, bt, kv, cu = make_paged([2, 1], [20, 9], 4, 2, 64, 8, torch.float32)
    out = np.full(q.shape, np.nan, dtype=np.float32)
    _C.paged_attention(q.numpy(), kc.numpy(), vc.numpy(), bt.numpy(), kv.numpy(), cu.numpy(), out)
    _close(torch.from_numpy(out), expect_paged(q, kc, vc, bt, kv, cu), torch.float32)
    # read-only output array
    ro = np.zeros(q.shape, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises((ValueError, TypeError), match="out"):
        _C.paged_attention(q.numpy(), kc.numpy(), vc.numpy(), bt.numpy(), kv.numpy(), cu.numpy(), ro)


def test_custom_ops_registered():
    q, kc, vc, bt, kv, cu = make_paged([2], [5], 2, 1, 64, 16, torch.float32)
    out = torch.ops.vita.paged_attention(q, kc, vc, bt, kv, cu, True, None)
    _close(out, expect_paged(q, kc, vc, bt, kv, cu), torch.float32)


# ---- store_kv ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs", [16, 32, 8, 256, 24])
@pytest.mark.parametrize("dtype,idx", [(torch.float32, torch.int32), (torch.bfloat16, torch.int64), (torch.float16, torch.int32)])
def test_store_kv(bs, dtype, idx, device):
    T, H, D, nblk = 37, 4, 64, 5
    g = torch.Generator().manual_seed(1)
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    slots = torch.randperm(nblk * bs, generator=g)[:T].to(idx)
    slots[::5] = -1
    kc = torch.randn(nblk, bs, H, D, generator=g).to(dtype)
    vc = torch.randn(nblk, bs, H, D, generator=g).to(dtype)
    ek, ev = kc.clone(), vc.clone()
    ref.store_kv(k, v, ek, ev, slots)
    dev = torch.device(device)
    kc, vc = kc.to(dev), vc.to(dev)
    ops.store_kv(k.to(dev), v.to(dev), kc, vc, slots.to(dev))
    assert torch.equal(kc.cpu(), ek) and torch.equal(vc.cpu(), ev)


# ---- varlen_attention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D,Hq,Hkv", [(torch.float32, 64, 8, 8), (torch.float32, 128, 8, 2), (torch.bfloat16, 64, 6, 3),
                                            (torch.float16, 128, 4, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_varlen_attention(dtype, D, Hq, Hkv, causal, bias, device):
    g = torch.Generator().manual_seed(2)
    lens = [1, 17, 0, 64, 150]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(T, Hkv, D, generator=g).to(dtype)
    kb = torch.randn(Hq, T, generator=g).to(dtype) if bias else None
    expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, causal=causal, key_bias=None if kb is None else kb.double())
    dev = torch.device(device)
    out = ops.varlen_attention(q.to(dev), k.to(dev), v.to(dev), cu.long().to(dev), causal=causal,
                               key_bias=None if kb is None else kb.to(dev))
    _close(out, expect, dtype)


def test_varlen_attention_strided_qkv_and_scale():
    T, H, D = 50, 4, 64
    qkv = torch.randn(T, 3, H, D)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    out = ops.varlen_attention(q, k, v, cu, scale=0.2)
    _close(out, ref.varlen_attention(q.double(), k.double(), v.double(), cu, scale=0.2), torch.float32)


# The encoder tile path (csrc/cpu/attention_encoder_impl.h: 48-row query blocks, 64-key blocks, rows
# in groups of 6): lengths on both sides of every block edge, T = 1, ragged and empty sequences, GQA,
# head sizes that take the tile path on one ISA and the generic driver on the other (24, 40: not a
# multiple of 16), poisoned outputs (NaN) and inputs strided out of a wider buffer.
@pytest.mark.parametrize("lens", [[1], [5], [47, 48, 49], [63, 64, 65], [6, 0, 127, 1], [248], [300, 7]])
@pytest.mark.parametrize("Hq,Hkv,D", [(16, 16, 64), (8, 2, 32), (6, 3, 40), (2, 1, 24)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_varlen_attention_tiles(lens, Hq, Hkv, D, causal, bias, isa):
    g = torch.Generator().manual_seed(sum(lens) + Hq + D)
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, Hq + 1, D, generator=g)[:, 1:]  # strided rows
    k = torch.randn(T, Hkv, D, generator=g)
    v = torch.randn(T, Hkv, D, generator=g) * 2
    kb = (torch.randn(2 * Hq, T, generator=g) * 3)[::2] if bias else None
    out = torch.full((T, Hq, D), float("nan"))
    _C.varlen_attention(q, k, v, cu, out, causal, kb, 0.3)
    expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, causal=causal, scale=0.3,
                                  key_bias=None if kb is None else kb.double())
    _close(out, expect, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_tiles_16bit(dtype, causal, isa):
    g = torch.Generator().manual_seed(5)
    lens = [248, 33]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    T, H, D = int(cu[-1]), 4, 64
    q, k, v = (torch.randn(T, H, D, generator=g).to(dtype) for _ in range(3))
    kb = torch.randn(H, T, generator=g).to(dtype)
    out = ops.varlen_attention(q, k, v, cu, causal=causal, key_bias=kb)
    expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, causal=causal, key_bias=kb.double())
    _close(out, expect, dtype)


def test_varlen_attention_minus_inf_bias(isa):
    # -inf bias masks keys; a head whose every key is masked gives 0, never NaN (the reference's
    # nan_to_num); large finite scores do not overflow the softmax
    g = torch.Generator().manual_seed(6)
    lens = [70, 9]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    T, H, D = int(cu[-1]), 3, 64
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    q[:, 2] *= 40
    kb = torch.randn(H, T, generator=g)
    kb[0, ::3] = float("-inf")
    kb[1] = float("-inf")
    out = ops.varlen_attention(q, k, v, cu, key_bias=kb)
    expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, key_bias=kb.double())
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    _close(out, expect, torch.float32)


def test_varlen_attention_long_sequence_generic_driver():
    # longer than the tile path's 4096 keys: the online-softmax driver
    g = torch.Generator().manual_seed(7)
    T, D = 4100, 16
    q, k, v = (torch.randn(T, 1, D, generator=g) for _ in range(3))
    kb = torch.randn(1, T, generator=g)
    cu = torch.tensor([0, T], dtype=torch.int32)
    out = ops.varlen_attention(q, k, v, cu, key_bias=kb)
    _close(out, ref.varlen_attention(q.double(), k.double(), v.double(), cu, key_bias=kb.double()), torch.float32)


# ---- bad arguments -------------------------------------------------------------------------------------

def _base():
    q, kc, vc, bt, kv, cu = make_paged([2, 1], [20, 9], 4, 2, 64, 8, torch.float32, poison=0.0)
    return dict(q=q, kc=kc, vc=vc, bt=bt, kv=kv, cu=cu, out=torch.empty_like(q))


def _call(d):
    _C.paged_attention(d["q"], d["kc"], d["vc"], d["bt"], d["kv"], d["cu"], d["out"])


PAGED_BAD = [
    ("kc", lambda d: d["kc"][:, :, 0], ValueError, r"paged_attention: k_cache must be 4-D \[blocks, block_size, kv_heads, head_dim\], got \(\d+, 8, 64\)"),
    ("vc shape", lambda d: d["vc"][:, :4], ValueError, "v_cache must have the shape of k_cache"),
    ("heads", lambda d: d["kc"].new_zeros(d["kc"].shape[0], 8, 3, 64), ValueError, r"q heads \(4\) must be a multiple of k_cache kv_heads \(3\)"),
    ("head_dim", lambda d: d["kc"].new_zeros(d["kc"].shape[0], 8, 2, 32), ValueError, "k_cache dim 3 \\(head_dim of q\\) must be 64"),
    ("dtype", lambda d: d["kc"].double(), TypeError, "k_cache must have the dtype of q"),
    ("bt dtype", lambda d: d["bt"].long(), TypeError, "block_table must be int32, got int64"),
    ("kv dtype", lambda d: d["kv"].float(), TypeError, "kv_lens must be int32, got float32"),
    ("cu dtype", lambda d: d["cu"].long(), TypeError, "cu_q_lens must be int32"),
    ("bt short", lambda d: d["bt"][:, :1], ValueError, "block_table has 1 blocks per sequence but kv_lens\\[0\\] = 20 needs 3"),
    ("kv < q", lambda d: torch.tensor([1, 9], dtype=torch.int32), ValueError, r"kv_lens\[0\] \(1\) must be >= the sequence's q_len \(2\)"),
    ("cu order", lambda d: torch.tensor([0, 3, 2], dtype=torch.int32), ValueError, "cu_q_lens must be non-decreasing"),
    ("cu last", lambda d: torch.tensor([0, 2, 2], dtype=torch.int32), ValueError, r"cu_q_lens\[-1\] must equal the number of tokens 3"),
    ("cu len", lambda d: torch.tensor([0, 3], dtype=torch.int32), ValueError, "cu_q_lens dim 0"),
    ("block id", lambda d: torch.where(d["bt"] == d["bt"][0, 0], 999, d["bt"]).int(), ValueError, r"block_table\[0, 0\] must be in \[0, "),
    ("negative id", lambda d: torch.where(d["bt"] == d["bt"][1, 0], -1, d["bt"]).int(), ValueError, r"block_table\[1, 0\] must be in"),
    ("out shape", lambda d: d["out"][:2], ValueError, "out must have the shape of q"),
    ("out dtype", lambda d: d["out"].half(), TypeError, "out must have the dtype of q"),
    ("q ndim", lambda d: d["q"][0], ValueError, "q must be 3-D"),
    ("q dtype", lambda d: d["q"].long(), TypeError, "q must be float32, float16 or bfloat16"),
]
_KEY = {"kc": "kc", "vc shape": "vc", "heads": "kc", "head_dim": "kc", "dtype": "kc", "bt dtype": "bt", "kv dtype": "kv", "cu dtype": "cu",
        "bt short": "bt", "kv < q": "kv", "cu order": "cu", "cu last": "cu", "cu len": "cu", "block id": "bt", "negative id": "bt",
        "out shape": "out", "out dtype": "out", "q ndim": "q", "q dtype": "q"}


@pytest.mark.parametrize("name,mk,exc,match", PAGED_BAD, ids=[p[0] for p in PAGED_BAD])
def test_paged_attention_bad_arguments(name, mk, exc, match):
    d = _base()
    d[_KEY[name]] = mk(d)
    if _KEY[name] == "kc":
        d["vc"] = d["kc"].clone()
    with pytest.raises(exc, match=match):
        _call(d)


def test_paged_attention_bad_arguments_misc():
    d = _base()
    ro = np.zeros(tuple(d["q"].shape), dtype=np.float32)
    ro.flags.writeable = False
    d["q"], d["kc"], d["vc"], d["bt"], d["kv"], d["cu"] = (d[k].numpy() for k in ("q", "kc", "vc", "bt", "kv", "cu"))
    d["out"] = ro
    with pytest.raises(ValueError, match="paged_attention: out is read-only"):
        _call(d)
    d = _base()
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        _C.paged_attention(d["q"], d["kc"], d["vc"], d["bt"], d["kv"], d["cu"], d["out"], None, True, 0, 0)
    with pytest.raises(TypeError, match="block_table must be int32 or int64"):
        ops.paged_attention(d["q"], d["kc"], d["vc"], d["bt"].float(), d["kv"], d["cu"])
    if HAS_CUDA:
        with pytest.raises(TypeError, match="must be on the device of q"):
            _C.paged_attention(d["q"], d["kc"].cuda(), d["vc"], d["bt"], d["kv"], d["cu"], d["out"])


def test_store_kv_bad_arguments():
    k = torch.randn(4, 2, 64)
    kc = torch.zeros(3, 8, 2, 64)
    s = torch.tensor([0, 1, -1, 23], dtype=torch.int32)
    _C.store_kv(k, k, kc, kc.clone(), s)
    cases = [
        (dict(kc=torch.zeros(3, 8, 2, 32)), ValueError, "k_cache dim 3 \\(head_dim of k\\) must be 64"),
        (dict(kc=torch.zeros(3, 8, 4, 64)), ValueError, "k_cache dim 2 \\(kv_heads of k\\) must be 2"),
        (dict(vc=torch.zeros(3, 4, 2, 64)), ValueError, "v_cache must have the shape of k_cache"),
        (dict(s=torch.tensor([0, 1, 2, 24], dtype=torch.int32)), ValueError, r"slot_mapping\[3\] must be -1 or in \[0, 24\)"),
        (dict(s=torch.tensor([0, 1, 2, -2])), ValueError, r"slot_mapping\[3\] must be -1"),
        (dict(s=torch.tensor([0.0, 1, 2, 3])), TypeError, "slot_mapping must be int32 or int64"),
        (dict(s=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError, "slot_mapping dim 0"),
        (dict(kc=torch.zeros(3, 8, 2, 64, dtype=torch.float16)), TypeError, "k_cache must have the dtype of k"),
        (dict(k=torch.randn(4, 2, 64, 1)), ValueError, "k must be 3-D"),
    ]
    for over, exc, match in cases:
        a = dict(k=k, v=k, kc=kc, vc=kc.clone(), s=s)
        a.update(over)
        if "kc" in over and "vc" not in over:
            a["vc"] = a["kc"].clone()
        if "k" in over:
            a["v"] = a["k"]
        with pytest.raises(exc, match=match):
            _C.store_kv(a["k"], a["v"], a["kc"], a["vc"], a["s"])
    ro = np.zeros((3, 8, 2, 64), dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="store_kv: k_cache is read-only"):
        _C.store_kv(k.numpy(), k.numpy(), ro, np.zeros_like(ro), s.numpy())


def test_varlen_attention_bad_arguments():
    T, H, D = 10, 4, 64
    q = torch.randn(T, H, D)
    k = torch.randn(T, 2, D)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = torch.empty_like(q)
    _C.varlen_attention(q, k, k, cu, out)
    cases = [
        (dict(k=torch.randn(T, 3, D)), ValueError, r"q heads \(4\) must be a multiple of k kv_heads \(3\)"),
        (dict(k=torch.randn(T, 2, 32)), ValueError, "k dim 2 \\(head_dim of q\\) must be 64"),
        (dict(v=torch.randn(T, 1, D)), ValueError, "v must have the shape of k"),
        (dict(cu=torch.tensor([0, 5, 4], dtype=torch.int32)), ValueError, "cu_seqlens must be non-decreasing"),
        (dict(cu=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"cu_seqlens\[-1\] must equal the number of tokens 10"),
        (dict(cu=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens must be int32, got int64"),
        (dict(kb=torch.randn(H, T - 1)), ValueError, r"key_bias dim 1 \(tokens of q\) must be 10"),
        (dict(kb=torch.randn(H + 1, T)), ValueError, r"key_bias dim 0 \(q_heads of q\) must be 4"),
        (dict(kb=torch.randn(H, T, 1)), ValueError, "key_bias must be 2-D"),
        (dict(out=torch.empty(T, H, D, dtype=torch.float16)), TypeError, "out must have the dtype of q"),
        (dict(k=torch.randn(T, 2, D).half()), TypeError, "k must have the dtype of q"),
    ]
    for over, exc, match in cases:
        a = dict(q=q, k=k, v=k, cu=cu, out=out, kb=None)
        a.update(over)
        if "k" in over and "v" not in over:
            a["v"] = a["k"]
        with pytest.raises(exc, match=match):
            _C.varlen_attention(a["q"], a["k"], a["v"], a["cu"], a["out"], False, a["kb"])


def test_num_splits_cpu():
    assert _C.paged_attention_num_splits(1, 4, 4096, 1, -1) == 1


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("q_lens,kv_lens", [([64], [4160 // 8]), ([37, 256], [300, 1000]), ([1, 99], [999, 130])])
def test_bf16_prefill_blocks_beyond_32_rows(D, q_lens, kv_lens):
    """Prefill-sized bf16 blocks (the AMX / vdpbf16ps path on CPUs that have it) vs float64."""
    t = make_paged(q_lens, kv_lens, 28 if D == 128 else 8, 4 if D == 128 else 2, D, 16, torch.bfloat16, "cpu")
    out = run_c(*t)
    _close(out, expect_paged(*t), torch.bfloat16)


@pytest.mark.parametrize("isa_name", ["native", "avx512bf16", "avx512", "avx2"])
@pytest.mark.parametrize("q_lens,kv_lens", [
    ([40, 5], [255, 257]),          # one key short of / one past a 256-key AMX tile; 280 and 35 rows
    ([33, 100], [512, 613]),        # whole tiles; rows not a multiple of 32; causal rows inside a tile pair
    ([1, 70], [1, 1100]),           # a 1-key sequence next to several tiles
])
def test_bf16_prefill_tile_edges(isa_name, q_lens, kv_lens, monkeypatch):
    """bf16 query blocks on every CPU path (AMX 256-key tiles, vdpbf16ps, AVX-512, AVX2) vs float64,
    and the error stays close to what rounding the exact answer to bf16 costs (the cheap exp2 and
    bf16 P must not add more than that)."""
    if isa_name != "native":
        monkeypatch.setenv("VITA_CPU_ISA", isa_name)
    t = make_paged(q_lens, kv_lens, 28, 4, 128, 16, torch.bfloat16, "cpu", seed=3)
    out = run_c(*t)
    expect = expect_paged(*t)
    _close(out, expect, torch.bfloat16)
    err = (out.double() - expect).abs().mean().item()
    rounding = (expect.to(torch.bfloat16).double() - expect).abs().mean().item()
    assert err < 3 * rounding, (err, rounding)
    _close(run_c(*t, causal=False), expect_paged(*t, causal=False), torch.bfloat16)


@pytest.mark.parametrize("q_lens,kv_lens", [([100, 3, 64], [1100, 70, 4100]), ([80], [80])])
def test_fp32_prefill_large_blocks(q_lens, kv_lens, isa):
    """fp32 query blocks of several hundred rows (GQA 7: up to 512 rows per item, so 100 tokens
    take two blocks), packed K^T / V tiles, whole-tile rows without masks next to causal ones."""
    t = make_paged(q_lens, kv_lens, 28, 4, 128, 16, torch.float32, "cpu", seed=5)
    for causal in (True, False):
        _close(run_c(*t, causal=causal), expect_paged(*t, causal=causal), torch.float32)


@pytest.mark.parametrize("threads", [1, 3])
def test_bf16_prefill_merged_blocks(threads):
    """Few threads and a long chunk: the AMX plan merges query blocks (hundreds to ~2000 rows per
    item); the result must not depend on the thread count."""
    old = _C.num_threads()
    t = make_paged([256, 130], [4352, 700], 28, 4, 128, 16, torch.bfloat16, "cpu", seed=7)
    try:
        _C.set_num_threads(threads)
        out = run_c(*t)
        _C.set_num_threads(4)
        out4 = run_c(*t)
    finally:
        _C.set_num_threads(old)
    _close(out, expect_paged(*t), torch.bfloat16)
    _close(out4, expect_paged(*t), torch.bfloat16)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("dtype,Hq,Hkv,B", [(torch.float32, 14, 14, 16), (torch.bfloat16, 14, 14, 16), (torch.float32, 14, 14, 5),
                                            (torch.float32, 26, 13, 7), (torch.float16, 14, 14, 3)])
def test_decode_items_of_several_kv_heads(dtype, Hq, Hkv, B, threads, isa):
    """Decode with 1-2 query heads per KV head (the TTS: 14/14 x 64): while the threads have enough
    items, one item holds several (or all) KV heads of a sequence. Ragged kv lengths on and beside
    page boundaries, a few 2-4 token rows (causal limits per head), head counts that do not divide."""
    kv_lens = [1, 15, 16, 17, 128, 33, 64, 100, 2, 129, 47, 80, 31, 5, 96, 112][:B]
    q_lens = [1 if i % 4 else 2 + i % 3 for i in range(B)]
    q_lens = [min(ql, kl) for ql, kl in zip(q_lens, kv_lens)]
    t = make_paged(q_lens, kv_lens, Hq, Hkv, 64, 16, dtype, "cpu", seed=9)
    old = _C.num_threads()
    try:
        _C.set_num_threads(threads)
        outs = {c: run_c(*t, causal=c) for c in (True, False)}
    finally:
        _C.set_num_threads(old)
    for causal, out in outs.items():
        _close(out, expect_paged(*t, causal=causal), dtype)

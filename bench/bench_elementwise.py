"""pytest-benchmark: the row-wise ops vs their torch references, same shapes, same run.

Run: PYTHONPATH=python pytest bench/bench_elementwise.py --benchmark-group-by=param:case
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, nvtx_range

from vita_engine import ops
from vita_engine.ops import reference as ref

T, H = 256, 3584  # a prefill chunk at Qwen2.5-7B width


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(H, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(T, 28, 128, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(T, 4, 128, generator=g).to(device=device, dtype=dtype)
    pos = torch.arange(T, device=device) + 1000
    gu = torch.randn(T, 2 * 18944, generator=g).to(device=device, dtype=dtype)
    ids = torch.randint(0, 152064, (T,), generator=g).to(device)
    ids[10:74] = -200
    emb = torch.randn(152064, H // 4, generator=g).to(device=device, dtype=dtype)  # narrower table keeps memory modest
    mm = torch.randn(64, H // 4, generator=g).to(device=device, dtype=dtype)
    return dict(x=x, r=r, w=w, q=q, k=k, pos=pos, gu=gu, ids=ids, emb=emb, mm=mm)


CASES = {
    "rms_norm": (lambda a: ops.rms_norm(a["x"], a["w"]), lambda a: ref.rms_norm(a["x"], a["w"])),
    "fused_add_rms_norm": (lambda a: ops.fused_add_rms_norm(a["x"], a["r"], a["w"]), lambda a: ref.fused_add_rms_norm(a["x"], a["r"], a["w"])),
    "rotary_embedding": (lambda a: ops.rotary_embedding(a["q"], a["k"], a["pos"], 1e6), lambda a: ref.rotary_embedding(a["q"], a["k"], a["pos"], 1e6)),
    "silu_and_mul": (lambda a: ops.silu_and_mul(a["gu"]), lambda a: F.silu(a["gu"][:, :18944]) * a["gu"][:, 18944:]),
    "fuse_embeddings": (lambda a: ops.fuse_embeddings(a["ids"], a["emb"], a["mm"]), lambda a: ref.fuse_embeddings(a["ids"], a["emb"], a["mm"])),
}


@pytest.mark.parametrize("impl", ["vita", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_op(benchmark, case, device, dtype, impl, sync):
    a = _inputs(device, dtype)
    fn = CASES[case][0 if impl == "vita" else 1]
    benchmark.group = f"{case}-{device}-{dtype}"

    def run():
        with nvtx_range(f"{case}:{impl}"):
            fn(a)
        sync(device)

    benchmark(run)

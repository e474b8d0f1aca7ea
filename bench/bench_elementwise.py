"""pytest-benchmark: the row-wise ops vs their torch references at Qwen2.5-7B widths (fp32 and bf16)."""
import pytest

from vita_engine.benchmarks.suite import bench, pytest_params

FAMILIES = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "fuse_embeddings"]
BOTH = ["float32", "bfloat16"]


@pytest.mark.parametrize("device,case,dtype,impl", pytest_params(FAMILIES, {"cpu": BOTH, "cuda": BOTH}))
def test_op(benchmark, device, case, dtype, impl):
    bench(benchmark, case, device, dtype, impl)

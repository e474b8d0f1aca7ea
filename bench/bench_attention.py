"""pytest-benchmark: KV write, paged decode / chunked prefill (28/4 heads x 128, block 16) and varlen
encoder attention vs torch SDPA on the dense equivalent (the fastest variant), same run. The "vita"
test stores the interleaved ratio and GB/s or TFLOP/s (and the fraction of the GPU's peak) in
extra_info. CPU runs the reduced grid unless VITA_BENCH_FULL=1."""
import pytest

from vita_engine.benchmarks.suite import bench, pytest_params


@pytest.mark.parametrize("device,case,dtype,impl", pytest_params(["store_kv", "paged_decode", "paged_prefill", "varlen_attention"]))
def test_attention(benchmark, device, case, dtype, impl):
    bench(benchmark, case, device, dtype, impl)

"""pytest-benchmark: sample_tokens (greedy, temperature, top-2) vs torch argmax / multinomial."""
import pytest

from vita_engine.benchmarks.suite import bench, pytest_params


@pytest.mark.parametrize("device,case,dtype,impl", pytest_params(["sample_tokens"]))
def test_sampling(benchmark, device, case, dtype, impl):
    bench(benchmark, case, device, dtype, impl)

"""pytest-benchmark: the codec convolutions at the real layer shapes, the streaming decoder (first
window, steady-state push) and (VITA_BENCH_FULL=1) the full decode, vs torch.nn.functional."""
import pytest

from vita_engine.benchmarks.suite import bench, pytest_params


@pytest.mark.parametrize("device,case,dtype,impl", pytest_params(["codec_conv1d", "codec_conv_transpose1d", "codec_stream", "codec_decode"]))
def test_codec(benchmark, device, case, dtype, impl):
    bench(benchmark, case, device, dtype, impl)

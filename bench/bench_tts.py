"""pytest-benchmark: one TTS AR step at the real VITA-1.5 TTS sizes (random weights), batch 1 and 16:
TTSBatchDecoder.step vs the same step in plain torch (static K/V cache + SDPA)."""
import pytest

from vita_engine.benchmarks.suite import bench, pytest_params


@pytest.mark.parametrize("device,case,dtype,impl", pytest_params(["tts_step"]))
def test_tts_ar_step(benchmark, device, case, dtype, impl):
    bench(benchmark, case, device, dtype, impl)

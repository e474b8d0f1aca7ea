"""pytest-benchmark: one TTS AR step (TTSBatchDecoder.step) vs a naive HF-style dense-KV torch step,
same weights, same run; batch 1 and 16; tiny checkpoint and real VITA-1.5 TTS dimensions (random weights).

Run: PYTHONPATH=python pytest bench/bench_tts.py --benchmark-group-by=param:model,param:batch,param:device
(the real-dimension cases on CPU only with VITA_BENCH_FULL=1; on CUDA always, in bf16)."""
import pytest
import torch
from conftest import DEVICES, FULL
from _tts_models import engine_stepper, naive_stepper, no_eos, real_tts, tiny_tts

ROUNDS, WARMUP, TEXT_LEN = 8, 2, 20
_cache = {}


def _tts(model, device):
    key = (model, device)
    if key not in _cache:
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        t = tiny_tts(device, dt) if model == "tiny" else real_tts(device, dt)
        no_eos(t)
        _cache[key] = t
    return _cache[key]


@pytest.mark.parametrize("impl", ["engine", "naive"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("model", ["tiny", "real"])
@pytest.mark.parametrize("device", DEVICES)
def test_tts_ar_step(benchmark, device, model, batch, impl):
    if model == "real" and device == "cpu" and not FULL:
        pytest.skip("real dimensions on CPU: set VITA_BENCH_FULL=1")
    tts = _tts(model, device)
    if impl == "engine":
        fn = engine_stepper(tts, batch, TEXT_LEN, steps=ROUNDS + WARMUP + 4)
    else:
        fn = naive_stepper(tts, batch, TEXT_LEN).step
    benchmark.extra_info.update(backend=tts.ops.backend()["paged_attention"])
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

"""pytest-benchmark: full-size TiCodec decode (ours vs the pure-torch reference graph in the same run)
and the streaming first window. Real-time factor = benchmark.extra_info["rtf"].

Run: PYTHONPATH=python pytest bench/bench_codec.py --benchmark-group-by=group
Batch 64 only with VITA_BENCH_FULL=1.
"""
import pytest
import torch
from codec_rtf import full_codec
from conftest import DEVICES, FULL

BATCHES = [1, 8] + ([64] if FULL else [])
_CACHE = {}


def _codec(device):
    if device not in _CACHE:
        _CACHE[device] = full_codec(device, torch.float32 if device == "cpu" else torch.bfloat16)
    return _CACHE[device]


@pytest.mark.parametrize("impl", ["vita", "torch"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("device", DEVICES)
def test_codec_decode(benchmark, device, batch, impl, sync):
    c = _codec(device)
    tokens = 10 if device == "cpu" else 40
    tok = torch.randint(0, c.n_codes, (batch, tokens))
    benchmark.group = f"codec-decode-{device}-b{batch}"

    def run():
        c.decode_batch(tok, use_reference=impl == "torch")
        sync(device)

    benchmark.pedantic(run, rounds=3 if device == "cpu" else 10, warmup_rounds=1)
    benchmark.extra_info["rtf"] = batch * tokens * c.hop_length / c.sample_rate / benchmark.stats.stats.median


@pytest.mark.parametrize("device", DEVICES)
def test_codec_first_window(benchmark, device, sync):
    c = _codec(device)
    tok = torch.randint(0, c.n_codes, (c.lookahead_tokens + 1,))
    benchmark.group = f"codec-stream-{device}"

    def run():
        s = c.stream()
        s.push(tok)
        sync(device)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["lookahead_tokens"] = c.lookahead_tokens

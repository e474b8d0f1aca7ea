"""Audio input path: PCM validation/conversion, streaming resampling, Silero VAD end-pointing on
bundled speech, and the incremental fbank/encoder frontend vs the batch path."""
import threading

import numpy as np
import pytest
import torch

from conftest import max_errs
from vita_engine.data import SAMPLES, load_sample, sample_path
from vita_engine.runtime.audio_in import Resampler, check_sample_rate, to_float32_mono
from vita_engine.runtime.frontend import IncrementalAudioFrontend
from vita_engine.runtime.vad import (SpeculativeEnd, SpeechDiscarded, SpeechResumed, SpeechStart, StreamingVAD,
                                     TurnEnd, VADConfig, load_vad_model)

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Silero's per-frame ops and the tiny encoder are latency-bound: intra-op threads only add
    contention on the shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def zeros(seconds):
    return np.zeros(int(round(seconds * SR)), np.float32)


def random_chunks(x, rng, lo=1, hi=3000):
    i = 0
    while i < len(x):
        n = int(rng.integers(lo, hi))
        yield x[i:i + n]
        i += n


# ---- to_float32_mono -------------------------------------------------------------------------------
def test_int16_and_float_conversion():
    a = np.array([0, 16384, -32768, 32767], np.int16)
    y = to_float32_mono(a, sample_rate=SR)
    assert y.dtype == np.float32 and y.shape == (4,)
    np.testing.assert_array_equal(y, np.array([0, 0.5, -1.0, 32767 / 32768], np.float32))
    for dt in (np.float32, np.float64):
        f = np.linspace(-1, 1, 11).astype(dt)
        y = to_float32_mono(f, sample_rate=44100)
        assert y.dtype == np.float32 and y.flags.c_contiguous
        np.testing.assert_allclose(y, f, atol=1e-7)
    # torch input, [n, 1] and stereo [n, 2] -> mean
    t = torch.tensor([[0.2, 0.4], [-0.2, 0.0], [1.0, -1.0]])
    np.testing.assert_allclose(to_float32_mono(t, sample_rate=48000), [0.3, -0.1, 0.0], atol=1e-7)
    np.testing.assert_allclose(to_float32_mono(t[:, :1], sample_rate=48000), [0.2, -0.2, 1.0], atol=1e-7)
    ti = torch.tensor([[16384, -16384], [32767, 32767]], dtype=torch.int16)
    np.testing.assert_allclose(to_float32_mono(ti, sample_rate=8000), [0.0, 32767 / 32768], atol=1e-7)
    # slight float overshoot is clipped, non-contiguous input is fine
    np.testing.assert_array_equal(to_float32_mono(np.array([1.2, -1.01]), sample_rate=SR), [1.0, -1.0])
    s = np.arange(20, dtype=np.float32).reshape(10, 2)[::2] / 100
    np.testing.assert_allclose(to_float32_mono(s, sample_rate=SR), s.mean(1), atol=1e-7)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.zeros(0, np.float32), ValueError, "empty"),
    (np.zeros((0, 2), np.int16), ValueError, "empty"),
    (np.array([0.1, np.nan], np.float32), ValueError, "NaN"),
    (np.array([0.1, np.inf]), ValueError, "NaN or infinite"),
    (np.zeros(10, np.int32), TypeError, "int32"),
    (np.zeros(10, np.uint8), TypeError, "uint8"),
    (np.zeros(10, np.float16), TypeError, "float16"),
    (np.zeros(10, bool), TypeError, "bool"),
    (torch.zeros(10, dtype=torch.bfloat16), TypeError, "bfloat16"),
    (torch.zeros(10, dtype=torch.int32), TypeError, "int32"),
    (np.zeros((4, 2, 2), np.float32), ValueError, "shape"),
    (np.zeros((2, 1000), np.float32), ValueError, "channels-first"),
    (np.zeros((100, 3), np.float32), ValueError, "shape"),
    (np.array(0.5, np.float32), ValueError, "shape"),
    (np.full(10, 3000.0, np.float32), ValueError, "divide by 32768"),
    ([0.1, 0.2], TypeError, "numpy array or torch tensor"),
    (b"\x00\x01", TypeError, "numpy array or torch tensor"),
])
def test_bad_pcm_rejected(bad, exc, msg):
    with pytest.raises(exc, match=msg) as ei:
        to_float32_mono(bad, sample_rate=SR, name="chunk")
    assert "chunk" in str(ei.value)


@pytest.mark.parametrize("rate,exc", [(0, ValueError), (-16000, ValueError), (7999, ValueError),
                                      (192001, ValueError), (10 ** 9, ValueError), (16000.5, ValueError),
                                      ("16000", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_sample_rate_rejected(rate, exc):
    with pytest.raises(exc, match="sample_rate"):
        to_float32_mono(np.zeros(10, np.float32), sample_rate=rate)
    with pytest.raises(exc, match="in_rate"):
        Resampler(rate)


def test_sample_rate_bounds_accepted():
    for r in (8000, 16000, 22050, 44100.0, 192000):
        assert check_sample_rate(r) == int(r)
        assert to_float32_mono(np.zeros(4, np.int16), sample_rate=r).shape == (4,)


def test_chunk_length_cap():
    ten_minutes = np.zeros(10 * 60 * SR, np.int16)
    with pytest.raises(ValueError, match=r"600\.0 s .* exceeds the 60 s limit"):
        to_float32_mono(ten_minutes, sample_rate=SR)
    assert to_float32_mono(np.zeros(60 * 8000, np.int16), sample_rate=8000).shape == (480000,)
    with pytest.raises(ValueError, match="exceeds the 1 s limit"):
        to_float32_mono(np.zeros(8001, np.float32), sample_rate=8000, max_seconds=1)
    assert to_float32_mono(ten_minutes[:SR * 61], sample_rate=SR, max_seconds=None).shape == (SR * 61,)


# ---- Resampler -------------------------------------------------------------------------------------
def _peak_hz(y, sr):
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.argmax(spec) * sr / len(y)


@pytest.mark.parametrize("in_rate", [8000, 22050, 44100, 48000])
def test_resample_keeps_frequency_and_length(in_rate):
    n = in_rate  # 1 s
    t = np.arange(n) / in_rate
    for f0 in (440.0, 1000.0, 3100.0):
        x = (0.5 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)
        r = Resampler(in_rate)
        y = np.concatenate([r.process(x), r.flush()])
        assert abs(len(y) - n * SR / in_rate) <= 1
        assert abs(_peak_hz(y, SR) - f0) <= 2.0, (in_rate, f0, _peak_hz(y, SR))
        mid = y[2000:-2000]
        assert abs(np.sqrt(np.mean(mid ** 2)) - 0.5 / np.sqrt(2)) < 0.01  # passband gain ~1


def test_resample_antialias():
    x = (0.5 * np.sin(2 * np.pi * 11000.0 * np.arange(44100) / 44100)).astype(np.float32)
    r = Resampler(44100)
    y = np.concatenate([r.process(x), r.flush()])
    assert np.sqrt(np.mean(y ** 2)) < 1e-3  # above the 8 kHz Nyquist: removed, not aliased


@pytest.mark.parametrize("in_rate", [8000, 22050, 44100, 48000])
def test_resample_chunking_invariance(in_rate):
    rng = np.random.default_rng(in_rate)
    x = (0.3 * rng.standard_normal(in_rate // 2)).astype(np.float32)
    r = Resampler(in_rate)
    ref = np.concatenate([r.process(x), r.flush()])
    for trial in range(3):
        hi = [2, 50, 5000][trial]
        outs = [r.process(c) for c in random_chunks(x, rng, 1, hi)]
        outs.append(r.process(np.zeros(0, np.float32)))
        y = np.concatenate(outs + [r.flush()])
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, atol=1e-6)


def test_resample_identity_and_errors():
    r = Resampler(16000)
    assert r.identity
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    y = r.process(x)
    np.testing.assert_array_equal(y, x)
    assert y is not x and r.flush().shape == (0,)
    r2 = Resampler(48000, 16000)
    with pytest.raises(ValueError, match="1-D"):
        r2.process(np.zeros((10, 2), np.float32))
    with pytest.raises(TypeError, match="float"):
        r2.process(np.zeros(10, np.int16))
    with pytest.raises(ValueError, match="out_rate"):
        Resampler(16000, 4000)


# ---- bundled speech ----------------------------------------------------------------------------------
def test_bundled_samples():
    for name in SAMPLES:
        p = sample_path(name)
        assert p.suffix == ".wav" and p.stat().st_size < 200_000
        x, sr = load_sample(name + ".wav")
        assert sr == SR and x.dtype == np.float32 and x.ndim == 1
        assert 1.5 < len(x) / sr < 4.0 and 0.05 < np.abs(x).max() <= 1.0
    with pytest.raises(FileNotFoundError, match="available: hello, question"):
        sample_path("nope")


# ---- VAD ---------------------------------------------------------------------------------------------
def run_vad(x, seed=0, vad=None, **cfg):
    vad = vad or StreamingVAD(VADConfig(**cfg) if cfg else None)
    rng = np.random.default_rng(seed)
    events = []
    for c in random_chunks(x, rng):
        events += vad.push(c)
    return vad, events


def _pink(n, rng):
    w = rng.standard_normal(n)
    f = np.fft.rfft(w)
    f[1:] /= np.sqrt(np.arange(1, len(f)))
    f[0] = 0
    p = np.fft.irfft(f, n)
    return (p / p.std()).astype(np.float32)


def test_vad_config_defaults_and_validation():
    c = VADConfig()
    assert (c.threshold, c.min_silence_ms, c.min_speech_ms, c.speculative_silence_ms, c.frame_samples) == (0.7, 500, 1000, 200, 512)
    assert c.neg_threshold == pytest.approx(0.55)
    with pytest.raises(ValueError, match="speculative_silence_ms"):
        VADConfig(speculative_silence_ms=600)
    with pytest.raises(ValueError, match="threshold"):
        VADConfig(threshold=1.5)
    with pytest.raises(ValueError, match="sample_rate"):
        VADConfig(sample_rate=8000)


def test_vad_speech_turn():
    q, _ = load_sample("question")
    lead = 0.5
    x = np.concatenate([zeros(lead), q, zeros(1.0)])
    vad, ev = run_vad(x)
    kinds = [type(e) for e in ev]
    assert kinds == [SpeechStart, SpeculativeEnd, TurnEnd], ev
    start, spec, end = ev
    dur = len(q) / SR * 1000
    assert lead * 1000 - 100 <= start.speech_start_ms <= lead * 1000 + 150
    assert start.t_ms - start.speech_start_ms < 200
    assert abs(end.speech_end_ms - (lead * 1000 + dur)) < 200
    assert end.speech_start_ms == start.speech_start_ms
    # the speculative hint comes ~200 ms into the pause, the turn end ~500 ms into it, same cut point
    assert spec.speech_end_ms == end.speech_end_ms
    assert 200 <= spec.t_ms - (end.speech_end_ms - 30) < 200 + 64 + 30
    assert 500 <= end.t_ms - (end.speech_end_ms - 30) < 500 + 64 + 30
    assert not vad.is_speaking
    assert len(vad.probabilities) == len(x) // 512
    assert max(vad.probabilities) > 0.9 and max(vad.probabilities[:10]) < 0.3
    # a different chunking gives the same events; reset() starts the stream clock again
    vad.reset()
    assert vad.probabilities == [] and not vad.is_speaking
    assert run_vad(x, seed=7, vad=vad)[1] == ev


def test_vad_is_speaking_and_trailing_buffer():
    h, _ = load_sample("hello")
    vad = StreamingVAD()
    ev = vad.push(np.concatenate([zeros(0.3), h[:SR]]))  # mid-utterance
    assert [type(e) for e in ev] == [SpeechStart] and vad.is_speaking
    assert vad.push(np.zeros(100, np.float32)) == []
    assert vad.samples_consumed == (int(0.3 * SR) + SR + 100) // 512 * 512


@pytest.mark.parametrize("kind", ["silence", "white", "pink"])
def test_vad_no_turn_on_silence_or_noise(kind):
    rng = np.random.default_rng(3)
    n = 3 * SR
    x = {"silence": zeros(3.0), "white": 0.05 * rng.standard_normal(n).astype(np.float32),
         "pink": 0.05 * _pink(n, rng)}[kind]
    vad, ev = run_vad(x)
    assert not any(isinstance(e, (TurnEnd, SpeculativeEnd)) for e in ev), ev
    assert max(vad.probabilities) < 0.7


def test_vad_short_blip_ignored():
    h, _ = load_sample("hello")
    x = np.concatenate([zeros(0.5), h[: SR // 2], zeros(1.0)])  # "Hello" alone: ~0.5 s
    vad, ev = run_vad(x)
    assert not any(isinstance(e, (TurnEnd, SpeculativeEnd)) for e in ev), ev
    assert [type(e) for e in ev] == [SpeechStart, SpeechDiscarded]
    assert ev[1].speech_end_ms - ev[1].speech_start_ms < 1000
    assert not vad.is_speaking


def test_vad_speculative_end_then_resume():
    q, _ = load_sample("question")
    h, _ = load_sample("hello")
    x = np.concatenate([zeros(0.5), q, zeros(0.3), h, zeros(1.0)])
    _, ev = run_vad(x)
    kinds = [type(e) for e in ev]
    assert kinds == [SpeechStart, SpeculativeEnd, SpeechResumed, SpeculativeEnd, TurnEnd], ev
    assert ev[0].speech_start_ms == ev[-1].speech_start_ms  # one turn spanning both phrases
    assert ev[1].t_ms < ev[2].t_ms < ev[3].t_ms
    assert abs(ev[-1].speech_end_ms - (0.5 + (len(q) + len(h)) / SR + 0.3) * 1000) < 200
    assert ev[3].speech_end_ms == ev[-1].speech_end_ms


def test_vad_shared_model_streams_and_threads():
    """One process-wide model; interleaved / concurrent streams match a lone stream exactly, and the
    stateless batched path matches Silero's own stateful wrapper."""
    m = load_vad_model()
    assert load_vad_model() is m
    h, _ = load_sample("hello")
    xa = np.concatenate([zeros(0.2), h[:SR]])
    xb = (0.05 * np.random.default_rng(1).standard_normal(len(xa))).astype(np.float32)
    ref_a = run_vad(xa)[0].probabilities
    ref_b = run_vad(xb)[0].probabilities
    m.reset_states()
    with torch.inference_mode():
        wrapper = [float(m(torch.from_numpy(xa[i:i + 512]), SR)) for i in range(0, len(xa) - 511, 512)]
    m.reset_states()
    np.testing.assert_allclose(wrapper, ref_a, atol=2e-5)
    va, vb = StreamingVAD(), StreamingVAD()
    for i in range(0, len(xa), 700):
        va.push(xa[i:i + 700])
        vb.push(xb[i:i + 700])
    np.testing.assert_allclose(va.probabilities, ref_a, atol=2e-5)
    np.testing.assert_allclose(vb.probabilities, ref_b, atol=2e-5)
    out = {}

    def work(key, x):
        out[key] = run_vad(x)[0].probabilities

    ts = [threading.Thread(target=work, args=(k, x)) for k, x in (("a", xa), ("b", xb))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    np.testing.assert_allclose(out["a"], ref_a, atol=2e-5)
    np.testing.assert_allclose(out["b"], ref_b, atol=2e-5)


def test_vad_push_validation():
    vad = StreamingVAD()
    with pytest.raises(ValueError, match="1-D"):
        vad.push(np.zeros((512, 2), np.float32))
    with pytest.raises(TypeError, match="float"):
        vad.push(np.zeros(512, np.int16))
    assert vad.push(np.zeros(0, np.float32)) == []


def test_vad_does_not_change_torch_threads():
    import importlib
    import sys

    before = torch.get_num_threads()
    sys.modules.pop("silero_vad", None)  # importing silero_vad calls torch.set_num_threads(1)
    import vita_engine.runtime.vad as vadmod

    saved = vadmod._MODEL
    vadmod._MODEL = None
    try:
        torch.set_num_threads(2)
        vadmod.load_vad_model()
        assert torch.get_num_threads() == 2
    finally:
        vadmod._MODEL = saved
        torch.set_num_threads(before)
    importlib.invalidate_caches()


# ---- incremental frontend ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech():
    q, _ = load_sample("question")
    return np.concatenate([zeros(0.1), q[: int(1.7 * SR)], zeros(0.2)])


def test_frontend_fbank_matches_batch(tiny_model, speech):
    am = tiny_model.audio
    ref = am.fbank(speech)
    for seed, hi in ((0, 7), (1, 400), (2, 5000)):
        fe = IncrementalAudioFrontend(am)
        rng = np.random.default_rng(seed)
        for c in random_chunks(speech, rng, 1, hi) if hi > 7 else random_chunks(speech[:3000], rng, 1, hi):
            fe.push(c)
        r = ref if hi > 7 else am.fbank(speech[:3000])
        assert fe.features.shape == r.shape
        d, _ = max_errs(fe.features, r)
        assert d <= 1e-5, (seed, d)
    assert fe.stats["fbank_ms"] > 0 and fe.num_frames == ref.shape[0] and fe.num_samples == len(speech)


def test_frontend_encode_partial_and_finish(tiny_model, speech):
    am = tiny_model.audio
    fe = IncrementalAudioFrontend(am)
    assert fe.encode_partial() is None
    with pytest.raises(ValueError, match="too short"):
        fe.finish()
    rng = np.random.default_rng(5)
    half = len(speech) // 2
    for c in random_chunks(speech[:half], rng, 100, 2000):
        fe.push(c)
    part = fe.encode_partial()
    d, _ = max_errs(part, am.encode(speech[:half]))
    assert d < 1e-5
    assert fe.encode_partial() is part and fe.stats["cache_hits"] == 1 and fe.stats["encoder_runs"] == 1
    for c in random_chunks(speech[half:], rng, 100, 2000):
        fe.push(c)
    out = fe.finish()
    ref = am.encode(speech)
    assert out.shape == ref.shape and ref.dim() == 2
    d, _ = max_errs(out, ref)
    assert d < 1e-5
    assert fe.finish() is out and fe.stats["encoder_runs"] == 2 and fe.stats["encoder_ms"] > 0
    # end_ms cut: speculative encode then finish at the same cut point hits the cache
    cut_ms = 1200.0
    spec = fe.encode_partial(end_ms=cut_ms)
    assert fe.finish(end_ms=cut_ms) is spec
    d, _ = max_errs(spec, am.encode(speech[: int(cut_ms * 16)]))
    assert d < 1e-5
    fe.reset()
    assert fe.num_samples == 0 and fe.features.shape == (0, 80) and fe.stats["encoder_runs"] == 0
    fe.push(speech[:SR])
    assert fe.finish().shape[0] == 12  # 1 s -> 98 frames -> T_llm 12 (spec §11.1)

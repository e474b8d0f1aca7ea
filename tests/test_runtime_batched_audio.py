"""Audio input batched across sessions (the scheduler runs it every tick): `vad.push_many` and
`frontend.fbank_many` give each stream what its own push / fbank gives, for streams of different
lengths, chunkings and states, in one model call per tick."""
import numpy as np
import pytest
import torch

from vita_engine.data import load_sample
from vita_engine.runtime.frontend import IncrementalAudioFrontend, fbank_many
from vita_engine.runtime.vad import StreamingVAD, push_many

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _signals():
    q, _ = load_sample("question")
    h, _ = load_sample("hello")
    rng = np.random.default_rng(3)
    noise = (0.02 * rng.standard_normal(2 * SR)).astype(np.float32)
    z = np.zeros(int(0.7 * SR), np.float32)
    return [np.concatenate([z, q, z]), np.concatenate([h, z, h[: SR // 2], z]), noise, np.concatenate([z, h])]


def _chunkings(signals, seed):
    """Per tick, per stream: a chunk of 0..1500 samples (0: that stream sent nothing this tick)."""
    rng = np.random.default_rng(seed)
    pos = [0] * len(signals)
    ticks = []
    while any(p < len(x) for p, x in zip(pos, signals)):
        row = []
        for i, x in enumerate(signals):
            n = int(rng.integers(0, 1500)) if pos[i] < len(x) else 0
            row.append(x[pos[i]:pos[i] + n])
            pos[i] += n
        ticks.append(row)
    return ticks


def test_vad_push_many_equals_each_stream():
    sig = _signals()
    alone = [StreamingVAD() for _ in sig]
    many = [StreamingVAD() for _ in sig]
    ev_alone = [[] for _ in sig]
    ev_many = [[] for _ in sig]
    for row in _chunkings(sig, 0):
        for i, c in enumerate(row):
            ev_alone[i] += alone[i].push(c)
        idx = [i for i, c in enumerate(row) if c.size]
        for i, evs in zip(idx, push_many([many[i] for i in idx], [row[i] for i in idx])):
            ev_many[i] += evs
    for i in range(len(sig)):
        assert len(many[i].probabilities) == len(alone[i].probabilities) == len(sig[i]) // 512
        np.testing.assert_allclose(many[i].probabilities, alone[i].probabilities, rtol=0, atol=1e-5)
        assert [type(e).__name__ for e in ev_many[i]] == [type(e).__name__ for e in ev_alone[i]]
        assert [e.t_ms for e in ev_many[i]] == [e.t_ms for e in ev_alone[i]]
    assert any(ev_alone)  # the speech streams did produce turns
    assert [type(e).__name__ for e in ev_alone[0]].count("TurnEnd") == 1


def test_vad_push_many_checks():
    a, b = StreamingVAD(), StreamingVAD()
    with pytest.raises(ValueError, match="2 VAD streams but 1 chunks"):
        push_many([a, b], [np.zeros(10, np.float32)])
    with pytest.raises(TypeError, match="float"):
        push_many([a], [np.zeros(10, np.int16)])
    # a stream on its own model (not the shared Silero one) still works, unbatched
    calls = []
    c = StreamingVAD(model=lambda fr, sr: calls.append(fr.shape) or torch.tensor([0.9]))
    out = push_many([a, c], [np.zeros(1024, np.float32), np.zeros(1024, np.float32)])
    assert len(out) == 2 and len(calls) == 2 and [type(e).__name__ for e in out[1]] == ["SpeechStart"]


def test_fbank_many_equals_each_stream(tiny_model):
    am = tiny_model.audio
    sig = _signals()
    alone = [IncrementalAudioFrontend(am) for _ in sig]
    many = [IncrementalAudioFrontend(am) for _ in sig]
    for row in _chunkings(sig, 1):
        for i, c in enumerate(row):
            alone[i].push(c)
            many[i].append(c)
        if np.random.default_rng(len(row[0])).random() < 0.7:  # some ticks compute nothing (frames accumulate)
            fbank_many(many)
    for fa, fm, x in zip(alone, many, sig):
        ref = am.fbank(x)
        assert fm.features.shape == fa.features.shape == ref.shape  # `features` computes what is still pending
        torch.testing.assert_close(fm.features, fa.features, rtol=0, atol=1e-5)
        torch.testing.assert_close(fm.features, ref, rtol=0, atol=1e-5)
        assert fm.pending_frames == 0 and fm.stats["frames"] == ref.shape[0]
    # the encoder path sees the pending frames too (no fbank_many call before it)
    fe = IncrementalAudioFrontend(am)
    fe.append(sig[0][: SR])
    assert fe.pending_frames > 0
    torch.testing.assert_close(fe.finish(), am.encode_features(am.fbank(sig[0][: SR])), rtol=1e-5, atol=1e-5)

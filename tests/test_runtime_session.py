"""Session lifecycle, text and audio turns, history across turns, bad input, determinism under batching."""
import asyncio

import numpy as np
import pytest

from vita_engine.runtime import AudioChunk, Metrics, SessionClosedError, TextDelta, TurnEnd
from vita_engine.runtime import _compat

from runtime_util import check_turn_tail, kinds, make_engine, one_thread  # noqa: F401

KEYS = ("ttfa_ms", "response_ms", "prefill_ms", "first_text_token_ms")


@pytest.fixture(scope="module")
def engine(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt, max_sessions=4)
    yield e
    e.close()


def test_text_turn_events_and_close(engine):
    s = engine.session()
    free0 = engine.kv.free_blocks
    s.push_text("Hello, how are you today?")
    evs = s.collect(timeout=60)
    check_turn_tail(evs)
    assert any(isinstance(e, TextDelta) for e in evs)
    assert any(isinstance(e, AudioChunk) for e in evs), kinds(evs)
    m = next(e for e in evs if isinstance(e, Metrics))
    for k in KEYS:
        assert k in m.values and m.values[k] >= 0, (k, m.values)
    chunks = [e for e in evs if isinstance(e, AudioChunk)]
    assert all(c.sample_rate == 24000 and c.pcm.dtype == np.float32 and np.abs(c.pcm).max() <= 1 for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert engine.kv.free_blocks < free0
    n = engine.num_sessions
    s.close()
    assert s.next_event(timeout=10) is None  # stream ends after close
    assert engine.num_sessions == n - 1
    assert engine.kv.free_blocks == free0
    with pytest.raises(SessionClosedError):
        s.push_text("again")
    with pytest.raises(SessionClosedError):
        s.push_audio(np.zeros(160, np.float32), 16000)
    s.close()  # idempotent


def test_async_events(engine):
    async def main():
        s = engine.session()
        s.push_text("What is in this picture?")
        got = []
        async for ev in s.events():
            got.append(ev)
            if isinstance(ev, TurnEnd):
                s.close()
        return got

    evs = asyncio.run(main())
    check_turn_tail(evs)
    assert evs[-1].turn == 0


def test_history_kept_across_turns(engine):
    s = engine.session()
    r1 = s.run_turn(text="Hello, how are you today?")
    kv1 = s.kv_length
    r2 = s.run_turn(text="Tell me a story.")
    st = s.stats
    p1, p2 = st["turn_prefill_tokens"]
    assert kv1 > p1 >= 1 and 0 < p2 < p1  # the second prefill covers only the new turn (no system prompt, no history)
    assert st["prefill_tokens"] == p1 + p2
    assert s.kv_length >= kv1 + p2
    assert r1.turn == 0 and r2.turn == 1 and r2.text
    s.close()


def test_audio_turn(engine):
    s = engine.session()
    x, sr = _compat.load_sample("hello.wav")
    r = s.run_turn(x, sr, chunk_ms=100)
    assert r.metrics["ttfa_ms"] >= 0 and r.metrics["response_ms"] >= r.metrics["ttfa_ms"] - 1e-6
    assert r.metrics.get("audio_encoder_ms", 0) > 0 and r.metrics.get("fbank_ms", 0) > 0
    # int16 at 48 kHz, odd chunk sizes: resampled, same kind of turn
    x48 = np.round(np.interp(np.arange(int(len(x) * 3)) / 3, np.arange(len(x)), x) * 32767).astype(np.int16)
    r2 = s.run_turn(x48, 48000, chunk_ms=37)
    assert r2.turn == 1 and "ttfa_ms" in r2.metrics
    s.close()


def test_bad_input(engine):
    s = engine.session()
    with pytest.raises(ValueError, match="NaN|nan"):
        s.push_audio(np.array([0.0, np.nan] * 100, np.float32), 16000)
    with pytest.raises(ValueError, match="empty"):
        s.push_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(TypeError):
        s.push_audio(np.zeros(100, np.int32), 16000)
    with pytest.raises(ValueError, match="limit|long"):
        s.push_audio(np.zeros(16000 * 600, np.int16), 16000)  # a 10-minute push
    with pytest.raises(ValueError):
        s.push_audio(np.zeros(100, np.float32), 0)
    with pytest.raises(TypeError):
        s.push_text(None)
    with pytest.raises(ValueError):
        s.push_text("   ")
    with pytest.raises(ValueError):
        s.push_video_frame(np.zeros((56, 56, 3), np.uint8), float("nan"))
    # the session still works after rejected input
    r = s.run_turn(text="Hello")
    assert r.turn == 0
    s.close()


def _answer(engine, texts, interleave_with=None):
    s = engine.session(seed=7)
    other = engine.session(seed=3) if interleave_with else None
    out = []
    for t in texts:
        s.push_text(t)
        if other is not None:
            other.push_text(interleave_with)
        out.append(s.collect(timeout=60))
        if other is not None:
            other.collect(timeout=60)
    s.close()
    if other is not None:
        other.close()
    return ["".join(e.text for e in evs if isinstance(e, TextDelta)) for evs in out]


def test_batching_does_not_change_tokens(engine):
    texts = ["Hello, how are you today?", "Can you describe what you hear?"]
    alone = _answer(engine, texts)
    together = _answer(engine, texts, interleave_with="The quick brown fox jumps over the lazy dog.")
    assert alone == together and all(alone)

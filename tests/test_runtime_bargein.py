"""Barge-in: interrupt() and new speech stop the answer within a tick; history trimmed to what was heard."""
import numpy as np
import pytest

from vita_engine.runtime import AudioChunk, Interrupted, TextDelta, TurnEnd
from vita_engine.runtime import _compat

from runtime_util import check_turn_tail, kinds, make_engine, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def engine(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt, max_new_tokens=400, tts_max_tokens=24)
    yield e
    e.close()


def _until(s, cls, timeout=60):
    evs = []
    while True:
        ev = s.next_event(timeout=timeout)
        evs.append(ev)
        if isinstance(ev, cls):
            return evs


def test_interrupt_mid_answer_trims_history(engine):
    s = engine.session()
    s.push_text("Tell me a story about a cat and a dog who live in a small house near the river.")
    evs = _until(s, TextDelta)
    prompt_end = s.stats["turn_prefill_tokens"][0]
    s.playback_position(0.0)   # the client has played nothing yet
    s.interrupt()
    evs += s.collect(timeout=60)
    check_turn_tail(evs)
    assert any(isinstance(e, Interrupted) for e in evs), kinds(evs)
    st = s.stats
    assert st["interrupts"] == 1
    # nothing was played: the answer is dropped from the history, its KV pages released
    assert s.kv_length == prompt_end
    # the session goes on: the next turn closes the (empty) answer and works
    r = s.run_turn(text="Hello")
    assert r.turn == 1 and not r.interrupted
    s.close()


def test_interrupt_keeps_delivered_part(engine):
    s = engine.session()
    s.push_text("Tell me a story about a cat and a dog who live in a small house near the river.")
    evs = _until(s, AudioChunk)
    s.interrupt()
    evs += s.collect(timeout=60)
    check_turn_tail(evs)
    inter = any(isinstance(e, Interrupted) for e in evs)
    prompt_end = s.stats["turn_prefill_tokens"][0]
    m = evs[-2].values
    assert m["answer_tokens"] <= s.stats["decode_tokens"] + 1
    if inter:  # answer_tokens = tokens whose audio was delivered; the KV holds at most those
        assert s.kv_length <= prompt_end + m["answer_tokens"]
    s.close()


def test_speech_barges_in(engine):
    s = engine.session()
    s.push_text("Tell me a story about a cat and a dog who live in a small house near the river.")
    evs = _until(s, TextDelta)
    x, sr = _compat.load_sample("hello.wav")
    s.push_audio(x[: sr // 2], sr)   # the user starts talking over the answer
    evs += s.collect(timeout=60)
    check_turn_tail(evs)
    assert any(isinstance(e, Interrupted) for e in evs), kinds(evs)
    # the rest of the utterance + silence: a normal audio turn follows
    s.push_audio(x[sr // 2:], sr)
    s.push_audio(np.zeros(int(1.0 * sr), np.float32), sr)
    evs2 = s.collect(timeout=60)
    check_turn_tail(evs2)
    assert isinstance(evs2[-1], TurnEnd) and evs2[-1].turn == 1
    s.close()

"""Speculative start: prefill at the short pause, discarded (pages freed, history rolled back) when
speech resumes; committed at the end of turn."""
import numpy as np
import pytest

from vita_engine.runtime import _compat

from runtime_util import check_turn_tail, make_engine, one_thread, push_chunks  # noqa: F401


@pytest.fixture(scope="module")
def engine(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt)
    yield e
    e.close()


def test_resumed_speech_discards_speculative_prefill(engine):
    x, sr = _compat.load_sample("question.wav")
    s = engine.session()
    pause = np.zeros(int(0.35 * sr), np.float32)   # > speculative 200 ms, < end-of-turn 500 ms
    push_chunks(s, x, sr)
    push_chunks(s, pause, sr)
    import time

    t = time.time()
    while not s.stats.get("turn_prefill_tokens") and time.time() - t < 20:  # speculative prefill ran
        time.sleep(0.01)
    assert s.stats["turn_prefill_tokens"], "no speculative prefill at the pause"
    assert s.kv_length > 0
    push_chunks(s, x[: sr], sr)                          # the user goes on talking
    push_chunks(s, np.zeros(sr, np.float32), sr)
    evs = s.collect(timeout=60)
    check_turn_tail(evs)
    st = s.stats
    assert st.get("discarded", 0) >= 1
    assert evs[-1].turn == 0                       # one turn, not two
    # the committed turn's prompt sits right after an empty history: nothing of the discarded one remains
    assert s.kv_length == st["turn_prefill_tokens"][-1] + min(st["decode_tokens"], 15)
    s.close()


def test_commit_reuses_speculative_prefill(engine):
    x, sr = _compat.load_sample("hello.wav")
    s = engine.session()
    push_chunks(s, x, sr)
    push_chunks(s, np.zeros(sr, np.float32), sr)
    evs = s.collect(timeout=60)
    check_turn_tail(evs)
    st = s.stats
    assert st.get("discarded", 0) == 0 and len(st["turn_prefill_tokens"]) == 1  # prefilled once, at the pause
    s.close()

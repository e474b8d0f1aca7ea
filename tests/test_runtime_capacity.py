"""Admission control and per-session budgets: refusals are clean, nothing else is corrupted."""
import pytest

from vita_engine.runtime import CapacityError, Error, TextDelta

from runtime_util import check_turn_tail, make_engine, one_thread  # noqa: F401


def _text(evs):
    return "".join(e.text for e in evs if isinstance(e, TextDelta))


def test_kv_exhaustion_refuses_new_session(tiny_ckpt, one_thread):  # noqa: F811
    # 3 sessions of 512 tokens fit 100 pages of 16; the 4th does not
    e = make_engine(tiny_ckpt, kv_blocks=100, session_max_tokens=512, max_sessions=16)
    try:
        a, b, c = e.session(seed=1), e.session(seed=1), e.session(seed=1)
        a.push_text("Hello, how are you today?")
        ref = _text(a.collect(timeout=60))
        with pytest.raises(CapacityError, match="KV cache full"):
            e.session()
        # the running sessions are untouched and still give the same answers
        b.push_text("Hello, how are you today?")
        assert _text(b.collect(timeout=60)) == ref
        c.close()
        d = e.session(seed=1)  # room again after a close
        d.push_text("Hello, how are you today?")
        assert _text(d.collect(timeout=60)) == ref
        assert e.stats["tick_errors"] == 0
    finally:
        e.close()


def test_session_slots(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt, max_sessions=2)
    try:
        s1, s2 = e.session(), e.session()
        with pytest.raises(CapacityError, match="max_sessions"):
            e.session()
        s1.close()  # synchronous: the slot is free when close() returns
        e.session().close()
        s2.close()
        assert e.num_sessions == 0 and e.kv.reserved_blocks == 0 and e.kv.free_blocks == e.kv.num_blocks
    finally:
        e.close()


def test_budget_evicts_oldest_turns(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt, session_max_tokens=200, max_new_tokens=12)
    try:
        s = e.session()
        for i in range(4):
            r = s.run_turn(text=f"Turn {i}: tell me a story about a cat and a dog.")
            assert not any(isinstance(ev, Error) for ev in r.events), r.events
            assert s.kv_length <= 200
        assert s.stats["evictions"] >= 1
        # a prompt that cannot fit even alone fails cleanly, the session survives
        s.push_text("the quick brown fox jumps over the lazy dog " * 20)
        evs = s.collect(timeout=60)
        check_turn_tail(evs)
        assert any(isinstance(ev, Error) for ev in evs)
        assert s.run_turn(text="Hello").text is not None
        s.close()
    finally:
        e.close()

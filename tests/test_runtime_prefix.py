"""The next turn's image tokens prefilled while the user still speaks (runtime/prefix_stage.py): with
`prefix_prefill` on the answer (text and audio) is exactly the one without, the turn start prefills
only the part after the prefix, and the prefix survives, grows or is dropped as what it was built
from does. Every scenario runs on two engines, prefix prefill on and off, same seeds."""
import time

import numpy as np
import pytest
import torch

from vita_engine.runtime import _compat
from vita_engine.runtime.engine import DEFAULT_OPTIONS
from vita_engine.runtime.policy import CriticalPathPolicy, LockstepPolicy
from vita_engine.runtime.session import summarize_turn

from runtime_util import check_turn_tail, make_engine, one_thread, push_chunks, rand_image, until  # noqa: F401


@pytest.fixture(scope="module")
def engines(tiny_ckpt, one_thread):  # noqa: F811
    on = make_engine(tiny_ckpt, max_new_tokens=8)
    off = make_engine(tiny_ckpt, max_new_tokens=8, prefix_prefill=False)
    yield on, off
    on.close()
    off.close()


def _prefilled(s, n_images=None):
    """Wait until the session's prefix covers all its pushed images (or `n_images`) and is in the KV."""
    st = s._state

    def done():
        p = st.prefix
        n = len(st.pending_images) if n_images is None else n_images
        return p if p is not None and p.remaining == 0 and len(p.visuals) == n else None

    return until(done, "the prefix to be prefilled")


def _images_encoded(s):
    st = s._state
    until(lambda: st.pending_images and all(v.feats is not None for v in st.pending_images), "the images encoded")


def _closed(e, *sessions):
    for s in sessions:
        s.close()
    kv = e.kv.usage()
    assert kv["free"] == kv["blocks"] and kv["reserved"] == 0 and not kv["sequence_blocks"], kv  # no page leaked


def _same(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        check_turn_tail(ra.events)
        check_turn_tail(rb.events)
        assert ra.text == rb.text and ra.text
        np.testing.assert_array_equal(ra.audio, rb.audio)
        assert ra.audio.size
        # the same prompt either way: only the split between cached and prefilled by the turn differs
        ma, mb = ra.metrics, rb.metrics
        assert ma["cached_tokens"] + ma["prompt_tokens"] == mb["cached_tokens"] + mb["prompt_tokens"]


def test_image_text_turn(engines):
    on, off = engines
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=5)
        s.push_image(rand_image(1))
        if name == "on":
            p = _prefilled(s)
            assert s.kv_length == p.x.shape[0] == s.stats["prefix_tokens"]  # ahead of the turn, nothing else
        else:
            _images_encoded(s)
            time.sleep(0.1)
            assert s.kv_length == 0 and s._state.prefix is None  # off: nothing prefilled ahead
        r = s.run_turn(text="What do you see?")
        res[name] = (r, s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same([a], [b])
    P = sa["prefix_tokens"]
    assert P > 12 and sa["prefix_hits"] == 1 and sb["prefix_tokens"] == 0
    # the turn start prefilled only what follows the prefix (the question and the assistant header)
    assert a.metrics["cached_tokens"] == P and b.metrics["cached_tokens"] == 0
    assert sa["turn_prefill_tokens"] == [b.metrics["prompt_tokens"] - P] == [a.metrics["prompt_tokens"]]
    assert sa["prefill_tokens"] == sb["prefill_tokens"]  # nothing prefilled twice


def test_image_spoken_turn(engines):
    on, off = engines
    x, sr = _compat.load_sample("hello.wav")
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=3)
        s.push_image(rand_image(2))
        if name == "on":
            _prefilled(s)
        else:
            _images_encoded(s)
        push_chunks(s, x, sr)
        push_chunks(s, np.zeros(sr, np.float32), sr)
        r = summarize_turn(s.collect(timeout=60))
        res[name] = (r, s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same([a], [b])
    P = sa["prefix_tokens"]
    assert P > 0 and sa["prefix_hits"] >= 1 and a.metrics["cached_tokens"] == P
    assert sa["turn_prefill_tokens"][-1] == sb["turn_prefill_tokens"][-1] - P


def test_second_image_extends_the_prefix(engines):
    on, off = engines
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=7)
        s.push_image(rand_image(3))
        if name == "on":
            p1 = _prefilled(s, 1)
            n1 = s.stats["prefix_tokens"]
            assert n1 == p1.x.shape[0]
        s.push_image(rand_image(4, 120, 500))
        if name == "on":
            p2 = _prefilled(s, 2)
            # causal prefill: only the second image's tokens were added, the first ones' KV stayed
            assert p2.kv_start == p1.kv_start == 0 and torch.equal(p2.x[:n1], p1.x)
            assert s.stats["prefix_tokens"] == p2.x.shape[0] > n1 and s.kv_length == p2.x.shape[0]
            assert s.stats.get("prefix_dropped", 0) == 0
        r = s.run_turn(text="Compare the two pictures.")
        res[name] = (r, s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same([a], [b])
    assert a.metrics["cached_tokens"] == sa["prefix_tokens"] and sa["prefill_tokens"] == sb["prefill_tokens"]


def test_discarded_speculative_start_keeps_the_prefix(engines):
    on, off = engines
    x, sr = _compat.load_sample("question.wav")
    pause = np.zeros(int(0.35 * sr), np.float32)  # > speculative 200 ms, < end-of-turn 500 ms
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=11)
        s.push_image(rand_image(5))
        if name == "on":
            p = _prefilled(s)
            P = p.x.shape[0]
        else:
            _images_encoded(s)
        push_chunks(s, x, sr)
        push_chunks(s, pause, sr)
        until(lambda: s.stats.get("turn_prefill_tokens"), "the speculative prefill at the pause")
        if name == "on":  # the speculative start was built on the prefix
            assert s.stats["prefix_hits"] == 1 and s._state.prefix is p
        push_chunks(s, x[:sr], sr)  # the user goes on talking: the speculative turn is discarded
        if name == "on":
            until(lambda: s.stats.get("discarded"), "the discard")
        push_chunks(s, np.zeros(sr, np.float32), sr)
        r = summarize_turn(s.collect(timeout=60))
        res[name] = (r, s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same([a], [b])
    assert sa["discarded"] >= 1 and sb["discarded"] >= 1 and a.turn == 0
    # the prefix survived the discard: prefilled once, used again by the committed turn
    assert sa["prefix_tokens"] == P and sa["prefix_hits"] >= 2 and sa.get("prefix_dropped", 0) == 0
    assert a.metrics["cached_tokens"] == P and sa["turn_prefill_tokens"][-1] == sb["turn_prefill_tokens"][-1] - P


def test_frame_after_the_prefix_drops_it(engines):
    on, off = engines
    frame = rand_image(6, 64, 80)
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=2)
        s.push_image(rand_image(7))
        if name == "on":
            _prefilled(s)
            assert s.kv_length > 0
        s.push_video_frame(frame, timestamp=0.5)
        if name == "on":
            until(lambda: s._state.prefix is None and s.kv_length == 0, "the prefix dropped")
        r = s.run_turn(text="What changed?")
        res[name] = (r, s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same([a], [b])
    assert sa["prefix_dropped"] == 1 and a.metrics["cached_tokens"] == 0
    assert sa["turn_prefill_tokens"] == sb["turn_prefill_tokens"]


def test_system_prompt_change_after_the_prefix(engines):
    on, off = engines
    res = {}
    for name, e in (("on", on), ("off", off)):
        # before the first turn: the prefix is rebuilt behind the new system prompt
        s1 = e.session(seed=4)
        s1.push_image(rand_image(8))
        if name == "on":
            old = _prefilled(s1)
        s1.configure(system_prompt="You are a pirate.")
        if name == "on":
            until(lambda: s1.stats.get("prefix_dropped"), "the prefix dropped")
            new = _prefilled(s1)
            assert new.kv_start == 0 and new.x.shape[0] < old.x.shape[0]  # the pirate is shorter than VITA's prompt
            n_new = new.x.shape[0]
        r1 = s1.run_turn(text="Describe it.")
        # after a turn: the history is replayed behind the new prompt at the next turn start
        s2 = e.session(seed=4)
        r2a = s2.run_turn(text="Hello there.")
        s2.push_image(rand_image(9))
        if name == "on":
            _prefilled(s2)
        s2.configure(system_prompt="You are a poet.")
        if name == "on":
            until(lambda: s2._state.prefix is None, "the prefix dropped")
        r2b = s2.run_turn(text="And this one?")
        res[name] = ([r1, r2a, r2b], s1.stats, s2.stats)
        _closed(e, s1, s2)
    (a, a1, a2), (b, _, _) = res["on"], res["off"]
    _same(a, b)
    assert a1["prefix_dropped"] == 1 and a1["prefix_hits"] == 1 and a[0].metrics["cached_tokens"] == n_new
    assert a2["prefix_dropped"] == 1 and a[2].metrics["cached_tokens"] == 0  # the KV restarted


def test_truncate_answer_then_image_then_turn(engines):
    on, off = engines
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=9)
        r1 = s.run_turn(text="Tell me a story about a cat.")
        s.push_image(rand_image(10))
        if name == "on":
            p = _prefilled(s)
        s.truncate_answer(r1.turn, 0.05)
        until(lambda: s.stats.get("truncations"), "the truncation")
        if name == "on":  # built behind the untrimmed answer: dropped, rebuilt behind the trimmed one
            assert s.stats["prefix_dropped"] == 1
            q = _prefilled(s)
            assert q is not p and q.kv_start == s.kv_length - q.x.shape[0] < p.kv_start
        r2 = s.run_turn(text="What about this?")
        res[name] = ([r1, r2], s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same(a, b)
    assert sa["truncations"] == sb["truncations"] == 1
    assert sa["prefix_hits"] == 1 and sa["turn_prefill_tokens"][-1] < sb["turn_prefill_tokens"][-1]


def test_history_with_a_new_image(engines):
    """The second turn's prefix starts with the close of the first answer (its unfed token + <|im_end|>)."""
    on, off = engines
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=6)
        r1 = s.run_turn(text="Hello, how are you?")
        kv1 = s.kv_length
        s.push_image(rand_image(11))
        if name == "on":
            p = _prefilled(s)
            assert p.kv_start == kv1
            tile_tokens = sum(int(v.feats.shape[0] * v.feats.shape[1]) for v in p.visuals)
            user = len(e.chat.user_prefix_ids(0))
            assert p.x.shape[0] > tile_tokens + user  # + the close of the previous answer
        r2 = s.run_turn(text="And what is this?")
        res[name] = ([r1, r2], s.stats, kv1)
        _closed(e, s)
    (a, sa, kv1), (b, sb, _) = res["on"], res["off"]
    _same(a, b)
    assert a[1].metrics["cached_tokens"] == kv1 + sa["prefix_tokens"] and b[1].metrics["cached_tokens"] == kv1
    assert sa["turn_prefill_tokens"][-1] == sb["turn_prefill_tokens"][-1] - sa["prefix_tokens"]


def test_mismatch_falls_back_to_a_whole_prefill(engines):
    """The safety net: a prefix whose prefilled part does not equal the start of the turn's prompt is
    dropped at the turn start and the prompt is prefilled whole. Here the KV holds image A while the
    turn's prompt has image B (the features swapped under the prefix, which only checks identities
    each tick): the answer is B's, as on the engine that never saw A."""
    on, off = engines
    b_img = rand_image(13)
    sb_ = on.session()
    sb_.push_image(b_img)
    _images_encoded(sb_)
    feats_b = sb_._state.pending_images[0].feats
    _closed(on, sb_)
    res = {}
    for name, e in (("on", on), ("off", off)):
        s = e.session(seed=8)
        if name == "on":
            s.push_image(rand_image(12))  # same size as B: the same tiles
            _prefilled(s)
            v = s._state.pending_images[0]
            assert v.feats.shape == feats_b.shape and not torch.equal(v.feats, feats_b)
            v.feats = feats_b  # the scheduler is idle: nothing reads it until the turn starts
        else:
            s.push_image(b_img)
        r = s.run_turn(text="What do you see?")
        res[name] = (r, s.stats)
        _closed(e, s)
    (a, sa), (b, sb) = res["on"], res["off"]
    _same([a], [b])
    assert sa["prefix_misses"] == 1 and sa.get("prefix_hits", 0) == 0 and sa["prefix_dropped"] == 1
    assert a.metrics["cached_tokens"] == 0 and sa["turn_prefill_tokens"] == sb["turn_prefill_tokens"]


def test_prefix_next_to_another_answer(engines):
    """A prefix prefilled while another session answers (its rows join that answer's forwards once the
    first audio is out) changes neither session's output."""
    on, off = engines
    res = {}
    for name, e in (("on", on), ("off", off)):
        sa, sb = e.session(seed=21), e.session(seed=22)
        sa.push_text("Tell me a long story about a cat and a dog who live near the river.")
        sb.push_image(rand_image(14))
        if name == "on":
            _prefilled(sb)
        ra = summarize_turn(sa.collect(timeout=60))
        rb = sb.run_turn(text="And the picture?")
        res[name] = ([ra, rb], sb.stats)
        _closed(e, sa, sb)
    (a, sa_), (b, _) = res["on"], res["off"]
    _same(a, b)
    assert sa_["prefix_hits"] == 1 and a[1].metrics["cached_tokens"] == sa_["prefix_tokens"] > 0


def test_eviction_with_a_prefix(tiny_ckpt, one_thread):  # noqa: F811
    """A small session budget: a turn start that must evict history drops the prefix (the history
    before it changes) and prefills the replayed turns + its prompt, as without a prefix."""
    res = {}
    for name, flag in (("on", True), ("off", False)):
        e = make_engine(tiny_ckpt, max_new_tokens=8, session_max_tokens=300, prefix_prefill=flag)
        try:
            s = e.session(seed=1)
            rs = []
            for i in range(4):
                s.push_image(rand_image(20 + i, 60, 60))
                if flag:
                    _images_encoded(s)
                    time.sleep(0.2)  # the prefix, when it fits the budget, is prefilled meanwhile
                # a long question: the prefix fits the budget, the whole turn does not (an eviction)
                rs.append(s.run_turn(text=f"Picture {i}? Tell me what is in it, with all the details you can see there."))
            res[name] = (rs, s.stats)
            _closed(e, s)
        finally:
            e.close()
    (a, sa), (b, sb) = res["on"], res["off"]
    _same(a, b)
    assert sa["evictions"] == sb["evictions"] >= 1
    assert sa["prefix_hits"] >= 1  # some turns used a prefix
    assert sa["prefix_dropped"] >= 1  # and one was dropped by an eviction
    assert any(r.metrics["cached_tokens"] > 0 and r.metrics["prompt_tokens"] > 100 for r in a)  # the replay


# ---- the policy ------------------------------------------------------------------------------------
class _Codec:
    hop_length, sample_rate, lookahead_tokens = 600, 24000, 13


class _P:
    def __init__(self, n, arrived):
        self.remaining, self.next_arrival = n, arrived


class _S:
    def __init__(self, prefix, turn=None):
        self.prefix, self.turn = prefix, turn


def test_policy_prefix_rows():
    p = CriticalPathPolicy(dict(DEFAULT_OPTIONS, prefill_chunk_tokens=100), _Codec())
    a, b, c, d = _S(_P(70, 2.0)), _S(_P(50, 1.0)), _S(_P(0, 0.5)), _S(None)
    assert p.prefix_rows([a, b, c, d], used=0) == [(b, 50), (a, 50)]  # oldest image first, within the budget
    assert p.prefix_rows([a, b], used=90) == [(b, 10)]  # after the turns' prefill
    assert p.prefix_rows([a, b], used=100) == []
    p.first_audio_pending = lambda states: True  # a first audio is being made: no slack work
    assert p.prefix_rows([a, b], used=0) == []
    assert CriticalPathPolicy(dict(DEFAULT_OPTIONS, prefix_prefill=False), _Codec()).prefix_rows([a], 0) == []
    assert LockstepPolicy(dict(DEFAULT_OPTIONS), _Codec()).prefix_rows([a], 0) == []
    with pytest.raises(ValueError, match="prefix_prefill"):
        CriticalPathPolicy(dict(DEFAULT_OPTIONS, prefix_prefill="yes"), _Codec())

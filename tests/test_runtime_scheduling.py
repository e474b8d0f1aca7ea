"""The critical-path scheduling policy (runtime/policy.py, docs/architecture.md §4).

Unit checks of the policy's answers, then the engine with a codec at the REAL kernel/rate structure
(x600 hop, 13-token look-ahead) at small widths: the first window comes as soon as the look-ahead is
met, later windows in whole pieces, streamed audio equals the offline decode of the turn's codec
tokens, and a session's tokens do not depend on other sessions running next to it."""
import asyncio
import copy
import math

import numpy as np
import pytest
import torch

from vita_engine.runtime import AudioChunk, TextDelta, TurnEnd
from vita_engine.runtime.engine import DEFAULT_OPTIONS
from vita_engine.runtime.metrics import TurnClock
from vita_engine.runtime.policy import CriticalPathPolicy, LockstepPolicy, make_policy
from vita_engine.runtime.state import Segment, Turn

from runtime_util import check_turn_tail, make_engine, one_thread  # noqa: F401

REAL_STRUCTURE = dict(upsample_initial_channel=64, upsample_rates=[8, 5, 5, 3], upsample_kernel_sizes=[16, 11, 11, 5],
                      resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3)


class _Codec:
    def __init__(self, hop=600, sr=24000, lookahead=13):
        self.hop_length, self.sample_rate, self.lookahead_tokens = hop, sr, lookahead


def _turn(n_tokens=0):
    t = Turn(idx=0, kind="text", clock=TurnClock(), x=torch.zeros(3, 4), kv_start=0, restore=(), record_x=torch.zeros(3, 4),
             max_new_tokens=64)
    t.state = "decode"
    t.tokens = list(range(n_tokens))
    return t


def _seg(tok_start, tok_end, codec=(), done=False, sid=1):
    return Segment(text="x", tok_start=tok_start, tok_end=tok_end, text_ids=[1], sid=sid, codec=list(codec), tts_done=done)


class _St:
    def __init__(self, t):
        self.turn = t


def test_policy_codec_windows_and_bursts():
    p = CriticalPathPolicy(dict(DEFAULT_OPTIONS), _Codec())
    assert p.first_window == 14 and p.window == 2  # 13 look-ahead + 1 final token; 40 ms = 2 tokens of 25 ms
    t = _turn(5)
    seg = _seg(0, 5)
    t.segments = [seg]
    # before the first window: the head stream gets every step it still needs, back to back
    assert p.tts_steps(t, seg, 0.0) == 14
    seg.codec = list(range(9))
    t.collect_codec()
    assert p.tts_steps(t, seg, 0.0) == 5
    assert p.codec_push(t, 0.0) == 0  # 9 < 14: nothing is final yet
    seg.codec += list(range(5))
    t.collect_codec()
    assert p.codec_push(t, 0.0) == 14
    # after it: whole 2-token pieces only
    t.codec_pushed, t.codec_pending = 14, [1, 2, 3]
    assert p.codec_push(t, 0.0) == 2
    # ... but not while the client holds >= codec_lead_ms of decoded audio beyond real-time playback
    t.samples, t.clock.t["first_audio"] = 24000, 10.0  # 1 s of audio sent
    assert p.codec_push(t, 10.5) == 0 and p.codec_push(t, 10.95) == 2  # 500 ms ahead / 50 ms ahead
    t.samples = 0
    del t.clock.t["first_audio"]
    # a later segment (spoken after the head one) gets one step per tick
    later = _seg(5, 9, sid=2)
    t.segments.append(later)
    assert p.tts_steps(t, later, 0.0) == 1
    # audio lead: far ahead of playback -> 1 step; behind -> 1 + catch-up
    t.clock.t["first_audio"] = 100.0
    assert p.tts_steps(t, seg, 100.0) == 1 + (1 if p.audio_lead(t, 100.0) < p.audio_lead_ms else 0)
    assert p.audio_lead(t, 101.0) < 0 and p.tts_steps(t, seg, 101.0) == 1 + p.catchup_steps
    # a tiny hop (0.5 ms per token) caps the later pieces at a look-ahead's worth of tokens
    assert CriticalPathPolicy(dict(DEFAULT_OPTIONS), _Codec(hop=12, lookahead=12)).window == 12


def test_policy_llm_text_lead():
    o = dict(DEFAULT_OPTIONS, llm_text_lead_tokens=8)
    p = CriticalPathPolicy(o, _Codec())
    t = _turn(3)
    st = _St(t)
    # no segment out yet: critical (a row, and extra back-to-back forwards)
    assert p.llm_rows([st])[0] == [st] and p.llm_extra_rows([st]) == [st] and p.llm_extra_forwards == 7
    t.tokens = list(range(12))
    t.segments = [_seg(0, 4), _seg(4, 10, sid=2)]
    assert p.llm_rows([st])[0] == [] and p.llm_extra_rows([st]) == []  # 12 unspoken tokens >= 8: the LLM waits
    t.segments[0].tts_done = True
    assert p.llm_rows([st])[0] == []  # 12 - 4 = 8 still >= 8
    t.segments[1].tts_done = True
    assert p.llm_rows([st])[0] == [st]  # the TTS has nothing left: decode
    t.segments[1].tts_done = False
    t.tokens = t.tokens[:11]
    assert p.llm_rows([st])[0] == [st]  # 11 - 4 = 7 < 8
    # without TTS every answering session decodes every tick
    assert CriticalPathPolicy(o, _Codec(), has_tts=False).llm_rows([_St(_turn(30))])[0]
    # lockstep: always one row, one step, every token pushed
    lp = LockstepPolicy(o, _Codec())
    t.codec_pending = [1]
    assert lp.llm_rows([st])[0] == [st] and lp.tts_steps(t, t.segments[0], 0.0) == 1 and lp.codec_push(t, 0.0) == 1


def test_policy_prefill_order_committed_first():
    p = CriticalPathPolicy(dict(DEFAULT_OPTIONS, prefill_chunk_tokens=4), _Codec())
    spec, real = _turn(), _turn()
    for t, created in ((spec, 1.0), (real, 2.0)):
        t.state, t.x = "prefill", torch.zeros(3, 4)
        t.clock.t["created"] = created
    spec.speculative = True
    a, b = _St(spec), _St(real)
    assert p.llm_rows([a, b])[1] == [(b, 3), (a, 1)]  # the committed turn first, though younger
    assert LockstepPolicy(dict(DEFAULT_OPTIONS, prefill_chunk_tokens=4), _Codec()).llm_rows([a, b])[1] == [(a, 3), (b, 1)]


def test_bad_policy_options():
    for k, v in (("scheduling", "fifo"), ("tts_burst_steps", 0), ("codec_window_ms", -1.0), ("llm_text_lead_tokens", 1.5)):
        with pytest.raises(ValueError, match=k):
            make_policy(dict(DEFAULT_OPTIONS, **{k: v}), _Codec())


# ---- the engine, codec at the real structure -----------------------------------------------------------

@pytest.fixture(scope="module")
def real_codec_ckpt(tmp_path_factory):
    from vita_engine import testing

    saved = copy.deepcopy(testing.TINY["codec"])
    testing.TINY["codec"].update(REAL_STRUCTURE)
    try:
        return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny600") / "VITA-1.5", seed=0)
    finally:
        testing.TINY["codec"].clear()
        testing.TINY["codec"].update(saved)


def _capture_codec_tokens(monkeypatch):
    """{(session id, turn): codec tokens in playback order} recorded as each turn ends."""
    from vita_engine.runtime.lifecycle import Lifecycle

    got = {}
    orig = Lifecycle.finish

    def finish(self, st, t, interrupted=False):
        if st.turn is t:
            got[(st.session.id, t.idx)] = [c for g in t.segments for c in g.codec]
        return orig(self, st, t, interrupted)

    monkeypatch.setattr(Lifecycle, "finish", finish)
    return got


def _run_text_sessions(e, seeds, texts, timeout=120):
    async def one(s, stagger):
        await asyncio.sleep(stagger)
        evs = []

        async def consume():
            async for ev in s.events():
                evs.append(ev)

        task = asyncio.create_task(consume())
        for k, text in enumerate(texts):
            s.push_text(text)
            while sum(isinstance(ev, TurnEnd) for ev in evs) <= k:
                await asyncio.sleep(0.005)
        s.close()
        await asyncio.wait_for(task, 30)
        return s.id, evs

    async def main():
        ss = [e.session(seed=sd) for sd in seeds]
        return await asyncio.wait_for(asyncio.gather(*[one(s, 0.003 * i) for i, s in enumerate(ss)]), timeout)

    return asyncio.run(main())


def test_first_window_at_lookahead_and_exact_streaming(real_codec_ckpt, one_thread, monkeypatch):  # noqa: F811
    got = _capture_codec_tokens(monkeypatch)
    e = make_engine(real_codec_ckpt, max_new_tokens=12, tts_max_tokens=24)
    try:
        c = e.codec
        assert c.hop_length == 600 and c.lookahead_tokens == 13
        pol = e._scheduler.policy
        res = _run_text_sessions(e, [1, 2, 3], ["Hello, how are you?", "Tell me more."])
        first_len = pol.first_window * c.hop_length - c.lookahead_samples
        assert first_len == 602  # 14 tokens x 600 - 7798 held back: 25 ms of final audio in the first window
        n_first = 0
        for sid, evs in res:
            for turn in (0, 1):
                tevs = [ev for ev in evs if getattr(ev, "turn", None) == turn]
                check_turn_tail(tevs)
                chunks = [ev for ev in tevs if isinstance(ev, AudioChunk)]
                toks = got[(sid, turn)]
                pcm = np.concatenate([ch.pcm for ch in chunks]) if chunks else np.zeros(0, np.float32)
                # streamed audio == offline decode of the same codec tokens (the whole turn)
                ref = c.decode(toks).numpy() if toks else np.zeros(0, np.float32)
                assert pcm.shape == ref.shape, (sid, turn, pcm.shape, ref.shape)
                np.testing.assert_allclose(pcm, np.clip(ref, -1, 1), rtol=0, atol=1e-5)
                if len(toks) > pol.first_window:
                    # the first window as soon as the look-ahead (+1 token) is met, then whole 2-token pieces
                    n_first += 1
                    assert chunks[0].pcm.size == first_len, (chunks[0].pcm.size, first_len)
                    for ch in chunks[1:-2]:  # the last two: the rest at the end of the turn, and the flush
                        assert ch.pcm.size % (pol.window * c.hop_length) == 0, ch.pcm.size
        assert n_first >= 3  # most turns are long enough to check the window sizes
        assert e.stats["tick_errors"] == 0
    finally:
        e.close()


def test_tokens_do_not_depend_on_other_sessions(real_codec_ckpt, one_thread, monkeypatch):  # noqa: F811
    """Same seed -> same text tokens, same codec tokens and the same audio, alone or with 3 others."""
    got = _capture_codec_tokens(monkeypatch)
    texts = ["Hello, how are you?", "What is the weather like?"]
    e = make_engine(real_codec_ckpt, max_new_tokens=10, tts_max_tokens=20)
    try:
        (sid_a, alone), = _run_text_sessions(e, [5], texts)
        crowd = _run_text_sessions(e, [6, 5, 7, 8], texts)
        sid_b, together = crowd[1]
        for turn in (0, 1):
            def text(evs):
                return "".join(ev.text for ev in evs if isinstance(ev, TextDelta) and ev.turn == turn)

            def audio(evs):
                return np.concatenate([ev.pcm for ev in evs if isinstance(ev, AudioChunk) and ev.turn == turn] or [np.zeros(0)])

            assert text(alone) == text(together) and text(alone)
            assert got[(sid_a, turn)] == got[(sid_b, turn)] and got[(sid_a, turn)]
            a, b = audio(alone), audio(together)
            assert a.shape == b.shape and a.size
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    finally:
        e.close()


def test_lockstep_policy_still_runs(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt, scheduling="lockstep")
    try:
        s = e.session()
        r = s.run_turn(text="Hello there.", timeout=60)
        check_turn_tail(r.events)
        assert r.text and r.audio.size and math.isfinite(r.metrics["ttfa_ms"])
        s.close()
    finally:
        e.close()


def test_scheduler_stats(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt)
    try:
        assert e.scheduler_stats()["tick_ms"] == {"n": 0}
        s = e.session()
        s.run_turn(text="Hello there.", timeout=60)
        st = e.scheduler_stats(reset=True)
        assert st["ticks"] > 0 and st["policy"]["scheduling"] == "critical_path"
        assert st["policy"]["codec_lookahead_tokens"] == e.codec.lookahead_tokens
        for k in ("tick_ms", "host_ms", "turns_ms", "llm_ms", "tts_ms", "codec_ms"):
            d = st[k]
            assert d["n"] == st["ticks"] and 0 <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], k
        # the stages run inside the tick
        assert st["llm_ms"]["max"] <= st["tick_ms"]["max"] + 1e-6
        assert st["llm_forwards_per_tick"] > 0 and st["tts_steps_per_tick"] > 0 and st["codec_pushes_per_tick"] > 0
        assert e.scheduler_stats()["ticks"] < st["ticks"]  # reset started a new window
        s.close()
    finally:
        e.close()

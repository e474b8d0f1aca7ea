"""Every answer is spoken: concurrent sessions x several turns all get audio, also when an answer has
no letter or digit (the random tiny model often answers with symbols / invalid bytes), and when the
TTS pool is short; a segment the TTS can never take ends the turn cleanly with an Error."""
import asyncio
import time

import pytest

from vita_engine.runtime import AudioChunk, Metrics, TurnEnd
from vita_engine.runtime.events import Error

from runtime_util import check_turn_tail, make_engine, one_thread  # noqa: F401

ANSWERS = ("Hello there, nice to meet you.", "?! ... ;; -- ** !!")  # turn 1: nothing a segmenter calls speakable


def _script_answers(monkeypatch, e, answers):
    """The LLM 'answers' turn k with `answers[k]` (real tokens, then a stop id)."""
    from vita_engine.runtime.llm_stage import LLMStage

    fmt = e.chat
    ids = [fmt.encode(a) for a in answers]
    stop = min(fmt.stop_ids)
    orig = LLMStage.on_token

    def on_token(self, st, t, tok):
        script = ids[t.idx % len(ids)]
        n = len(t.tokens)
        return orig(self, st, t, script[n] if n < len(script) else stop)

    monkeypatch.setattr(LLMStage, "on_token", on_token)


def _run_sessions(e, n_sessions, turns, timeout):
    async def one(s, stagger):
        await asyncio.sleep(stagger)
        evs = {k: [] for k in range(turns)}
        ends = []

        async def consume():
            async for ev in s.events():
                k = getattr(ev, "turn", None)
                if k in evs:
                    evs[k].append(ev)
                if isinstance(ev, TurnEnd):
                    ends.append(ev.turn)

        task = asyncio.create_task(consume())
        for k in range(turns):
            s.push_text(f"question {k}")
            while len(ends) <= k:
                await asyncio.sleep(0.01)
        s.close()
        await asyncio.wait_for(task, 10)
        return evs

    async def main():
        ss = [e.session(seed=i) for i in range(n_sessions)]
        return await asyncio.wait_for(asyncio.gather(*[one(s, 0.01 * i) for i, s in enumerate(ss)]), timeout)

    return asyncio.run(main())


def test_every_turn_has_audio_4_sessions_2_turns(tiny_ckpt, one_thread, monkeypatch):  # noqa: F811
    # a TTS pool of 3 streams for 4 sessions: segments wait for free streams, none is dropped
    e = make_engine(tiny_ckpt, max_new_tokens=24, tts_max_tokens=16, tts_max_streams=3)
    _script_answers(monkeypatch, e, ANSWERS)
    t0 = time.monotonic()
    try:
        res = _run_sessions(e, 4, 2, timeout=60)
        silent = [(i, k) for i, evs in enumerate(res) for k, es in evs.items()
                  if not any(isinstance(ev, AudioChunk) and ev.pcm.size for ev in es)]
        assert not silent, f"turns without audio (session, turn): {silent}"
        for evs in res:
            for k, es in evs.items():
                check_turn_tail(es)
                audio = sum(ev.pcm.size for ev in es if isinstance(ev, AudioChunk))
                met = next(ev.values for ev in es if isinstance(ev, Metrics))
                assert audio > 0, (k, met)  # every turn is spoken
                assert met["audio_out_s"] > 0 and met["tts_segments"] >= 1 and "tts_dropped_segments" not in met
                assert not any(isinstance(ev, Error) for ev in es)
        assert e.stats["tick_errors"] == 0
        assert e.tts.active() == [] and e.tts.free_blocks == e.tts.num_blocks  # every stream released
    finally:
        e.close()
    assert time.monotonic() - t0 < 60


def test_tts_capacity_exhausted_ends_turn_with_error(tiny_ckpt, one_thread, monkeypatch):  # noqa: F811
    """A segment the TTS can never take (nothing in flight to free capacity) is not waited for
    forever and not dropped silently: an Error names it, and the turn ends with its Metrics."""
    from vita_engine.runtime import _compat

    e = make_engine(tiny_ckpt, max_new_tokens=12)
    _script_answers(monkeypatch, e, ("Hello there, nice to meet you.",))

    def full(*a, **k):
        raise _compat.TTSCapacityError("TTSBatchDecoder: KV pool exhausted (test)")

    monkeypatch.setattr(e.tts, "start", full)
    monkeypatch.setattr(e.tts, "start_many", full)  # the scheduler starts the segments of a tick together
    try:
        s = e.session(seed=0)
        r = s.run_turn(text="hi", timeout=30)
        check_turn_tail(r.events)
        errs = [ev for ev in r.events if isinstance(ev, Error)]
        assert errs and "TTS capacity exhausted" in errs[0].message and "not spoken" in errs[0].message
        assert r.metrics["tts_dropped_segments"] >= 1 and r.metrics["answer_tokens"] > 0
        assert s.stats["tts_dropped_segments"] >= 1
        s.close()
    finally:
        e.close()

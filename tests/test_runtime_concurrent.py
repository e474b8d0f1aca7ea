"""Several concurrent sessions (asyncio) stream audio turns: no lost or duplicated audio, batched ticks."""
import asyncio

import numpy as np

from vita_engine.runtime import AudioChunk, TurnEnd
from vita_engine.runtime import _compat

from runtime_util import make_engine, one_thread  # noqa: F401


def test_four_sessions_stream(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt, max_new_tokens=24, tts_max_tokens=32)
    x, sr = _compat.load_sample("hello.wav")
    n = sr // 10

    async def one(s, turns, stagger):
        await asyncio.sleep(stagger)
        chunks = []
        ends = []

        async def consume():
            async for ev in s.events():
                if isinstance(ev, AudioChunk):
                    chunks.append(ev)
                elif isinstance(ev, TurnEnd):
                    ends.append(ev.turn)

        task = asyncio.create_task(consume())
        for k in range(turns):
            for buf in (x, np.zeros(sr, np.float32)):
                for i in range(0, len(buf), n):
                    s.push_audio(buf[i:i + n], sr)
                    await asyncio.sleep(0.01)  # faster than real time, but interleaved
            while len(ends) <= k:
                await asyncio.sleep(0.02)
        st = s.stats
        s.close()
        await asyncio.wait_for(task, 30)
        return chunks, ends, st

    async def main():
        ss = [e.session(seed=i) for i in range(4)]
        return await asyncio.wait_for(asyncio.gather(*[one(s, 2, 0.05 * i) for i, s in enumerate(ss)]), 120)

    try:
        res = asyncio.run(main())
        hop = e.codec.hop_length
        for chunks, ends, st in res:
            assert ends == [0, 1]
            assert [c.seq for c in chunks] == list(range(len(chunks)))  # no lost / duplicated chunk
            for turn in (0, 1):
                cs = [c for c in chunks if c.turn == turn]
                offs = np.cumsum([0] + [c.pcm.size for c in cs])[:-1]
                assert [c.offset for c in cs] == list(offs)
            total = sum(c.pcm.size for c in chunks)
            assert total == st["audio_samples"] == st["codec_tokens"] * hop  # exact streaming: every token's samples once
        # sessions shared forwards: fewer LLM forwards than rows
        assert e.stats["llm_rows"] > e.stats["llm_forwards"]
        assert e.stats["tick_errors"] == 0
        summ = e.metrics_summary()
        assert summ["ttfa_ms"]["n"] == 8 and summ["ttfa_ms"]["p50"] <= summ["ttfa_ms"]["p99"]
    finally:
        e.close()

"""Server output flow (fake engine, fast): audio coalesced into >= 20 ms frames with a consistent
seq/start_sample header, bounded hold time, and a bounded send queue for clients that stop reading."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from _fake_engine import FakeEngine  # noqa: E402
from _server_helpers import healthz, http_get, metric, run, running_server  # noqa: E402

from vita_engine.client import AudioChunk, Error, TextDelta, TurnEnd, connect  # noqa: E402
from vita_engine.server import protocol as P  # noqa: E402


async def _turn(c, timeout=20.0):
    evs = []

    async def go():
        async for ev in c.events():
            evs.append((time.monotonic(), ev))
            if isinstance(ev, TurnEnd):
                return

    await asyncio.wait_for(go(), timeout)
    return evs


def test_audio_coalesced_into_20ms_frames():
    """The engine emits 48-sample chunks (faster than real time): frames of >= 20 ms (480 samples)
    go out, except a turn's last; seq and start_sample stay contiguous; nothing is lost. (A long
    hold bound keeps the frame sizes independent of this shared machine's timing.)"""
    eng = FakeEngine(n_text=3, n_chunks=300, chunk_s=0.002, delay_s=0.0005)
    with running_server(eng, audio_max_hold_ms=2000.0) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                await c.send_text("one")
                a = await _turn(c)
                await c.send_text("two")
                b = await _turn(c)
                return c, a, b

        c, a, b = run(go())
    per_chunk = int(0.002 * 24000)
    for turn, evs in ((0, a), (1, b)):
        chunks = [e for _, e in evs if isinstance(e, AudioChunk)]
        sizes = [ch.pcm.size for ch in chunks]
        assert sum(sizes) == 300 * per_chunk
        assert all(s >= 480 for s in sizes[:-1]), sizes  # >= 20 ms at 24 kHz, but the turn's last frame
        assert len(chunks) == -(-300 * per_chunk // 480), len(chunks)
        assert [ch.offset for ch in chunks] == list(np.cumsum([0] + sizes)[:-1])  # start_sample contiguous
        assert all(ch.turn == turn for ch in chunks)
        names = [type(e).__name__ for _, e in evs]
        assert names[-2:] == ["Metrics", "TurnEnd"] and names.count("TextDelta") == 3
        last_audio = max(i for i, n in enumerate(names) if n == "AudioChunk")
        assert last_audio < names.index("Metrics")  # a turn's audio precedes its end
        # the waveform is the engine's (PCM16-rounded), sample for sample
        pcm = np.concatenate([ch.pcm for ch in chunks])
        t = np.arange(pcm.size) / 24000.0
        assert np.abs(pcm - 0.3 * np.sin(2 * np.pi * 220.0 * t)).max() < 2e-4
    seqs = [e.seq for _, e in a + b if isinstance(e, AudioChunk)]
    assert seqs == list(range(len(seqs)))
    assert c.stats["lost"] == 0 and c.stats["duplicates"] == 0 and c.stats["sample_gaps"] == 0


def test_audio_coalescing_holds_at_most_one_frame_period():
    """An engine slower than real time (12 samples every 150 ms): each chunk still goes out on its
    own, within audio_max_hold_ms of its arrival, instead of waiting for 20 ms of audio."""
    eng = FakeEngine(n_text=1, n_chunks=6, chunk_s=0.0005, delay_s=0.15)
    with running_server(eng, audio_frame_ms=20.0, audio_max_hold_ms=20.0) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                await c.send_text("slow")
                return await _turn(c)

        evs = run(go())
    chunks = [(t, e) for t, e in evs if isinstance(e, AudioChunk)]
    assert [e.pcm.size for _, e in chunks] == [12] * 6
    gaps = np.diff([t for t, _ in chunks])
    assert np.median(gaps) > 0.075, gaps  # not batched up: each left about when it was produced


def test_slow_client_closed_with_error_4002():
    """A client that stops reading: the server queues at most send_queue_s of audio for it, then
    stops the session and closes with error `slow_client` and code 4002 (seen once the client
    reads again); the slot and the session's pages come back."""
    eng = FakeEngine(n_text=1, n_chunks=20000, chunk_s=0.1, delay_s=0.0)
    with running_server(eng, send_queue_s=1.0, slow_client_close_timeout_s=10.0) as srv:
        async def go():
            c = await connect(srv.ws_url)
            await c.send_text("talk for half an hour")
            # do not read: the socket buffers fill, then the server's queue
            t_end = time.monotonic() + 20
            while metric(http_get(srv.url + "/metrics")[2], "vita_client_errors_total", 'code="slow_client"') < 1:
                assert time.monotonic() < t_end, "the server never gave up on the slow client"
                await asyncio.sleep(0.05)
            assert eng.sessions[0].closed  # generation stopped for it
            evs = []
            async for ev in c.events():  # read again: what was in flight, then the error and the close
                evs.append(ev)
            return c, evs

        c, evs = run(go(), timeout=40)
        errs = [e for e in evs if isinstance(e, Error)]
        assert errs and errs[-1].code == "slow_client" and errs[-1].fatal, errs
        assert "too slowly" in errs[-1].message
        assert c.close_code == P.CLOSE_SLOW_CLIENT
        audio_s = sum(e.pcm.size for e in evs if isinstance(e, AudioChunk)) / 24000
        assert audio_s < 0.1 * 20000 / 2  # far from everything the engine could produce
        assert c.stats["lost"] == 0 and c.stats["sample_gaps"] == 0  # what did arrive is consistent
        t_end = time.monotonic() + 5
        while healthz(srv)["sessions_active"] and time.monotonic() < t_end:
            time.sleep(0.02)
        assert healthz(srv)["sessions_active"] == 0
        assert eng.kv_free == eng.kv_total


def test_reading_client_is_not_closed():
    """A client that reads normally is never closed by the send-queue bound, even with a small bound."""
    eng = FakeEngine(n_text=2, n_chunks=200, chunk_s=0.02, delay_s=0.0)
    with running_server(eng, send_queue_s=0.5) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                await c.send_text("hi")
                return c, await _turn(c)

        c, evs = run(go())
        names = [type(e).__name__ for _, e in evs]
        assert "Error" not in names and names[-1] == "TurnEnd"
        assert sum(e.pcm.size for _, e in evs if isinstance(e, AudioChunk)) == 200 * 480
        assert metric(http_get(srv.url + "/metrics")[2], "vita_client_errors_total", 'code="slow_client"') == 0

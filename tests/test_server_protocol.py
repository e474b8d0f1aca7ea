"""Server protocol edges on loopback against a fake engine (tests/_fake_engine.py): fast and
independent of the model. The real tiny engine is exercised in test_server_engine.py."""
from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from _fake_engine import FakeEngine  # noqa: E402
from _server_helpers import (collect_turn, healthz, http_get, jpeg_bytes, metric, png_bytes, run,  # noqa: E402
                             running_server, speechlike)

from vita_engine.client import (AudioChunk, Error, Interrupted, Metrics, Refused, TextDelta, TurnEnd,  # noqa: E402
                                connect)
from vita_engine.server import protocol as P  # noqa: E402


def names(evs):
    return [type(e).__name__ for e in evs]


def test_round_trip_audio_turn():
    eng = FakeEngine()
    with running_server(eng) as srv:
        async def go():
            async with connect(srv.ws_url, sample_rate=16000) as c:
                assert c.ready.info["output"] == {"sample_rate": 24000, "format": "pcm16", "header_bytes": 16}
                await c.stream_pcm(speechlike(0.4), realtime=False)
                await c.stream_pcm(np.zeros(1600, np.int16), realtime=False)
                evs = await collect_turn(c)
                await c.send_text("again")
                evs2 = await collect_turn(c)
                return c, evs, evs2

        c, evs, evs2 = run(go())
        for turn, es in ((0, evs), (1, evs2)):
            n = names(es)
            assert n[-2:] == ["Metrics", "TurnEnd"], n
            assert n.count("AudioChunk") == eng.n_chunks and n.count("TextDelta") == eng.n_text
            assert es[-1].turn == turn and es[-2].turn == turn and "ttfa_ms" in es[-2].values
            for e in es:
                if isinstance(e, AudioChunk):
                    assert e.sample_rate == 24000 and e.pcm.dtype == np.float32 and e.pcm.size == 2400
                    assert 0.25 < np.abs(e.pcm).max() <= 0.31
        assert "".join(e.text for e in evs if isinstance(e, TextDelta)) == "hello from the"
        assert c.stats["frames"] == 2 * eng.n_chunks and c.stats["lost"] == 0 and c.stats["duplicates"] == 0
        assert c.last_header == (2 * eng.n_chunks - 1, 1, (eng.n_chunks - 1) * 2400)
        s = eng.sessions[0]
        assert set(s.sample_rates) == {16000} and s.audio_samples == 6400 + 1600 and s.texts == ["again"]
        # the connection closed -> the session closed and its pages came back
        _wait(lambda: eng.kv_free == eng.kv_total)
        text = http_get(srv.url + "/metrics")[2]
        assert metric(text, "vita_sessions_total") == 1
        assert metric(text, "vita_turns_total") == 2
        assert metric(text, "vita_frames_out_total", 'kind="audio"') == 2 * eng.n_chunks
        assert metric(text, "vita_ttfa_seconds_count") == 2
        assert metric(text, "vita_sessions_active") == 0


def _wait(cond, timeout=5.0):
    import time

    t = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t, "condition not reached in time"
        time.sleep(0.01)


def test_healthz_index_static():
    with running_server(FakeEngine(), max_sessions=3) as srv:
        h = healthz(srv)
        assert h["status"] == "ok" and h["sessions_active"] == 0 and h["max_sessions"] == 3
        st, ct, body = http_get(srv.url + "/")
        assert st == 200 and "text/html" in ct and "audio-worklet.js" in body and "vitaStats" in body
        st, ct, body = http_get(srv.url + "/static/audio-worklet.js")
        assert st == 200 and "registerProcessor" in body
        st, ct, body = http_get(srv.url + "/metrics")
        assert st == 200 and ct.startswith("text/plain") and "vita_ttfa_seconds_bucket" in body


def test_auth_token():
    eng = FakeEngine()
    with running_server(eng, token="s3cret-token") as srv:
        async def go():
            out = {}
            for label, kw in (("none", {}), ("wrong", {"token": "nope"}), ("prefix", {"token": "s3cret"})):
                with pytest.raises(Refused) as ei:
                    await connect(srv.ws_url, **kw)
                out[label] = ei.value
            async with connect(srv.ws_url, token="s3cret-token") as c:
                assert c.session_id
            async with connect(srv.ws_url, token="s3cret-token", token_in_header=True) as c:
                assert c.session_id
            return out

        refused = run(go())
        for e in refused.values():
            assert e.code == "unauthorized" and e.close_code == P.CLOSE_POLICY
        assert len(eng.sessions) == 2  # refused connections never create a session
        text = http_get(srv.url + "/metrics")[2]
        assert metric(text, "vita_sessions_refused_total", 'reason="unauthorized"') == 3


def test_malformed_frames_get_errors_and_session_survives():
    eng = FakeEngine()
    with running_server(eng, max_frame_bytes=64 << 10) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                bad = [
                    "{not json",
                    "[1, 2]",
                    json.dumps({"type": "frobnicate"}),
                    json.dumps({"type": "playback", "position_s": -1}),
                    json.dumps({"type": "playback", "position_s": "x"}),
                    json.dumps({"type": "text", "text": ""}),
                    json.dumps({"type": "hello", "sample_rate": 16000}),
                    bytes([P.KIND_AUDIO]) + b"\x01\x02\x03",  # odd-length PCM16
                    bytes([0x7f]) + b"\x00\x00",  # unknown kind
                    b"",  # empty
                    bytes([P.KIND_AUDIO]) + bytes(70 << 10),  # oversized (> max_frame_bytes)
                    bytes([P.KIND_IMAGE]) + P.MAGIC_JPEG + b"this is not a jpeg",  # doesn't decode
                    bytes([P.KIND_IMAGE]) + b"GIF89a....",  # not JPEG/PNG
                    bytes([P.KIND_VIDEO]) + b"\x00\x01",  # short timestamp
                    bytes([P.KIND_VIDEO]) + struct.pack("<d", float("nan")) + png_bytes(),
                    "x" * (70 << 10),  # oversized JSON
                ]
                errs = []
                for b in bad:
                    await c.send_raw(b)
                    ev = await c.next_event(5)
                    assert isinstance(ev, Error), (b[:20], ev)
                    errs.append(ev)
                # good images still go through, and a turn still completes
                await c.send_image(png_bytes())
                await c.send_video_frame(jpeg_bytes(), 1.25)
                await c.send_text("still alive?")
                evs = await collect_turn(c)
                return errs, evs

        errs, evs = run(go())
        codes = [e.code for e in errs]
        assert codes == ["bad_json", "bad_json", "unknown_type", "bad_message", "bad_message", "bad_message",
                         "bad_message", "bad_audio", "bad_frame", "bad_frame", "too_big", "bad_image", "bad_image",
                         "bad_image", "bad_image", "too_big"], codes
        assert not any(e.fatal for e in errs) and all(e.message for e in errs)
        assert names(evs)[-1] == "TurnEnd"
        s = eng.sessions[0]
        assert len(s.images) == 1 and s.images[0].size == (32, 24) and s.images[0].mode == "RGB"
        assert len(s.video) == 1 and s.video[0][1] == 1.25 and s.video[0][0].size == (64, 48)
        assert s.audio_samples == 0  # nothing of the bad audio reached the engine
        assert healthz(srv)["status"] == "ok"


def test_transport_limit_closes_1009_server_survives():
    with running_server(FakeEngine(), max_frame_bytes=16 << 10) as srv:
        limit = srv.vita.config.transport_max_bytes

        async def go():
            c = await connect(srv.ws_url)
            await c.send_raw(bytes([P.KIND_AUDIO]) + bytes(limit + 2))
            ev = await c.next_event(5)
            assert ev is None, ev
            async with connect(srv.ws_url) as c2:  # the server still takes sessions
                await c2.send_text("hi")
                await collect_turn(c2)
            return c.close_code

        assert run(go()) == P.CLOSE_TOO_BIG


def test_bad_hello_refused():
    with running_server(FakeEngine()) as srv:
        async def go():
            from websockets.asyncio.client import connect as ws_connect

            out = []
            for first in (b"\x01\x00\x00", json.dumps({"type": "text", "text": "hi"}),
                          json.dumps({"type": "hello", "sample_rate": 1000}),
                          json.dumps({"type": "hello", "format": "opus"})):
                async with ws_connect(srv.ws_url) as ws:
                    await ws.send(first)
                    msg = json.loads(await ws.recv())
                    assert msg["type"] == "error" and msg["fatal"] is True
                    await ws.wait_closed()
                    out.append((msg["code"], ws.close_code))
            with pytest.raises(Refused):
                await connect(srv.ws_url, sample_rate=96000)
            return out

        assert run(go()) == [("bad_hello", 1008)] * 4


def test_max_sessions_refused_1013():
    eng = FakeEngine()
    with running_server(eng, max_sessions=2) as srv:
        async def go():
            a = await connect(srv.ws_url)
            b = await connect(srv.ws_url)
            with pytest.raises(Refused) as ei:
                await connect(srv.ws_url)
            assert healthz(srv)["sessions_active"] == 2
            await a.close()
            for _ in range(200):  # the slot frees when the server notices the close
                if healthz(srv)["sessions_active"] < 2:
                    break
                await asyncio.sleep(0.01)
            c = await connect(srv.ws_url)
            await b.close()
            await c.close()
            return ei.value

        e = run(go())
        assert e.close_code == 1013 and e.code == "capacity" and "busy" in e.message
        assert metric(http_get(srv.url + "/metrics")[2], "vita_sessions_refused_total", 'reason="capacity"') == 1


def test_engine_capacity_error_refused_1013():
    eng = FakeEngine(kv_pages=8, pages_per_session=4)
    with running_server(eng, max_sessions=10) as srv:
        async def go():
            a, b = await connect(srv.ws_url), await connect(srv.ws_url)
            with pytest.raises(Refused) as ei:
                await connect(srv.ws_url)
            await a.close()
            await b.close()
            return ei.value

        e = run(go())
        assert e.close_code == 1013 and "KV cache full" in e.message
        _wait(lambda: healthz(srv)["sessions_active"] == 0)


def test_interrupt_stops_audio():
    eng = FakeEngine(n_chunks=40, delay_s=0.02)
    with running_server(eng) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                await c.send_text("talk a lot")
                evs = []
                async for ev in c.events():
                    evs.append(ev)
                    if isinstance(ev, AudioChunk) and sum(isinstance(e, AudioChunk) for e in evs) == 3:
                        await c.playback(0.25)
                        await c.interrupt()
                    if isinstance(ev, TurnEnd):
                        break
                return evs

        evs = run(go())
        n = names(evs)
        assert n[-3:] == ["Interrupted", "Metrics", "TurnEnd"], n
        assert 3 <= n.count("AudioChunk") < 40
        s = eng.sessions[0]
        assert s.interrupts == 1 and s.playback == [0.25]


def test_disconnect_mid_turn_frees_session():
    eng = FakeEngine(n_chunks=200, delay_s=0.02)
    with running_server(eng) as srv:
        async def go():
            c = await connect(srv.ws_url)
            await c.send_text("a long answer please")
            async for ev in c.events():
                if isinstance(ev, AudioChunk):
                    break
            assert eng.kv_free < eng.kv_total
            c.ws.transport.abort()  # abrupt: no close frame

        run(go())
        _wait(lambda: eng.kv_free == eng.kv_total and eng.open_sessions == 0)
        assert eng.sessions[0].closed
        _wait(lambda: healthz(srv)["sessions_active"] == 0)


def test_idle_timeout_closes_4000():
    with running_server(FakeEngine(), idle_timeout_s=0.4) as srv:
        async def go():
            c = await connect(srv.ws_url)
            ev = await c.next_event(5)
            assert isinstance(ev, Error) and ev.code == "idle_timeout" and ev.fatal
            assert await c.next_event(5) is None
            return c.close_code

        assert run(go()) == P.CLOSE_IDLE


def test_max_session_length_closes_4001():
    with running_server(FakeEngine(), max_session_s=0.5) as srv:
        async def go():
            c = await connect(srv.ws_url)
            t = asyncio.get_running_loop().time()
            while True:  # keep it busy: the idle timer must not be what ends it
                await c.send_audio(np.zeros(320, np.int16))
                try:
                    ev = await c.next_event(0.05)
                except asyncio.TimeoutError:
                    continue
                if isinstance(ev, Error):
                    break
            assert ev.code == "session_limit" and asyncio.get_running_loop().time() - t < 3
            assert await c.next_event(5) is None
            return c.close_code

        assert run(go()) == P.CLOSE_SESSION_LIMIT


def test_system_prompt_and_end_turn():
    eng = FakeEngine()
    with running_server(eng) as srv:
        async def go():
            async with connect(srv.ws_url, options={"system_prompt": "be brief", "voice": "x"}) as c:
                assert c.ready.info["ignored_options"] == ["voice"]
                await c.send_audio(speechlike(0.3))
                await c.end_turn()
                return await collect_turn(c)

        evs = run(go())
        assert isinstance(evs[-2], Metrics) and isinstance(evs[-1], TurnEnd)
        assert eng.sessions[0].system_prompt == "be brief"


def test_cli_serve_parser(monkeypatch):
    from vita_engine import cli

    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda a: seen.update(vars(a)) or 0)
    assert cli.main(["serve"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["model"] == "tiny"
    assert seen["token"] is None and seen["max_sessions"] >= 1
    cli.main(["serve", "--model", "/x", "--port", "9", "--token", "t", "--max-sessions", "3"])
    assert (seen["model"], seen["port"], seen["token"], seen["max_sessions"]) == ("/x", 9, "t", 3)


def test_interrupted_event_dataclasses_roundtrip():
    # JSON events map back onto the runtime's dataclasses
    assert P.json_to_event({"type": "interrupted", "turn": 3}) == Interrupted(3)
    assert P.json_to_event({"type": "metrics", "turn": 1, "values": {"ttfa_ms": 5.0}}) == Metrics(1, {"ttfa_ms": 5.0})
    fr = P.pack_audio_out(7, 2, 4800, np.array([0.0, 0.5, -1.0], np.float32))
    seq, turn, start, pcm = P.unpack_audio_out(fr)
    assert (seq, turn, start) == (7, 2, 4800) and np.frombuffer(pcm, "<i2").tolist() == [0, 16384, -32767]


def test_session_freed_even_if_event_stream_ignores_cancellation():
    """The server closes the session first (its events() then ends) and never waits unboundedly."""
    import time

    from _fake_engine import FakeSession

    class Stubborn(FakeSession):
        async def events(self):
            while not self.closed:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    continue  # swallow, as a buggy engine might
            return
            yield

    eng = FakeEngine()
    eng.session = lambda system_prompt=None: eng.sessions.append(Stubborn(eng, system_prompt)) or eng.sessions[-1]
    with running_server(eng) as srv:
        async def go():
            c = await connect(srv.ws_url)
            await c.close()

        run(go())
        t = time.monotonic()
        _wait(lambda: healthz(srv)["sessions_active"] == 0)
        assert time.monotonic() - t < 2 and eng.sessions[0].closed

"""Server hardening (issue 17), all on loopback: a client that stops reading is dropped for real
(socket closed, session and pages freed) or, if it reads again in time, gets `slow_client` + 4002;
strict JSON both ways; the transport limit of docs/protocol.md §5; the engine's KV / TTS /
scheduler figures on /metrics, every page free after a disconnect storm."""
from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from _fake_engine import FakeEngine, FakeSession, Metrics, TurnEnd  # noqa: E402
from _server_helpers import (RawClient, collect_turn, healthz, http_get, load_engine, metric, run,  # noqa: E402
                             running_server, server_sockets)

from vita_engine.client import Error, connect  # noqa: E402
from vita_engine.server import ServerConfig  # noqa: E402
from vita_engine.server import protocol as P  # noqa: E402


def _metrics(srv) -> str:
    return http_get(srv.url + "/metrics")[2]


def _wait(cond, timeout: float, step: float = 0.02):
    """Poll cond() until truthy or timeout -> its last value."""
    t_end = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= t_end:
            return v
        time.sleep(step)


def _stalled_client(srv, rcvbuf: int = 4096) -> RawClient:
    """A raw client with a small receive window that starts an endless answer and stops reading."""
    c = RawClient(srv.ws_url, rcvbuf=rcvbuf)
    c.send_json({"type": "hello", "sample_rate": 16000, "format": "pcm16"})
    deadline = time.monotonic() + 10
    while not c.texts() and c._read_some(deadline):
        pass
    assert c.texts() and c.texts()[0]["type"] == "ready", c.frames
    c.send_json({"type": "text", "text": "talk for half an hour"})
    return c


def _slow_decision(srv, timeout: float = 20.0) -> float:
    """Wait for the server's slow_client decision (its error counter) -> time.monotonic() seen."""
    ok = _wait(lambda: metric(_metrics(srv), "vita_client_errors_total", 'code="slow_client"') >= 1, timeout)
    assert ok, "the server never gave up on the stalled client"
    return time.monotonic()


# -- 1. a stalled reader ---------------------------------------------------------------------------
def test_stalled_reader_is_dropped_within_the_close_timeout():
    """The client never reads again: within slow_client_close_timeout_s (+1 s slack) of the slow
    decision the server's socket is closed (gone from the process's open sockets, not left
    ESTABLISHED with bytes queued), the session is stopped and its pages are free; the client
    then sees the connection end (EOF or reset), without a close frame."""
    eng = FakeEngine(n_text=1, n_chunks=100000, chunk_s=0.1, delay_s=0.0)
    timeout_s = 1.0
    with running_server(eng, send_queue_s=0.5, slow_client_close_timeout_s=timeout_s) as srv:
        c = _stalled_client(srv)
        try:
            assert _wait(lambda: server_sockets(srv.port, c.addr), 5), "no server socket for the client"
            t_decision = _slow_decision(srv)
            gone = _wait(lambda: not server_sockets(srv.port, c.addr), timeout_s + 1.0, step=0.01)
            t_gone = time.monotonic() - t_decision
            assert gone, f"server socket still open {t_gone:.2f} s after the decision: {server_sockets(srv.port)}"
            assert not [s for s in server_sockets(srv.port) if s.status == "ESTABLISHED"]
            assert eng.sessions[0].closed and eng.kv_free == eng.kv_total
            assert _wait(lambda: healthz(srv)["sessions_active"] == 0, 2)
            prom = _metrics(srv)
            assert metric(prom, "vita_connections_dropped_total") == 1
            assert metric(prom, "vita_kv_blocks_free") == metric(prom, "vita_kv_blocks_total") == eng.kv_total
            # the client reads again: what was in flight, then the end (no close frame: it was dropped)
            assert c.read_until_closed(10), "the client never saw the connection end"
            assert c.close_code is None, c.close_code
            assert not any(m.get("type") == "error" for m in c.texts()), c.texts()[-3:]
        finally:
            c.close()
        # the server still serves
        async def go():
            async with connect(srv.ws_url) as c2:
                await c2.send_text("hi")
                return await collect_turn(c2, timeout=10)

        eng.n_chunks = 3
        assert type(run(go())[-1]).__name__ == "TurnEnd"


def test_stalled_reader_that_reads_again_in_time_gets_slow_client_4002():
    """The client resumes reading before slow_client_close_timeout_s: it gets what was in flight,
    then `error slow_client` (fatal) and close 4002 (not 1006, not idle_timeout); the server closes
    its socket and frees the session."""
    eng = FakeEngine(n_text=1, n_chunks=100000, chunk_s=0.1, delay_s=0.0)
    with running_server(eng, send_queue_s=0.5, slow_client_close_timeout_s=4.0, idle_timeout_s=60.0) as srv:
        c = _stalled_client(srv)
        try:
            t_decision = _slow_decision(srv)
            time.sleep(0.3)  # still stalled after the decision, then reads again well within 4 s
            assert c.read_until_closed(10), "the connection did not end"
            assert time.monotonic() - t_decision < 4.0 + 1.0
            errs = [m for m in c.texts() if m.get("type") == "error"]
            assert [e["code"] for e in errs] == ["slow_client"], errs
            assert errs[0]["fatal"] is True and "too slowly" in errs[0]["message"]
            assert errs[0]["queued_audio_s"] > 0.5 and errs[0]["queued_events"] > 0
            assert c.texts()[-1] is errs[0]  # nothing after the error
            assert c.close_code == P.CLOSE_SLOW_CLIENT
            assert c.frames and c.frames[0][0] == "text"  # ready first, then the in-flight output
            assert any(k == "binary" for k, _ in c.frames)
            assert _wait(lambda: not server_sockets(srv.port, c.addr), 2), server_sockets(srv.port)
            assert eng.sessions[0].closed and eng.kv_free == eng.kv_total
            assert _wait(lambda: healthz(srv)["sessions_active"] == 0, 2)
            assert metric(_metrics(srv), "vita_connections_dropped_total") == 0
        finally:
            c.close()


def test_idle_close_of_a_stalled_reader_is_bounded_too():
    """The same bound for every server-side close: an idle timeout on a client that does not read
    (its window full of output) drops the connection instead of waiting on it forever."""
    eng = FakeEngine(n_text=1, n_chunks=100000, chunk_s=0.1, delay_s=0.005)  # 20x real time, bounded memory
    # the send queue never fills (huge bound); the idle timeout ends the session
    with running_server(eng, send_queue_s=1e6, send_queue_messages=10**9, idle_timeout_s=1.5,
                        slow_client_close_timeout_s=1.0) as srv:
        c = _stalled_client(srv)
        try:
            assert _wait(lambda: metric(_metrics(srv), "vita_client_errors_total", 'code="idle_timeout"') >= 1, 10)
            t_decision = time.monotonic()
            assert _wait(lambda: not server_sockets(srv.port, c.addr), 2.0, step=0.01), server_sockets(srv.port)
            assert time.monotonic() - t_decision < 2.0
            assert _wait(lambda: eng.kv_free == eng.kv_total and healthz(srv)["sessions_active"] == 0, 3)
        finally:
            c.close()


# -- 2. strict JSON -----------------------------------------------------------------------------
NON_FINITE = ['{"type": "ping", "t": NaN}', '{"type": "ping", "t": -Infinity}', '{"type": "ping", "t": Infinity}',
              '{"type": "ping", "t": 1e400}', '{"type": "ping", "t": -1e400}', '{"type": "ping", "t": [1, {"x": NaN}]}',
              '{"type": "ping", "t": ' + "9" * 400 + "}", '{"type": "playback", "position_s": NaN}']


def test_strict_json_helpers():
    for text in NON_FINITE:
        with pytest.raises(P.ProtocolError) as ei:
            P.parse_json_in(text, 1 << 16)
        assert ei.value.code == "bad_message", (text, ei.value.code)
    ok = P.parse_json_in('{"type": "ping", "t": [1.5e300, -2, 1e-400, "NaN", ' + "9" * 300 + "]}", 1 << 16)
    assert ok["t"][:4] == [1.5e300, -2, 0.0, "NaN"]
    # output: never NaN / Infinity; non-finite numbers become null
    s = P.dumps({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.0], "c": {"d": float("nan")}})
    assert json.loads(s, parse_constant=pytest.fail) == {"a": None, "b": [None, None, 1.0], "c": {"d": None}}
    m = P.event_to_json(Metrics(2, {"ttfa_ms": float("nan"), "response_ms": np.float32("inf"), "x": 3}))
    assert "NaN" not in m and "Infinity" not in m
    assert json.loads(m)["values"] == {"ttfa_ms": None, "response_ms": None, "x": 3.0}
    with pytest.raises(ValueError, match="NaN or infinite"):
        P.dumps_strict({"position_s": float("nan")})


class _NaNSession(FakeSession):
    async def events(self):
        while not self.closed:
            if self._text_pending:
                self._text_pending = False
                yield Metrics(self.turn, {"ttfa_ms": float("nan"), "response_ms": float("inf"), "ok_ms": 1.0})
                yield TurnEnd(self.turn)
                self.turn += 1
            await asyncio.sleep(0.01)


class _NaNEngine(FakeEngine):
    def session(self, system_prompt=None):
        s = _NaNSession(self, system_prompt)
        self.sessions.append(s)
        return s


def test_non_finite_numbers_rejected_and_never_emitted():
    with running_server(_NaNEngine()) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                codes = []
                for text in NON_FINITE:
                    await c.send_raw(text)
                    ev = await c.next_event(5)
                    assert isinstance(ev, Error), (text, ev)
                    codes.append(ev.code)
                await c.send_raw('{"type": "ping", "t": 12.5}')  # a finite ping still answered
                pong = json.loads(await asyncio.wait_for(c.ws.recv(), 5))
                await c.send_text("metrics please")
                raw = []
                while not raw or json.loads(raw[-1])["type"] != "turn_end":
                    raw.append(await asyncio.wait_for(c.ws.recv(), 5))
                return codes, pong, raw

        codes, pong, raw = run(go())
        assert codes == ["bad_message"] * len(NON_FINITE), codes
        assert pong == {"type": "pong", "t": 12.5}
        for text in raw:  # strict parse: what a browser's JSON.parse accepts
            json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))
        vals = json.loads(raw[0])["values"]
        assert vals == {"ttfa_ms": None, "response_ms": None, "ok_ms": 1.0}, raw

        async def hello_nan():  # in the hello: refused like any bad hello
            from websockets.asyncio.client import connect as ws_connect

            async with ws_connect(srv.ws_url) as ws:
                await ws.send('{"type": "hello", "sample_rate": 16000, "x": NaN}')
                err = json.loads(await asyncio.wait_for(ws.recv(), 5))
                try:
                    await asyncio.wait_for(ws.recv(), 5)
                except Exception as e:  # noqa: BLE001
                    return err, getattr(getattr(e, "rcvd", None), "code", None)
            return err, None

        err, code = run(hello_nan())
        assert err["code"] == "bad_hello" and err["fatal"] is True and code == P.CLOSE_POLICY


def test_client_refuses_non_finite_numbers():
    with running_server(FakeEngine()) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                with pytest.raises(ValueError, match="NaN or infinite"):
                    await c.playback(float("nan"))
                with pytest.raises(ValueError):
                    await c.send_json({"type": "ping", "t": float("inf")})
                await c.send_text("still fine")
                return await collect_turn(c)

        assert type(run(go())[-1]).__name__ == "TurnEnd"


# -- 3. the transport limit ------------------------------------------------------------------------
def test_transport_limit_is_4x_max_frame_bytes():
    """docs/protocol.md §5: with --max-frame-bytes 65536 the transport reads messages up to
    4 x 65536 = 262144 bytes (answered `too_big` above 65536) and closes 1009 above, unread."""
    assert ServerConfig(max_frame_bytes=65536).transport_max_bytes == 4 * 65536
    assert ServerConfig(max_frame_bytes=1024, max_json_bytes=65536).transport_max_bytes == 4 * 65536
    with running_server(FakeEngine(), max_frame_bytes=65536) as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                await c.send_raw(bytes([P.KIND_AUDIO]) + bytes(4 * 65536 - 1))  # exactly at the limit: read
                ev = await c.next_event(5)
                assert isinstance(ev, Error) and ev.code == "too_big" and not ev.fatal, ev
                await c.send_raw(bytes([P.KIND_AUDIO]) + bytes(1000))  # session goes on
            c = await connect(srv.ws_url)
            await c.send_raw(bytes([P.KIND_AUDIO]) + bytes(263_000))  # ~263 KB > 262144
            ev = await c.next_event(5)
            assert ev is None, ev
            return c.close_code

        assert run(go()) == P.CLOSE_TOO_BIG
        assert healthz(srv)["status"] == "ok"


# -- 4. engine figures on /metrics -----------------------------------------------------------------
def test_kv_metrics_follow_sessions_fake_engine():
    eng = FakeEngine(kv_pages=64, pages_per_session=4)
    with running_server(eng) as srv:
        prom = _metrics(srv)
        assert metric(prom, "vita_kv_blocks_total") == 64 and metric(prom, "vita_kv_blocks_free") == 64
        assert metric(prom, "vita_kv_session_blocks_gcount") == 0

        async def go():
            c1, c2 = await connect(srv.ws_url), await connect(srv.ws_url)
            p = _metrics(srv)
            await c1.close()
            await c2.close()
            return p

        prom = run(go())
        assert metric(prom, "vita_kv_blocks_free") == 64 - 8
        assert metric(prom, "vita_kv_session_blocks_gcount") == 2 and metric(prom, "vita_kv_session_blocks_gsum") == 8
        assert metric(prom, "vita_kv_session_blocks_bucket", 'le="4"') == 2
        assert metric(prom, "vita_kv_session_blocks_bucket", 'le="2"') == 0
        assert metric(prom, "vita_kv_session_blocks_max") == 4
        assert _wait(lambda: metric(_metrics(srv), "vita_kv_blocks_free") == 64, 5)


@pytest.fixture(scope="module")
def tiny():
    eng, real = load_engine()
    if not real:
        pytest.skip("vita_engine.runtime is not available")
    yield eng
    eng.close()


def test_disconnect_storm_frees_every_page(tiny):
    """10 clients start a turn each and drop abruptly (no close frame) once their answer is being
    produced: /metrics soon shows every KV page free, nothing reserved, no session, no TTS stream;
    the scheduler histograms are filled and consistent."""
    n = 10
    with running_server(tiny, max_sessions=16) as srv:
        prom0 = _metrics(srv)
        total = metric(prom0, "vita_kv_blocks_total")
        assert total > 0 and metric(prom0, "vita_kv_blocks_free") == total

        async def one(i: int):
            c = await connect(srv.ws_url)
            await c.send_text(f"hello number {i}")
            await c.next_event(60)  # the answer is being produced (its first event)
            return c

        async def storm():
            clients = await asyncio.gather(*(one(i) for i in range(n)))
            held = _metrics(srv)
            for c in clients:
                c.ws.transport.abort()  # hang up mid-answer, no close frame
            return held

        held = run(storm(), timeout=120)
        assert metric(held, "vita_kv_blocks_reserved") > 0
        assert metric(held, "vita_kv_session_blocks_gcount") == n
        assert metric(held, "vita_kv_blocks_free") < total

        def all_free():
            p = _metrics(srv)
            return (metric(p, "vita_kv_blocks_free") == total and metric(p, "vita_kv_blocks_reserved") == 0
                    and metric(p, "vita_kv_session_blocks_gcount") == 0 and metric(p, "vita_sessions_active") == 0
                    and metric(p, "vita_tts_streams_active") == 0) and p

        prom = _wait(all_free, 15, step=0.05)
        assert prom, _metrics(srv)
        assert metric(prom, "vita_tts_streams_max") > 0 and metric(prom, "vita_tts_blocks_free") == metric(
            prom, "vita_tts_blocks_total")
        ticks = metric(prom, "vita_scheduler_tick_seconds_count")
        assert ticks > 0 and metric(prom, "vita_scheduler_host_seconds_count") == ticks
        assert metric(prom, "vita_scheduler_tick_seconds_bucket", 'le="+Inf"') == ticks
        tick_s = metric(prom, "vita_scheduler_tick_seconds_sum")
        host_s = metric(prom, "vita_scheduler_host_seconds_sum")
        assert 0 < host_s <= tick_s and math.isfinite(tick_s), (host_s, tick_s)
        assert metric(prom, "vita_scheduler_ticks_total") >= ticks

"""The Ray-free parts of the Ray Serve replicas (vita_engine.serving.core) and the server's drain
(VitaServer.drain, close 1012): placement ranks, session affinity, the proxy middleware, the
replica's health check, drain semantics. Fast; needs no Ray (tests/test_serving_ray.py runs the
real thing)."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from _fake_engine import FakeEngine  # noqa: E402
from _server_helpers import run, running_server, until_closed  # noqa: E402

from vita_engine.client import Error, Refused, TurnEnd, connect  # noqa: E402
from vita_engine.serving import core  # noqa: E402


# ---- placement ------------------------------------------------------------------------------------
def test_rank_replicas_least_loaded_room_first_then_full():
    reps = ["a", "b", "c"]
    assert core.rank_replicas(reps, {"a": 3, "b": 1, "c": None}, "", 3) == [["c", "b"], ["a"]]
    assert core.rank_replicas(reps, {"a": 3, "b": 4, "c": 3}, "", 3) == [["a", "c", "b"]]  # all full: refused by one


def test_rank_replicas_session_owner_first_while_it_has_room():
    reps = ["a", "b", "c"]
    sid = next(s for s in (f"user-{i}" for i in range(100)) if core.owner(s, reps) == "b")
    assert core.rank_replicas(reps, {"a": 0, "b": 2, "c": 0}, sid, 3) == [["b"], ["a", "c"]]
    assert core.rank_replicas(reps, {"a": 0, "b": 3, "c": 0}, sid, 3) == [["a", "c"], ["b"]]  # owner full: elsewhere


def test_owner_is_stable_and_moves_only_the_lost_replicas_sessions():
    reps = [f"r{i}" for i in range(4)]
    sids = [f"s{i}" for i in range(400)]
    before = {s: core.owner(s, reps) for s in sids}
    assert before == {s: core.owner(s, list(reversed(reps))) for s in sids}  # order-free
    counts = {r: list(before.values()).count(r) for r in reps}
    assert min(counts.values()) > 60, counts  # spread
    after = {s: core.owner(s, reps[:3]) for s in sids}
    moved = [s for s in sids if before[s] != after[s]]
    assert moved and all(before[s] == "r3" for s in moved)


def test_session_id_from_query_string_unless_header():
    sc = core.with_session_header({"type": "websocket", "headers": [], "query_string": b"session=abc&x=1"})
    assert (core.SESSION_HEADER.encode(), b"abc") in sc["headers"]
    sc = core.with_session_header({"type": "websocket", "headers": [(b"X-Session-Id", b"hdr")],
                                   "query_string": b"session=abc"})
    assert sc["headers"] == [(b"X-Session-Id", b"hdr")]
    assert core.with_session_header({"type": "websocket", "headers": [], "query_string": b""})["headers"] == []


def _drive(app, path="/ws", client_leaves=False):
    sent = []

    async def go():
        q = asyncio.Queue()
        await q.put({"type": "websocket.connect"})
        if client_leaves:
            await q.put({"type": "websocket.disconnect", "code": 1000})

        async def receive():
            return await q.get()

        async def send(m):
            sent.append(m)

        await core.SessionProxyMiddleware(app)({"type": "websocket", "path": path, "headers": [], "query_string": b""},
                                               receive, send)

    asyncio.run(go())
    return sent


def test_proxy_middleware_closes_a_lost_replicas_websocket_with_1012():
    async def dies_after_accept(scope, receive, send):  # what Serve's proxy does when the replica dies
        await receive()
        await send({"type": "websocket.accept"})

    sent = _drive(dies_after_accept)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    ev = json.loads(sent[1]["text"])
    assert ev["type"] == "error" and ev["code"] == "replica_lost" and ev["fatal"] is True
    assert sent[2]["code"] == 1012
    ev = json.loads(_drive(dies_after_accept, path="/v1/realtime")[1]["text"])
    assert ev["type"] == "error" and ev["error"]["code"] == "replica_lost"  # the Realtime API's error shape


def test_proxy_middleware_leaves_normal_closes_alone():
    async def closes(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    async def client_left(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # the disconnect

    assert [m["type"] for m in _drive(closes)] == ["websocket.accept", "websocket.close"]
    assert [m["type"] for m in _drive(client_left, client_leaves=True)] == ["websocket.accept"]


def test_relabel_metrics():
    a = "# HELP x_total X\n# TYPE x_total counter\nx_total 3.0\nh_bucket{le=\"1\"} 2.0\n"
    out = core.relabel_metrics({"r1": a, "r2": a.replace("3.0", "5.0")})
    assert out.count("# HELP x_total X") == 1
    assert 'x_total{replica="r1"} 3.0' in out and 'x_total{replica="r2"} 5.0' in out
    assert 'h_bucket{replica="r2",le="1"} 2.0' in out


@pytest.mark.parametrize("args, word", [
    ({"sessions_per_replica": 0}, "sessions_per_replica"),
    ({"replicas": 2, "autoscale": "1:3"}, "not both"),
    ({"autoscale": "0:3"}, "1 <= MIN <= MAX"),
    ({"autoscale": "3"}, "MIN:MAX"),
    ({"gpus_per_replica": 1}, "gpus_per_replica"),  # cpu device
    ({"device": "cuda", "gpus_per_replica": 0}, "gpus_per_replica"),
    ({"modle": "tiny"}, "unknown args ['modle']"),
])
def test_check_spec_names_the_bad_arg(args, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        core.check_spec(args)


def test_check_spec_defaults():
    s = core.check_spec({"device": "cuda", "sessions_per_replica": 8, "autoscale": "1:4"})
    assert s["gpus_per_replica"] == 1 and s["autoscale"] == (1, 4) and s["admission_slack"] == 2
    assert core.check_spec({})["gpus_per_replica"] == 0


# ---- the replica: health ----------------------------------------------------------------------------
def test_replica_health_check_fails_on_dead_scheduler_or_failed_self_test(monkeypatch):
    pytest.importorskip("torch")
    from vita_engine import ops

    r = core.ReplicaCore(core.check_spec({"sessions_per_replica": 2, "engine_options": {"max_new_tokens": 4}}), "r0")
    try:
        assert r.server.config.replica == "r0" and r.engine.options["max_sessions"] == 2
        r.check_health()
        real = ops.rms_norm
        monkeypatch.setattr(ops, "rms_norm", lambda x, w, *a: real(x, w, *a) * 2)
        with pytest.raises(RuntimeError, match="self-test"):
            r.check_health()
        assert r.info()["healthy"] is False
        monkeypatch.setattr(ops, "rms_norm", real)
        r.check_health()
        r.engine._scheduler.stop()
        with pytest.raises(RuntimeError, match="scheduler thread is dead"):
            r.check_health()
    finally:
        r.close()


# ---- the server: replica id and drain ---------------------------------------------------------------
def test_ready_names_the_replica():
    with running_server(FakeEngine(), replica="rep-7") as srv:
        async def go():
            async with connect(srv.ws_url) as c:
                return c.ready.info

        assert run(go())["replica"] == "rep-7"
    with running_server(FakeEngine()) as srv:
        async def go2():
            async with connect(srv.ws_url) as c:
                return c.ready.info

        assert "replica" not in run(go2())


def test_drain_lets_open_turns_finish_then_closes_1012():
    """An idle session is closed (1012, error `draining`) at once, one in a turn after its
    TurnEnd, and a new session is refused (1012) while draining."""
    eng = FakeEngine(n_text=3, n_chunks=40, chunk_s=0.02, delay_s=0.02)  # a turn of ~0.9 s
    with running_server(eng, replica="r") as srv:
        async def go():
            idle = await connect(srv.ws_url)
            busy = await connect(srv.ws_url)
            await busy.send_text("long answer")
            first = await busy.next_event(10)
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            drain = asyncio.run_coroutine_threadsafe(srv.vita.drain(grace_s=20.0), srv_loop(srv))
            idle_evs = await until_closed(idle)
            t_idle = time.monotonic() - t0
            with pytest.raises(Refused) as ref:
                await connect(srv.ws_url)
            busy_evs = await until_closed(busy)
            await loop.run_in_executor(None, drain.result, 10)
            return first, idle, idle_evs, t_idle, ref.value, busy, busy_evs

        first, idle, idle_evs, t_idle, refused, busy, busy_evs = run(go())
    assert idle.close_code == 1012 and t_idle < 0.8
    assert [e.code for e in idle_evs if isinstance(e, Error)] == ["draining"]
    assert refused.close_code == 1012 and refused.code == "draining"
    names = [type(e).__name__ for e in busy_evs]
    assert busy.close_code == 1012 and "TurnEnd" in names and names.index("TurnEnd") < names.index("Error"), names
    assert srv.vita.active == 0


def test_drain_grace_bounds_a_turn_that_does_not_end():
    eng = FakeEngine(n_text=1, n_chunks=2000, chunk_s=0.02, delay_s=0.01)  # ~20 s of turn
    with running_server(eng) as srv:
        async def go():
            c = await connect(srv.ws_url)
            await c.send_text("go on forever")
            await c.next_event(10)
            t0 = time.monotonic()
            asyncio.run_coroutine_threadsafe(srv.vita.drain(grace_s=0.5), srv_loop(srv))
            evs = await until_closed(c)
            return c, evs, time.monotonic() - t0

        c, evs, dt = run(go())
    assert c.close_code == 1012 and dt < 5.0
    assert not any(isinstance(e, TurnEnd) for e in evs)
    assert "did not end within 0.5 s" in [e for e in evs if isinstance(e, Error)][0].message


def srv_loop(srv):
    """The server's event loop (uvicorn's, in its thread): that of an open session's task."""
    return next(iter(srv.vita.conns))._recv_task.get_loop()

"""Replicas on Ray Serve, for real (docs/ray-serve.md): a local Ray instance (no dashboard, 2 CPUs)
runs the Serve app `vita_engine.serving.ray` with 2 CPU replicas of the tiny model, K=3 sessions
each, on 127.0.0.1. One app for the module (its tests run in order; the last one scales it down).

- 6 concurrent real-time sessions complete their turns and land on both replicas;
- a session id (header or ?session=) always lands on its replica;
- replicas x K + 1 sessions: the last one is refused at once (close 1013), no queued handshake;
- the cluster view and per-replica metrics;
- a replica killed mid-turn: its sessions are closed with 1012 (`replica_lost`) within seconds, the
  other replica's sessions finish their turns, and new sessions succeed once Serve replaced it;
- scale-down: the stopped replica lets its open turn end, then closes with 1012 (`draining`).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason='ray[serve] is not installed (pip install "vita-engine[ray]")')
pytest.importorskip("torch")

from _server_helpers import speech_sample, speechlike, until_closed  # noqa: E402

from vita_engine.client import Error, Refused, TurnEnd, connect  # noqa: E402
from vita_engine.serving import core  # noqa: E402

K = 3
SPEC = dict(model="tiny", device="cpu", replicas=2, sessions_per_replica=K, drain_timeout_s=20.0,
            # short answers keep the file fast (the tiny model rarely stops by itself)
            engine_options=dict(max_new_tokens=16, tts_max_tokens=24))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    from vita_engine.serving import ray as vr

    port = _free_port()
    saved = {k: os.environ.get(k) for k in (core.PROXY_CALLBACK_ENV, "RAY_DEDUP_LOGS")}
    os.environ[core.PROXY_CALLBACK_ENV] = core.PROXY_CALLBACK  # before ray.init: the proxy inherits it
    os.environ["RAY_DEDUP_LOGS"] = "0"
    startup_s = vr.start(SPEC, host="127.0.0.1", port=port, num_cpus=2, quiet=True)
    info = {"url": f"http://127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}/ws", "startup_s": startup_s, "vr": vr}
    try:
        yield info
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run(coro, timeout=90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def utterance(seed=0):
    x = speech_sample(("hello", "question")[seed % 2])
    if x is None:
        x = speechlike(1.2, seed=seed)
    return np.concatenate([np.zeros(1600, np.int16), x, np.zeros(int(1.2 * 16000), np.int16)])


async def turn(c, timeout=60.0):
    evs = []

    async def go():
        async for ev in c.events():
            evs.append(ev)
            if isinstance(ev, TurnEnd):
                return

    await asyncio.wait_for(go(), timeout)
    return evs


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_idle(cluster, timeout=15.0):
    """Until the replicas report no open session (the previous test's are closed)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = get_json(cluster["url"] + "/cluster")
        if len(v["replicas"]) == 2 and v["sessions_active"] == 0:
            time.sleep(0.3)  # the proxies' queue-length caches catch up too
            return v
        time.sleep(0.2)
    raise AssertionError(f"sessions still open: {v}")


def test_deploy_configs_are_valid_and_build_the_app():
    """deploy/ray-serve.yaml is a valid Serve config whose app builds with the admission options;
    the RayService's serveConfigV2 is the same config."""
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from vita_engine.serving import ray as vr

    root = Path(__file__).resolve().parents[1] / "deploy"
    cfg = yaml.safe_load((root / "ray-serve.yaml").read_text())
    ServeDeploySchema(**cfg)
    rs = yaml.safe_load((root / "kuberay-rayservice.yaml").read_text())
    assert rs["kind"] == "RayService" and yaml.safe_load(rs["spec"]["serveConfigV2"]) == cfg
    (app_cfg,) = cfg["applications"]
    assert app_cfg["import_path"] == "vita_engine.serving.ray:app"
    assert isinstance(vr.app(app_cfg["args"]), serve.Application)
    opts = vr.deployment_options(core.check_spec(app_cfg["args"]))
    assert opts["max_ongoing_requests"] == 16 + 4 and opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["autoscaling_config"]["min_replicas"] == 2 and opts["autoscaling_config"]["max_replicas"] == 8
    assert vr.app({"model": "tiny", "replicas": "2", "sessions_per_replica": "4"})  # `serve run ... k=v` strings
    with pytest.raises(ValueError, match="sessions_per_replica"):
        vr.app({"sessions_per_replica": 0})


def test_six_concurrent_sessions_complete_on_both_replicas(cluster):
    assert cluster["startup_s"] > 0

    async def one(i):
        async with connect(cluster["ws"]) as c:
            rep = c.ready.info["replica"]
            send = asyncio.create_task(c.stream_pcm(utterance(i), realtime=True))
            evs = await turn(c)
            await send
            return rep, evs, c.stats

    async def go():
        return await asyncio.gather(*(one(i) for i in range(6)))

    res = run(go(), timeout=100)
    reps = [r for r, _, _ in res]
    assert sorted(reps.count(r) for r in set(reps)) == [3, 3], reps  # least-loaded placement: K on each
    for rep, evs, stats in res:
        names = [type(e).__name__ for e in evs]
        assert names[-2:] == ["Metrics", "TurnEnd"] and "AudioChunk" in names, names
        assert stats["lost"] == 0 and stats["duplicates"] == 0 and stats["sample_gaps"] == 0
        assert evs[-2].values.get("ttfa_ms", -1) >= 0


def test_session_id_lands_on_its_replica(cluster):
    reps = [r["replica"] for r in wait_idle(cluster)["replicas"]]
    pool = [f"user-{i}" for i in range(64)]  # 3 ids owned by each replica (the ids are random per run)
    sids = [s for r in reps for s in [s for s in pool if core.owner(s, reps) == r][:3]]
    assert len(sids) == 6

    async def go():
        got = {}
        for sid in sids:
            for how in ("header", "query", "header"):  # reconnects: always the same replica
                if how == "header":
                    c = await connect(cluster["ws"], headers={"x-session-id": sid})
                else:
                    c = await connect(cluster["ws"] + f"?session={sid}")
                got.setdefault(sid, []).append(c.ready.info["replica"])
                await c.close()
        return got

    got = run(go())
    for sid in sids:
        assert got[sid] == [core.owner(sid, reps)] * 3, (sid, got[sid], reps)
    assert len({v[0] for v in got.values()}) == 2  # both replicas: the header decides, not the load


def test_capacity_is_refused_at_once_not_queued(cluster):
    wait_idle(cluster)

    async def go():
        held = [await connect(cluster["ws"]) for _ in range(2 * K)]
        t0 = time.monotonic()
        with pytest.raises(Refused) as e:
            await connect(cluster["ws"], timeout=20)
        dt = time.monotonic() - t0
        for c in held:
            await c.close()
        return [c.ready.info["replica"] for c in held], e.value, dt

    reps, refused, dt = run(go())
    assert sorted(reps.count(r) for r in set(reps)) == [K, K]
    assert refused.close_code == 1013 and refused.code == "capacity", refused
    assert dt < 5.0, dt  # about a round trip; generous for a loaded 2-core machine
    print(f"\nrefusal of session {2 * K + 1} (close 1013) after {dt * 1e3:.0f} ms")


def test_cluster_view_and_per_replica_metrics(cluster):
    v = wait_idle(cluster)
    assert [r["max_sessions"] for r in v["replicas"]] == [K, K] and v["capacity"] == 2 * K
    assert all(r["healthy"] and not r["draining"] for r in v["replicas"])
    with urllib.request.urlopen(cluster["url"] + "/cluster/metrics", timeout=10) as r:
        text = r.read().decode()
    for rep in v["replicas"]:
        assert f'vita_sessions_total{{replica="{rep["replica"]}"}}' in text
        assert f'vita_ttfa_seconds_count{{replica="{rep["replica"]}"}}' in text
    with urllib.request.urlopen(cluster["url"] + "/metrics", timeout=10) as r:  # one replica's own
        assert "vita_sessions_active" in r.read().decode()
    h = get_json(cluster["url"] + "/healthz")
    assert h["status"] == "ok" and h["replica"] in {r["replica"] for r in v["replicas"]}


def test_killed_replica_closes_its_sessions_others_finish_then_recovers(cluster):
    import ray

    vr = cluster["vr"]
    reps = [r["replica"] for r in wait_idle(cluster)["replicas"]]
    actors = vr.replica_actors()
    assert sorted(actors) == sorted(reps)

    async def go():
        cs = [await connect(cluster["ws"]) for _ in range(4)]
        by = {}
        for c in cs:
            by.setdefault(c.ready.info["replica"], []).append(c)
        assert sorted(len(v) for v in by.values()) == [2, 2], by
        victim, other = sorted(by)
        for c in cs:
            await c.send_text("tell me a long story")
        firsts = [await c.next_event(30) for c in by[victim]]  # the victim's turns are under way
        t_kill = time.monotonic()
        ray.kill(actors[victim], no_restart=True)
        lost = await asyncio.gather(*(until_closed(c, 20) for c in by[victim]))
        t_closed = time.monotonic() - t_kill
        finished = await asyncio.gather(*(turn(c) for c in by[other]))
        for c in by[other]:
            await c.close()
        # new sessions: at once on the survivor, and on a fresh replica once Serve replaced the victim
        first_new = await connect(cluster["ws"])
        await first_new.close()
        new_rep, t_recovered = None, None
        while time.monotonic() - t_kill < 60:
            c = await connect(cluster["ws"], headers={"x-session-id": f"after-{time.monotonic()}"})
            r = c.ready.info["replica"]
            await c.close()
            if r not in reps:
                new_rep, t_recovered = r, time.monotonic() - t_kill
                break
            await asyncio.sleep(0.5)
        return victim, other, firsts, by, lost, t_closed, finished, first_new, new_rep, t_recovered

    victim, other, firsts, by, lost, t_closed, finished, first_new, new_rep, t_recovered = run(go(), timeout=150)
    assert all(f is not None for f in firsts)
    for c, evs in zip(by[victim], lost):
        assert c.close_code == 1012, (c.close_code, c.close_reason, evs[-3:])
        assert [e.code for e in evs if isinstance(e, Error)] == ["replica_lost"]
    assert t_closed < 15.0, t_closed
    for evs in finished:
        assert [type(e).__name__ for e in evs][-2:] == ["Metrics", "TurnEnd"]
    assert first_new.ready.info["replica"] == other  # the survivor takes new sessions meanwhile
    assert new_rep is not None, "Serve did not replace the killed replica within 60 s"
    print(f"\nkilled replica: sessions closed in {t_closed:.2f} s, replaced (a session on the new replica) "
          f"in {t_recovered:.1f} s; startup of the 2-replica app {cluster['startup_s']:.1f} s")


def test_scale_down_drains_the_stopped_replica(cluster):
    """Redeploy with 1 replica: the replica Serve stops refuses nothing mid-turn: its session gets
    the turn's end, then `draining` and close 1012; the kept replica's session goes on."""
    from ray import serve

    vr = cluster["vr"]
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end:  # the previous test's replacement must be up
        v = get_json(cluster["url"] + "/cluster")
        if len(v["replicas"]) == 2 and v["sessions_active"] == 0:
            break
        time.sleep(0.5)

    async def go():
        a = await connect(cluster["ws"])
        b = await connect(cluster["ws"])
        assert a.ready.info["replica"] != b.ready.info["replica"]
        for c in (a, b):
            await c.send_text("a story please")
        for c in (a, b):
            assert await c.next_event(30) is not None
        loop = asyncio.get_running_loop()
        redeploy = loop.run_in_executor(None, lambda: serve.run(vr.build({**SPEC, "replicas": 1}), name=vr.APP_NAME,
                                                                 route_prefix="/"))
        wa, wb = asyncio.create_task(until_closed(a, 60)), asyncio.create_task(until_closed(b, 60))
        done, _ = await asyncio.wait({wa, wb}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        await redeploy
        assert len(done) == 1, "no session was drained"
        drained, kept, kept_waiter = (a, b, wb) if wa in done else (b, a, wa)
        await asyncio.sleep(1.0)
        assert not kept_waiter.done()  # the kept replica's session is still open ...
        kept_waiter.cancel()
        await asyncio.gather(kept_waiter, return_exceptions=True)
        await kept.send_text("and another")  # ... and takes another turn
        kept_turn = await turn(kept)
        await kept.close()
        return drained, done.pop().result(), kept_turn

    drained, evs, kept_turn = run(go(), timeout=120)
    names = [type(e).__name__ for e in evs]
    assert drained.close_code == 1012, (drained.close_code, names)
    assert "TurnEnd" in names and names.index("TurnEnd") < names.index("Error"), names  # its turn ended first
    assert [e.code for e in evs if isinstance(e, Error)] == ["draining"]
    assert [type(e).__name__ for e in kept_turn][-1] == "TurnEnd"

"""The Ray Serve path vs the plain server (bench/RESULTS.md, "Replicas on Ray Serve").

    PYTHONPATH=python python bench/ray_serve_bench.py [--turns 8] [--pings 200] [--json]

The tiny model on CPU, one turn at a time (the same utterance every turn, fed as fast as the
client can): the engine's ttfa_ms, the client-observed latency from the last input byte to the
first answer audio frame, and a ping/pong round trip (the per-message cost of the transport), via
`vita-engine serve` (uvicorn in this process) and via Ray Serve (2 replicas, K=3, the proxy in
between); then the startup time of the 2-replica app, the capacity (sessions per replica), and the
time to recover from a killed replica.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time

import numpy as np

from vita_engine.client import AudioChunk, Metrics, Refused, TurnEnd, connect

K = 3
ENGINE = dict(max_new_tokens=16, tts_max_tokens=24, cpu_threads=1)  # a replica has 1 CPU: the same for both


def utterance():
    from vita_engine.client import _resample_int16
    from vita_engine.data import load_sample

    x, sr = load_sample("question.wav")
    x = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    if sr != 16000:
        x = _resample_int16(x, sr, 16000)
    return np.concatenate([np.zeros(1600, np.int16), x, np.zeros(int(1.2 * 16000), np.int16)])


async def turns(url, n):
    """n turns, each on a new session: (engine ttfa_ms, client last-input -> first-audio ms)."""
    x = utterance()
    out = []
    for _ in range(n):
        async with connect(url) as c:
            await c.stream_pcm(x, realtime=False)
            t_sent = time.perf_counter()
            first, ttfa = None, None
            async for ev in c.events():
                if isinstance(ev, AudioChunk) and first is None:
                    first = (time.perf_counter() - t_sent) * 1e3
                elif isinstance(ev, Metrics):
                    ttfa = ev.values.get("ttfa_ms")
                elif isinstance(ev, TurnEnd):
                    break
            out.append((ttfa, first))
    return out


async def pings(url, n):
    async with connect(url) as c:
        rtt = []
        for i in range(n):
            t = time.perf_counter()
            await c.send_json({"type": "ping", "t": i})
            while True:
                raw = await c.ws.recv()
                if isinstance(raw, str) and json.loads(raw).get("type") == "pong":
                    break
            rtt.append((time.perf_counter() - t) * 1e3)
        return rtt


def med(v):
    v = [a for a in v if a is not None]
    return round(statistics.median(v), 2) if v else None


def measure(url, n_turns, n_pings):
    tt = asyncio.run(turns(url, n_turns))
    rtt = asyncio.run(pings(url, n_pings))
    return {"ttfa_ms_p50": med([a for a, _ in tt]), "client_first_audio_ms_p50": med([b for _, b in tt]),
            "ping_rtt_ms_p50": med(rtt), "turns": n_turns, "pings": n_pings}


PLAIN_SERVER = """
import sys
from vita_engine.runtime import Engine
from vita_engine.server import ServerConfig, create_app, serve
eng = Engine.from_pretrained("tiny", device="cpu", max_sessions={k}, **{engine!r})
serve(create_app(eng, ServerConfig(max_sessions={k})), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def plain(n_turns, n_pings):
    """`vita-engine serve` in its own process (as each replica is), the client here."""
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER.format(k=K, engine=ENGINE), str(port)])
    try:
        t_end = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > t_end or proc.poll() is not None:
                    raise RuntimeError("the plain server did not start")
                time.sleep(0.2)
        url = f"ws://127.0.0.1:{port}/ws"
        asyncio.run(turns(url, 1))  # warm-up
        return measure(url, n_turns, n_pings)
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_ray(n_turns, n_pings):
    import ray
    from ray import serve

    from vita_engine.serving import ray as vr

    port = _free_port()
    spec = dict(model="tiny", device="cpu", replicas=2, sessions_per_replica=K, engine_options=ENGINE)
    t0 = time.perf_counter()
    startup = vr.start(spec, port=port, num_cpus=2, quiet=True)
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        asyncio.run(turns(url, 2))  # warm-up (both replicas)
        res = measure(url, n_turns, n_pings)
        res["startup_s"] = round(startup, 1)

        async def capacity():
            held = []
            try:
                while len(held) < 10 * K:
                    t = time.perf_counter()
                    held.append(await connect(url))
            except Refused as e:
                res["refusal_ms"] = round((time.perf_counter() - t) * 1e3, 1)
                return len(held), e.close_code, len({c.ready.info["replica"] for c in held})
            finally:
                for c in held:
                    await c.close()

        n, code, nrep = asyncio.run(capacity())
        res.update(sessions_admitted=n, refusal_close_code=code, sessions_per_replica=n / max(1, nrep))
        time.sleep(2.0)
        before = set(vr.replica_actors())
        victim = sorted(before)[0]
        t_kill = time.monotonic()
        ray.kill(vr.replica_actors()[victim], no_restart=True)

        async def recovered():
            while time.monotonic() - t_kill < 120:
                c = await connect(url, headers={"x-session-id": f"probe-{time.monotonic()}"})
                r = c.ready.info["replica"]
                await c.close()
                if r not in before:
                    return time.monotonic() - t_kill
                await asyncio.sleep(0.25)

        res["recovery_s"] = round(asyncio.run(recovered()) or float("nan"), 1)
        res["total_s"] = round(time.perf_counter() - t0, 1)
        return res
    finally:
        serve.shutdown()
        ray.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    load0 = os.getloadavg()[0]
    res = {"plain": plain(a.turns, a.pings), "ray_serve": on_ray(a.turns, a.pings),
           "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if a.json:
        print(json.dumps(res, indent=1))
        return
    p, r = res["plain"], res["ray_serve"]
    print("| figure (tiny model, CPU, one session at a time) | plain server | Ray Serve (2 replicas) |")
    print("|---|---|---|")
    for key, label in (("ttfa_ms_p50", "engine ttfa_ms, median"),
                       ("client_first_audio_ms_p50", "client: last input byte -> first audio frame, ms, median"),
                       ("ping_rtt_ms_p50", "ping -> pong round trip, ms, median")):
        print(f"| {label} | {p[key]} | {r[key]} |")
    print(f"\nstartup of the 2-replica app (ray.init + serve.start + serve.run): {r['startup_s']} s; "
          f"admitted {r['sessions_admitted']} sessions ({r['sessions_per_replica']:g} per replica), then close "
          f"{r['refusal_close_code']} after {r.get('refusal_ms')} ms; killed replica replaced (a new session on it) after {r['recovery_s']} s; "
          f"load average (1 min) before/after: {res['loadavg_1min']}")


if __name__ == "__main__":
    main()

"""Time to first audio over `/ws` and over `/v1/realtime` (the official `openai` SDK) on the same
audio, same server, same engine: does the JSON/base64 path add latency?

The server runs in its own process. Each turn opens a fresh session on one endpoint (in turn: /ws at 16 kHz, /ws at 24 kHz, /v1/realtime
at its 24 kHz with the official SDK, and with a bare WebSocket client), streams the bundled question in real time (20 ms chunks) and 1.5 s of silence, and
records
  client_ms: from sending the question's last sample to receiving the first answer audio (this
             includes the VAD's end-of-turn silence, 500 ms, identical on both paths), and
  ttfa_ms:   the engine's own figure from the turn's Metrics (vita.metrics on /v1/realtime), and
  path_ms:   client_ms - ttfa_ms of the same turn: what the transport path (and the end-of-turn
             wait) adds on top of the engine; on a loaded machine the engine's time varies far more
             than the transport, and this difference cancels it turn by turn.
The median of each over the turns is printed (and --json writes all of it).

    PYTHONPATH=python python bench/realtime_vs_ws.py --turns 8 [--model tiny] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time

import numpy as np


def question_16k() -> np.ndarray:
    from vita_engine.data import load_sample

    x, sr = load_sample("question")
    x = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    if sr != 16000:
        from vita_engine.client import _resample_int16

        x = _resample_int16(x, sr, 16000)
    return x


async def _paced(chunks, send, sr: int) -> float:
    """Send the chunks in real time; -> perf_counter time at which the question's last sample went."""
    t0 = time.perf_counter()
    pos, t_last = 0, 0.0
    for pcm, voiced in chunks:
        lag = t0 + pos / sr - time.perf_counter()
        if lag > 0:
            await asyncio.sleep(lag)
        await send(pcm)
        pos += len(pcm)
        if voiced:
            t_last = time.perf_counter()
    return t_last


def _chunks(x: np.ndarray, sr: int, silence_s: float = 1.5, chunk_ms: float = 20.0):
    n = int(sr * chunk_ms / 1000)
    sil = np.zeros(int(sr * silence_s), np.int16)
    return [(x[i:i + n], True) for i in range(0, len(x), n)] + [(sil[i:i + n], False) for i in range(0, len(sil), n)]


async def turn_ws(url: str, x: np.ndarray, sr: int = 16000) -> dict:
    from vita_engine.client import AudioChunk, Metrics, TurnEnd, connect

    async with connect(url + "/ws", sample_rate=sr) as c:
        sender = asyncio.create_task(_paced(_chunks(x, sr), c.send_audio, sr))
        t_first, met = None, {}
        async for ev in c.events():
            if isinstance(ev, AudioChunk) and t_first is None:
                t_first = time.perf_counter()
            elif isinstance(ev, Metrics):
                met = ev.values
            elif isinstance(ev, TurnEnd):
                break
        t_last = await sender
    return _row(t_first, t_last, met)


async def turn_realtime_raw(url: str, x24: np.ndarray) -> dict:
    """The same over a bare WebSocket client (json + base64 only, no SDK event models)."""
    from websockets.asyncio.client import connect

    async with connect(url.replace("http", "ws") + "/v1/realtime?model=vita-1.5", max_size=None) as ws:
        async def send(pcm):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm.astype("<i2").tobytes()).decode()}))

        sender = asyncio.create_task(_paced(_chunks(x24, 24000), send, 24000))
        t_first, met = None, {}
        async for raw in ws:
            ev = json.loads(raw)
            if ev["type"] == "response.output_audio.delta" and t_first is None:
                t_first = time.perf_counter()
            elif ev["type"] == "vita.metrics":
                met = ev["values"]
                break
        t_last = await sender
    return _row(t_first, t_last, met)


def _row(t_first, t_last, met) -> dict:
    c = (t_first - t_last) * 1e3
    return {"client_ms": c, "ttfa_ms": met.get("ttfa_ms"), "path_ms": c - met.get("ttfa_ms", float("nan"))}


async def turn_realtime(url: str, x24: np.ndarray) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none")
    async with client.realtime.connect(model="vita-1.5") as conn:
        async def send(pcm):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm.astype("<i2").tobytes()).decode())

        sender = asyncio.create_task(_paced(_chunks(x24, 24000), send, 24000))
        t_first, met = None, {}
        async for ev in conn:
            if ev.type == "response.output_audio.delta" and t_first is None:
                t_first = time.perf_counter()
            elif ev.type == "vita.metrics":
                met = ev.values
                break
        t_last = await sender
    return _row(t_first, t_last, met)


_SERVER = """
import sys
from vita_engine.runtime import Engine
from vita_engine.server import ServerConfig, create_app, serve
eng = Engine.from_pretrained(sys.argv[1], device="cpu", max_new_tokens=24, tts_max_tokens=24)
serve(create_app(eng, ServerConfig()), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def _server_process(model: str):
    """The server in its own process (as in deployment: the clients' work does not share its GIL)."""
    import os
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-c", _SERVER, model, str(port)], env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return p, url
        except OSError:
            if p.poll() is not None:
                raise RuntimeError("the server process ended")
            time.sleep(0.1)
    p.kill()
    raise RuntimeError("the server did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=8, help="turns per endpoint (default 8)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--json", default=None, help="write every turn's figures here")
    a = ap.parse_args(argv)
    from vita_engine.client import _resample_int16

    x16 = question_16k()
    x24 = _resample_int16(x16, 16000, 24000)
    res = {"ws": [], "ws24": [], "realtime": [], "raw": []}
    proc, url = _server_process(a.model)
    try:
        asyncio.run(turn_ws(url.replace("http", "ws"), x16))  # warm-up (first-call costs)
        asyncio.run(turn_realtime(url, x24))
        for _ in range(a.turns):
            res["ws"].append(asyncio.run(turn_ws(url.replace("http", "ws"), x16)))
            res["ws24"].append(asyncio.run(turn_ws(url.replace("http", "ws"), x24, 24000)))
            res["realtime"].append(asyncio.run(turn_realtime(url, x24)))
            res["raw"].append(asyncio.run(turn_realtime_raw(url, x24)))
    finally:
        proc.terminate()
        proc.wait(10)
    out = {}
    for k, rows in res.items():
        out[k] = {m: round(statistics.median(r[m] for r in rows), 1) for m in ("client_ms", "ttfa_ms", "path_ms")}
        out[k]["n"] = len(rows)
    print(f"{'endpoint':<14}{'client_ms p50':>15}{'engine ttfa_ms p50':>20}{'path_ms p50':>13}  turns")
    names = {"ws": "/ws 16 kHz", "ws24": "/ws 24 kHz", "realtime": "realtime SDK", "raw": "realtime raw"}
    for k in names:
        print(f"{names[k]:<14}{out[k]['client_ms']:>15}{out[k]['ttfa_ms']:>20}"
              f"{out[k]['path_ms']:>13}  {out[k]['n']}")
    for m in ("client_ms", "path_ms"):
        print(f"{m} medians vs /ws 24 kHz: realtime SDK {out['realtime'][m] - out['ws24'][m]:+.1f} ms, "
              f"realtime raw {out['raw'][m] - out['ws24'][m]:+.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"median": out, "turns": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""WebRTC transport figures (issue 14), tiny model on CPU, loopback, one call/connection per turn:
- uplink one-way delay: microphone frame taken by the client's RTP sender -> the same frame's audio
  handed to the realtime handler (server), with aiortc's stock audio jitter buffer and with ours
  (server/webrtc/jitter.py); median / p90 over every frame of every turn;
- bit rates: Opus up (the aiortc client's encoder: aiortc's default, 96 kbit/s stereo) and down (ours),
  RTP payload and on the wire (+ RTP 12 + SRTP tag 10 + UDP 8 + IPv4 20 bytes per packet), against
  the PCM16 WebSocket (256 kbit/s up at 16 kHz, 384 kbit/s down at 24 kHz, payload; /v1/realtime's
  base64 PCM16 24 kHz: 512 kbit/s each way);
- response at the client on the same utterance over WebRTC, `/ws` and `/v1/realtime` (WebSocket, the
  same realtime handler as WebRTC), turns interleaved: end of the user's speech
  leaving the client -> first answer audio decoded at the client (the aiortc client uses the
  immediate jitter buffer too, so its own receive side adds no fixed 80 ms), and the engine's ttfa_ms.

    PYTHONPATH=python python bench/webrtc_transport.py --turns 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _server_helpers import running_server, speech_sample  # noqa: E402
from _webrtc_client import Client, mic_track  # noqa: E402

LEAD_S, TAIL_S = 0.2, 2.0
WIRE = 12 + 10 + 8 + 20  # RTP header + SRTP auth tag + UDP + IPv4, per packet


def utterance():
    x = speech_sample("question")
    return np.concatenate([np.zeros(int(LEAD_S * 16000), np.int16), x, np.zeros(int(TAIL_S * 16000), np.int16)]), \
        LEAD_S + x.size / 16000


def uplink_delays(sent, log):
    ls = np.array([s for _, s in log])
    lt = np.array([t for t, _ in log])
    out = []
    for t, s in sent:
        i = np.searchsorted(ls, s)
        if i < len(ls):
            out.append(lt[i] - t)
    return out


async def webrtc_turn(srv, pcm, speech_end_s):
    from vita_engine.server.webrtc import jitter

    c = Client(mic_track(pcm))
    await c.connect(srv.url)
    for t in c.pc.getTransceivers():  # the client's receive side: no fixed 80 ms either
        jitter.install(t.receiver)
    call = list(srv.vita.webrtc_calls.values())[0]
    t_conn = time.monotonic()
    await c.wait_for("response.done", timeout=120)
    met = await c.wait_for("vita.metrics", timeout=30)
    await c.wait_for("output_audio_buffer.stopped", timeout=60)
    await asyncio.sleep(0.2)
    dur = time.monotonic() - t_conn
    st = await c.stats()
    k_end = int(np.ceil(speech_end_s * 48000 / 960))
    t_speech_end = c.mic.sent[k_end - 1][0]
    first = next((t for t, x in c.frames if t > t_speech_end and np.abs(x).max() > 1e-3), None)
    out = call.out
    item = next(iter(out.first_written))
    res = {"server_write_to_send_ms": (out.first_sent[item] - out.first_written[item]) * 1e3,
           "server_send_to_client_ms": (first - out.first_sent[item]) * 1e3 if first else None,
           "speech_end_to_server_write_ms": (out.first_written[item] - t_speech_end) * 1e3,"uplink_ms": [d * 1e3 for d in uplink_delays(c.mic.sent, call.mic.log)],
           "client_response_ms": (first - t_speech_end) * 1e3 if first else None,
           "ttfa_ms": met["values"].get("ttfa_ms"),
           "up_payload_kbps": st["outbound-rtp"].bytesSent * 8 / dur / 1e3,
           "up_wire_kbps": (st["outbound-rtp"].bytesSent + WIRE * st["outbound-rtp"].packetsSent) * 8 / dur / 1e3,
           "down_payload_kbps": out.bytes * 8 / (out.packets * 0.02) / 1e3,
           "down_answer_payload_kbps": out.audio_bytes * 8 / max(1, out.audio_packets) / 0.02 / 1e3,
           "down_wire_kbps": (out.bytes + WIRE * out.packets) * 8 / (out.packets * 0.02) / 1e3}
    await c.close()
    t_end = time.monotonic() + 10
    while srv.vita.webrtc_calls and time.monotonic() < t_end:
        await asyncio.sleep(0.05)
    return res


async def ws_turn(srv, pcm, speech_end_s):
    from vita_engine.client import AudioChunk, Metrics, TurnEnd, connect

    async with connect(srv.ws_url) as c:
        n = 320  # 20 ms chunks at 16 kHz, paced as the WebRTC microphone
        t0 = time.monotonic()
        k_end = int(np.ceil(speech_end_s * 16000 / n))
        marks = {}

        async def send():
            for k, i in enumerate(range(0, pcm.size, n)):
                d = t0 + k * 0.02 - time.monotonic()
                if d > 0:
                    await asyncio.sleep(d)
                await c.send_audio(pcm[i:i + n])
                if k == k_end - 1:
                    marks["speech_end"] = time.monotonic()

        sender = asyncio.ensure_future(send())
        first, ttfa = None, None
        async for ev in c.events():
            if isinstance(ev, AudioChunk) and first is None and "speech_end" in marks:
                first = time.monotonic()
            elif isinstance(ev, Metrics):
                ttfa = ev.values.get("ttfa_ms")
            elif isinstance(ev, TurnEnd):
                break
        sender.cancel()
        return {"client_response_ms": (first - marks["speech_end"]) * 1e3 if first else None, "ttfa_ms": ttfa}


async def realtime_ws_turn(srv, pcm, speech_end_s):
    """The same turn over the /v1/realtime WebSocket (the same RealtimeHandler as WebRTC, audio as
    base64 PCM16 24 kHz events): separates the transport from the handler in the comparison."""
    import base64

    import soxr
    import websockets

    x24 = np.round(np.clip(soxr.resample(pcm.astype(np.float32) / 32768, 16000, 24000), -1, 1) * 32767).astype("<i2")
    url = f"ws://{srv.host}:{srv.port}/v1/realtime?model=vita-1.5"
    async with websockets.connect(url, max_size=None) as ws:
        n = 480  # 20 ms at 24 kHz
        k_end = int(np.ceil(speech_end_s * 24000 / n))
        marks = {}
        t0 = time.monotonic()

        async def send():
            for k, i in enumerate(range(0, x24.size, n)):
                d = t0 + k * 0.02 - time.monotonic()
                if d > 0:
                    await asyncio.sleep(d)
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(x24[i:i + n].tobytes()).decode()}))
                if k == k_end - 1:
                    marks["speech_end"] = time.monotonic()

        sender = asyncio.ensure_future(send())
        first = ttfa = None
        async for msg in ws:
            ev = json.loads(msg)
            if ev["type"] == "response.output_audio.delta" and first is None and "speech_end" in marks:
                first = time.monotonic()
            elif ev["type"] == "vita.metrics":
                ttfa = ev["values"].get("ttfa_ms")
                break
        sender.cancel()
        return {"client_response_ms": (first - marks["speech_end"]) * 1e3 if first else None, "ttfa_ms": ttfa}


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(float(np.median(xs)), 1) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    import torch

    from vita_engine.runtime import Engine

    torch.set_num_threads(1)
    eng = Engine.from_pretrained("tiny", device="cpu", max_new_tokens=24, tts_max_tokens=24)
    pcm, speech_end = utterance()
    report = {}
    rs = {"stock": [], "immediate": [], "ws": [], "realtime_ws": []}
    try:
        # the three set-ups side by side on one engine, turns interleaved: machine load drifts
        with running_server(eng, ice_hosts=("127.0.0.1",), webrtc_low_delay_jitter=False, webrtc_uplink_log=100000) as s_stock, \
                running_server(eng, ice_hosts=("127.0.0.1",), webrtc_uplink_log=100000) as s_imm, \
                running_server(eng) as s_ws:
            for i in range(a.turns):
                rs["stock"].append(asyncio.run(webrtc_turn(s_stock, pcm, speech_end)))
                rs["immediate"].append(asyncio.run(webrtc_turn(s_imm, pcm, speech_end)))
                rs["ws"].append(asyncio.run(ws_turn(s_ws, pcm, speech_end)))
                rs["realtime_ws"].append(asyncio.run(realtime_ws_turn(s_ws, pcm, speech_end)))
                print(i, {k: round(v[-1]["client_response_ms"] or -1, 1) for k, v in rs.items()}, flush=True)
    finally:
        eng.close()
    for name in ("stock", "immediate"):
        r_ = rs[name]
        up = sum((r["uplink_ms"] for r in r_), [])
        report[f"webrtc_{name}"] = {
            "uplink_ms_median": med(up), "uplink_ms_p90": round(float(np.percentile(up, 90)), 1),
            "client_response_ms_median": med([r["client_response_ms"] for r in r_]),
            "ttfa_ms_median": med([r["ttfa_ms"] for r in r_]),
            **{k + "_median": med([r[k] for r in r_]) for k in ("speech_end_to_server_write_ms", "server_write_to_send_ms",
                                                                "server_send_to_client_ms")},
            **{k: med([r[k] for r in r_]) for k in ("up_payload_kbps", "up_wire_kbps", "down_payload_kbps",
                                                     "down_answer_payload_kbps", "down_wire_kbps")}}
    report["ws"] = {"client_response_ms_median": med([r["client_response_ms"] for r in rs["ws"]]),
                    "ttfa_ms_median": med([r["ttfa_ms"] for r in rs["ws"]]),
                    "up_payload_kbps": 256.0, "down_payload_kbps": 384.0}
    report["realtime_ws"] = {"client_response_ms_median": med([r["client_response_ms"] for r in rs["realtime_ws"]]),
                             "ttfa_ms_median": med([r["ttfa_ms"] for r in rs["realtime_ws"]]),
                             "up_payload_kbps": 384.0 * 4 / 3, "down_payload_kbps": 384.0 * 4 / 3}
    report["turns"] = a.turns
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

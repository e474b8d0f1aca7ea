"""WebRTC transport figures (issue 14), tiny model on CPU, loopback, one call/connection per turn:
- uplink one-way delay: microphone frame taken by the client's RTP sender -> the same frame's audio
  handed to the realtime handler (server), with aiortc's stock audio jitter buffer and with ours
  (server/webrtc/jitter.py); median / p90 over every frame of every turn;
- bit rates: Opus up (the aiortc client's encoder: aiortc's default, 96 kbit/s stereo) and down (ours),
  RTP payload and on the wire (+ RTP 12 + SRTP tag 10 + UDP 8 + IPv4 20 bytes per packet), against
  the PCM16 WebSocket (256 kbit/s up at 16 kHz, 384 kbit/s down at 24 kHz, payload);
- response at the client on the same utterance over WebRTC and over `/ws`: end of the user's speech
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
    try:
        for name, low in (("stock", False), ("immediate", True)):
            with running_server(eng, ice_hosts=("127.0.0.1",), webrtc_low_delay_jitter=low, webrtc_uplink_log=100000) as srv:
                rs = [asyncio.run(webrtc_turn(srv, pcm, speech_end)) for _ in range(a.turns)]
            up = sum((r["uplink_ms"] for r in rs), [])
            report[f"webrtc_{name}"] = {
                "uplink_ms_median": med(up), "uplink_ms_p90": round(float(np.percentile(up, 90)), 1),
                "client_response_ms_median": med([r["client_response_ms"] for r in rs]),
                "ttfa_ms_median": med([r["ttfa_ms"] for r in rs]),
                **{k + "_median": med([r[k] for r in rs]) for k in ("speech_end_to_server_write_ms", "server_write_to_send_ms",
                                                                    "server_send_to_client_ms")},
                **{k: med([r[k] for r in rs]) for k in ("up_payload_kbps", "up_wire_kbps", "down_payload_kbps",
                                                         "down_answer_payload_kbps", "down_wire_kbps")}}
            print(name, report[f"webrtc_{name}"], flush=True)
        with running_server(eng) as srv:
            rs = [asyncio.run(ws_turn(srv, pcm, speech_end)) for _ in range(a.turns)]
        report["ws"] = {"client_response_ms_median": med([r["client_response_ms"] for r in rs]),
                        "ttfa_ms_median": med([r["ttfa_ms"] for r in rs]),
                        "up_payload_kbps": 256.0, "down_payload_kbps": 384.0}
        print("ws", report["ws"], flush=True)
    finally:
        eng.close()
    report["turns"] = a.turns
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

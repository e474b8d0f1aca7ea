"""The WebRTC transport (POST /v1/realtime/calls, server/webrtc/) on loopback with the tiny engine:
an aiortc client sends a bundled WAV as its microphone (ICE host 127.0.0.1 on both sides) and gets a
complete spoken answer (Realtime-API events on `oai-events`, Opus audio on the track, no gaps);
barge-in mid-answer drops the queued audio and truncates the history to what was played; a peer
that never completes ICE, or stops sending RTP, is closed and its KV pages are freed; signalling
errors; and the plain server without aiortc answers 501 with the install hint."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("aiortc")
pytest.importorskip("av")

from _server_helpers import kv_free, load_engine, run, running_server, speech_sample, speechlike  # noqa: E402
from _webrtc_client import Client, mic_track, post_offer  # noqa: E402

LOOP = {"ice_hosts": ("127.0.0.1",)}


@pytest.fixture(scope="module")
def engine():
    eng, real = load_engine()
    if not real:
        pytest.skip("vita_engine.runtime is not available")
    yield eng
    eng.close()


def utterance(name: str = "question", silence_s: float = 0.0) -> np.ndarray:
    x = speech_sample(name)
    if x is None:
        x = speechlike(1.5)
    return np.concatenate([np.zeros(3200, np.int16), x, np.zeros(int(silence_s * 16000), np.int16)])


async def _settle(srv, timeout: float = 10.0) -> None:
    """Until the server has no call left (bounded)."""
    t_end = time.monotonic() + timeout
    while srv.vita.webrtc_calls and time.monotonic() < t_end:
        await asyncio.sleep(0.05)
    assert not srv.vita.webrtc_calls, srv.vita.webrtc_calls


def _server_call(srv):
    calls = list(srv.vita.webrtc_calls.values())
    assert len(calls) == 1, calls
    return calls[0]


def _silent_runs(x: np.ndarray, frame: int = 960, thr: float = 1e-4) -> int:
    """Longest run of (near-)silent 20 ms frames inside [first, last] non-silent frame."""
    n = x.size // frame
    loud = np.abs(x[: n * frame].reshape(n, frame)).max(axis=1) > thr
    idx = np.flatnonzero(loud)
    if idx.size == 0:
        return -1
    best = run_ = 0
    for v in loud[idx[0]: idx[-1] + 1]:
        run_ = 0 if v else run_ + 1
        best = max(best, run_)
    return best


def test_spoken_turn_over_webrtc(engine):
    """The whole answer goes out, paced, without a gap, and arrives whole. On a loaded 2-core CI
    machine the tiny engine may produce audio at about real time, and an engine that falls behind
    the playback is heard as a gap whatever the transport: a start buffer longer than the answer
    (webrtc_prebuffer_ms) keeps this test about the transport (queue, pacing, Opus, RTP)."""
    base = kv_free(engine)
    with running_server(engine, webrtc_prebuffer_ms=3000.0, **LOOP) as srv:
        async def go():
            c = Client(mic_track(utterance()), session={"type": "realtime", "instructions": "Answer briefly."})
            await c.connect(srv.url)
            assert c.location and c.location.startswith("/v1/realtime/calls/rtc_")
            created = await c.wait_for("session.created")
            assert created["session"]["instructions"] == "Answer briefly.", created
            call = _server_call(srv)
            done = await c.wait_for("response.done", timeout=90)
            await c.wait_for("output_audio_buffer.stopped", timeout=30)
            await asyncio.sleep(0.3)  # the last packets' flight
            st = await c.stats()
            out = call.out
            res = dict(types=c.types(), done=done, audio=c.audio(), sent=dict(out.sent_samples), gaps=out.gaps,
                       packets=out.packets, inbound=st["inbound-rtp"], low=call.low_delay)
            await c.close()
            await _settle(srv)
            return res

        r = run(go(), timeout=150)
    t = r["types"]
    for name in ("session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created", "output_audio_buffer.started",
                 "response.output_audio_transcript.delta", "response.done", "output_audio_buffer.stopped"):
        assert name in t, (name, t)
    assert t.index("input_audio_buffer.speech_stopped") < t.index("response.created") < t.index("response.done")
    assert "response.output_audio.delta" not in t  # over WebRTC the audio rides on the track
    assert r["done"]["response"]["status"] == "completed", r["done"]
    # the answer's audio: sent whole, without a gap, and received whole (no packet lost)
    assert len(r["sent"]) == 1 and r["gaps"] == 0, r
    sent_s = sum(r["sent"].values()) / 24000
    assert sent_s > 0.2, sent_s
    assert r["inbound"].packetsLost == 0 and r["inbound"].packetsReceived >= r["packets"] - 5, (r["inbound"], r["packets"])
    x = r["audio"]
    n = x.size // 960
    peak = np.abs(x[: n * 960].reshape(n, 960)).max(axis=1)
    thr = 0.05 * np.median(peak[peak > 1e-3])  # -26 dB under the answer: Opus rings out for a frame or two
    loud = peak > thr
    heard_s = (np.flatnonzero(loud)[-1] - np.flatnonzero(loud)[0] + 1) * 0.02
    print(f"\nwebrtc turn: {sent_s:.2f} s of answer sent, {heard_s:.2f} s heard, {r['packets']} packets,",
          f"events: {len(t)}")
    assert abs(heard_s - sent_s) < 0.1, (heard_s, sent_s)
    assert _silent_runs(x, thr=thr) <= 1, _silent_runs(x, thr=thr)  # no gap inside the answer
    assert r["low"]
    assert kv_free(engine) == base


def test_barge_in_truncates_history(engine):
    """Speech while the answer plays: the server's VAD interrupts, the queued audio is dropped at
    once (output_audio_buffer.cleared), the assistant item is truncated to the audio played."""
    base = kv_free(engine)
    with running_server(engine, **LOOP) as srv:
        async def go():
            c = Client(mic_track(utterance("hello")))
            await c.connect(srv.url)
            call = _server_call(srv)
            # what the handler tells the engine was played: the history is trimmed there
            # (Session.truncate_answer once the turn has ended; playback_position if a handler
            # sets it during the turn)
            positions = []
            sess = call.handler.session
            pp, ta = sess.playback_position, sess.truncate_answer
            sess.playback_position = lambda s: (positions.append(("during", s)), pp(s))[1]
            sess.truncate_answer = lambda turn, s: (positions.append(("after", s)), ta(turn, s))[1]
            await c.wait_for("output_audio_buffer.started", timeout=90)
            n0 = len(c.events)
            c.mic.play(utterance("question"))
            cleared = await c.wait_for("output_audio_buffer.cleared", timeout=30, since=n0)
            after = call.out.queued
            trunc = await c.wait_for("conversation.item.truncated", timeout=30, since=n0)
            sent_then = call.out.sent_samples[trunc["item_id"]]
            await c.wait_for("input_audio_buffer.speech_started", timeout=30, since=n0)
            done = await c.wait_for(lambda e: e["type"] == "response.done"
                                    and e["response"]["output"][0]["id"] == trunc["item_id"], timeout=30)
            st = sess._state.stats  # the scheduler applied the trim (runtime-internal counter)
            t_end = time.monotonic() + 5
            while not st.get("truncations") and time.monotonic() < t_end:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            played = call.out.sent_samples
            res = dict(types=c.types(), cleared=cleared, trunc=trunc, done=done, played=dict(played),
                       after=after, pos=list(positions), sent_then=sent_then, truncations=st.get("truncations", 0))
            await c.close()
            await _settle(srv)
            return res

        r = run(go(), timeout=150)
    t = r["types"]
    i0 = t.index("output_audio_buffer.started")
    assert i0 < t.index("output_audio_buffer.cleared") < t.index("input_audio_buffer.speech_started", i0)
    st = r["done"]["response"]["status"]
    item = r["trunc"]["item_id"]
    played_ms = r["played"][item] * 1000 / 24000  # everything of it that went out
    assert r["played"][item] == r["sent_then"]  # nothing more of it after the barge-in
    assert abs(r["trunc"]["audio_end_ms"] - played_ms) <= 1, (r["trunc"], played_ms)
    assert 0 < played_ms, played_ms
    assert r["pos"], r
    assert all(abs(pos * 1000 - played_ms) <= 1 for _, pos in r["pos"]), (r["pos"], played_ms)
    assert st in ("completed", "cancelled"), st  # (the engine may have finished generating it already)
    assert r["after"] == 0  # nothing of the interrupted answer left to send
    assert r["truncations"] >= 1, r["truncations"]
    print(f"\nbarge-in: {played_ms:.0f} ms of the answer played, history trimmed there ({st}, {r['pos']})")
    assert kv_free(engine) == base


def test_peer_that_vanishes_is_closed_and_frees_pages(engine):
    """A peer that stops sending RTP (its microphone track never yields again) is closed after
    webrtc_media_timeout_s; one that never completes ICE after webrtc_connect_timeout_s. Both free
    their KV pages and their session slot."""
    base = kv_free(engine)
    with running_server(engine, webrtc_media_timeout_s=1.0, webrtc_connect_timeout_s=1.5, **LOOP) as srv:
        async def go():
            mic = mic_track(speechlike(0.6))
            c = Client(mic)
            await c.connect(srv.url)
            await asyncio.sleep(0.8)
            held = kv_free(engine)
            orig = mic.recv

            async def never():
                await asyncio.sleep(3600)
            mic.recv = never  # the RTP stops; ICE and DTLS stay up
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            err = await c.wait_for("error", timeout=10)
            await _settle(srv)
            took = time.monotonic() - t0
            mic.recv = orig
            await c.close()
            # an offer whose answer is never applied: ICE never completes
            from aiortc import RTCPeerConnection

            from vita_engine.server.webrtc import ice
            pc = RTCPeerConnection(ice.rtc_configuration(()))
            pc.addTransceiver("audio")
            pc.createDataChannel("oai-events")
            with ice.host_addresses(["127.0.0.1"]):
                await pc.setLocalDescription(await pc.createOffer())
            status, _, _ = await asyncio.to_thread(post_offer, srv.url, pc.localDescription.sdp)
            assert status == 201
            assert srv.vita.active == 1
            t1 = time.monotonic()
            await _settle(srv)
            took2 = time.monotonic() - t1
            await pc.close()
            return held, err, took, took2, srv.vita.active

        held, err, took, took2, active = run(go(), timeout=60)
    assert held != base  # the call held (reserved) pages
    assert err["error"]["code"] == "media_timeout", err
    assert took < 5 and took2 < 5, (took, took2)
    assert active == 0 and kv_free(engine) == base


def test_server_shutdown_ends_calls(engine):
    """Stopping the server ends its WebRTC calls: an error event (server_shutdown), pages freed."""
    base = kv_free(engine)
    with running_server(engine, **LOOP) as srv:
        async def go():
            c = Client(mic_track(speechlike(0.5)))
            await c.connect(srv.url)
            await c.wait_for("session.created")
            await asyncio.to_thread(srv.stop)
            err = await c.wait_for("error", timeout=10)
            await c.close()
            return err, dict(srv.vita.webrtc_calls)

        err, left = run(go(), timeout=60)
    assert err["error"]["code"] == "server_shutdown" and not left, (err, left)
    assert kv_free(engine) == base


def test_drain_ends_calls_between_turns(engine):
    """VitaServer.drain() (a replica being stopped): an idle call gets an error (draining) and is
    hung up, a new offer is refused with 503 while draining, the pages are freed."""
    base = kv_free(engine)
    with running_server(engine, **LOOP) as srv:
        async def go():
            c = Client(mic_track(speechlike(0.3)))
            await c.connect(srv.url)
            await c.wait_for("session.created")
            loop = _server_call(srv)._tasks[0].get_loop()
            fut = asyncio.run_coroutine_threadsafe(srv.vita.drain(grace_s=5.0), loop)
            err = await c.wait_for("error", timeout=10)
            await asyncio.wrap_future(fut)
            status, _, body = await asyncio.to_thread(post_offer, srv.url, c.pc.localDescription.sdp)
            await c.close()
            return err, status, body, dict(srv.vita.webrtc_calls)

        err, status, body, left = run(go(), timeout=60)
    assert err["error"]["code"] == "draining" and not left, (err, left)
    assert status == 503 and "draining" in body, (status, body)
    assert kv_free(engine) == base


def test_signalling_errors(engine):
    """Bad token -> 401, no SDP part / not SDP -> 400, at capacity -> 503; raw application/sdp works
    and hang-up ends the call (pages freed)."""
    base = kv_free(engine)
    with running_server(engine, token="s3cret", max_sessions=1, **LOOP) as srv:
        async def go():
            from aiortc import RTCPeerConnection

            from vita_engine.server.webrtc import ice
            pc = RTCPeerConnection(ice.rtc_configuration(()))
            pc.addTransceiver("audio")
            pc.createDataChannel("oai-events")
            with ice.host_addresses(["127.0.0.1"]):
                await pc.setLocalDescription(await pc.createOffer())
            sdp = pc.localDescription.sdp
            out = {"no_token": await asyncio.to_thread(post_offer, srv.url, sdp),
                   "bad_token": await asyncio.to_thread(post_offer, srv.url, sdp, "nope"),
                   "not_sdp": await asyncio.to_thread(post_offer, srv.url, "hello", "s3cret"),
                   "ok": await asyncio.to_thread(post_offer, srv.url, sdp, "s3cret", None, False)}
            out["busy"] = await asyncio.to_thread(post_offer, srv.url, sdp, "s3cret")
            out["bad_session"] = await asyncio.to_thread(post_offer, srv.url, sdp, "s3cret", [1])
            loc = out["ok"][1]["location"]
            import urllib.request

            def hang(tok):
                req = urllib.request.Request(srv.url + loc + "/hangup", data=b"", method="POST",
                                             headers={"Authorization": f"Bearer {tok}"})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        return r.status
                except urllib.error.HTTPError as e:
                    return e.code
            out["hang_bad"] = await asyncio.to_thread(hang, "nope")
            out["hang"] = await asyncio.to_thread(hang, "s3cret")
            out["hang_again"] = await asyncio.to_thread(hang, "s3cret")
            out["active"] = srv.vita.active
            await pc.close()
            return out

        o = run(go(), timeout=60)
    assert o["no_token"][0] == 401 and o["bad_token"][0] == 401
    assert o["no_token"][2].find("invalid_api_key") > 0
    assert o["not_sdp"][0] == 400 and "sdp" in o["not_sdp"][2]
    assert o["ok"][0] == 201 and o["ok"][1]["content-type"].startswith("application/sdp") and o["ok"][2].startswith("v=0")
    assert o["busy"][0] == 503 and "busy" in o["busy"][2]
    assert o["bad_session"][0] == 400 and "session" in o["bad_session"][2]
    assert (o["hang_bad"], o["hang"], o["hang_again"]) == (401, 200, 404)
    assert o["active"] == 0 and kv_free(engine) == base


NO_AIORTC = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aiortc", "av", "aioice"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import json, urllib.request
from vita_engine.server import BackgroundServer, create_app
with BackgroundServer(create_app(object())) as srv:
    req = urllib.request.Request(srv.url + "/v1/realtime/calls", data=b"v=0\\r\\n", method="POST",
                                 headers={"Content-Type": "application/sdp"})
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        print(e.code, json.loads(e.read())["error"]["message"])
assert not any(m.split(".")[0] in ("aiortc", "av", "aioice") for m in sys.modules)
"""


def test_plain_server_without_aiortc_answers_501():
    import vita_engine

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(vita_engine.__file__).parents[1]),
                                                     os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", NO_AIORTC], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("501 ") and 'pip install "vita-engine[webrtc]"' in r.stdout, r.stdout


def test_serve_checks_ice_options(capsys):
    """--ice-host takes IP addresses, --ice-server stun:/turn: URLs: a bad one is a one-line usage
    error naming the option, before any model loads."""
    from vita_engine.cli import main

    for args, what in ((["--ice-host", "localhost"], "IP address"), (["--ice-server", "http://x"], "stun:")):
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and args[0] in err and what in err, err

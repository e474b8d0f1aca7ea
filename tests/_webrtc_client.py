"""An aiortc client for the WebRTC tests and bench: a WAV as the microphone (paced to real time,
then silence), the `oai-events` data channel, the answer's audio collected, ICE on 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import fractions
import json
import time
import urllib.request
import uuid

import numpy as np


def _aiortc():
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    return RTCPeerConnection, RTCSessionDescription, MediaStreamError, MediaStreamTrack


def mic_track(pcm16k_int16: np.ndarray, loop_silence: bool = True):
    """A MediaStreamTrack that plays `pcm16k_int16` (16 kHz) as 48 kHz s16 mono 20 ms frames in
    real time, then silence; `.sent` holds (monotonic time, 48 kHz samples so far) per frame, the
    moment aiortc's sender took it (the "microphone frame in" of the uplink delay). `.play(x)`
    queues more audio."""
    _, _, MediaStreamError, MediaStreamTrack = _aiortc()
    import av
    import soxr

    class Mic(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.buf = np.zeros(0, np.int16)
            self.t0 = None
            self.n = 0
            self.sent = []
            self.speech_end_t = None  # when the last queued sample was sent
            self.play(pcm16k_int16)

        def play(self, x16k):
            y = soxr.resample(np.asarray(x16k, np.float32) / 32768, 16000, 48000)
            self.buf = np.concatenate([self.buf, np.round(np.clip(y, -1, 1) * 32767).astype(np.int16)])
            self.speech_end_t = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self.t0 is None:
                self.t0 = time.monotonic()
            else:
                wait = self.t0 + self.n * 0.02 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            x = self.buf[:960]
            self.buf = self.buf[960:]
            if x.size < 960:
                if x.size and self.speech_end_t is None:
                    self.speech_end_t = time.monotonic()
                x = np.concatenate([x, np.zeros(960 - x.size, np.int16)])
            elif not self.buf.size and self.speech_end_t is None:
                self.speech_end_t = time.monotonic()
            f = av.AudioFrame.from_ndarray(x[None, :], format="s16", layout="mono")
            f.sample_rate = 48000
            f.pts = self.n * 960
            f.time_base = fractions.Fraction(1, 48000)
            self.n += 1
            self.sent.append((time.monotonic(), self.n * 960))
            return f

    return Mic()


class Client:
    """One call: `await c.connect(url)`, then `c.events` (received, in order), `c.send(ev)`,
    `await c.wait_for(type)`, `c.audio()` (the answer's 48 kHz mono float32 so far), `await c.close()`."""

    def __init__(self, mic, token=None, session=None, hosts=("127.0.0.1",)):
        self.mic, self.token, self.session, self.hosts = mic, token, session, hosts
        self.events, self.frames, self._waiters = [], [], []
        self.pc = self.channel = None
        self.location = None
        self.first_audio_t = None

    async def connect(self, base_url: str, multipart: bool = True, timeout: float = 15.0):
        from vita_engine.server.webrtc import ice

        RTCPeerConnection, RTCSessionDescription, _, _ = _aiortc()
        self.pc = RTCPeerConnection(ice.rtc_configuration(()))
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        opened = asyncio.Event()
        self.channel.on("open", opened.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", lambda tr: asyncio.ensure_future(self._read(tr)))
        with ice.host_addresses(self.hosts):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        status, headers, body = await asyncio.to_thread(post_offer, base_url, self.pc.localDescription.sdp,
                                                         self.token, self.session, multipart)
        if status != 201:
            raise RuntimeError(f"POST /v1/realtime/calls -> {status}: {body}")
        self.location = headers.get("location")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        await asyncio.wait_for(opened.wait(), timeout)
        return self

    def _on_message(self, msg):
        ev = json.loads(msg)
        ev["_t"] = time.monotonic()
        self.events.append(ev)
        for w in list(self._waiters):
            if w[0](ev):
                self._waiters.remove(w)
                w[1].set_result(ev)

    async def _read(self, track):
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            x = f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0].astype(np.float32) / 32768
            if self.first_audio_t is None and np.abs(x).max() > 1e-3:
                self.first_audio_t = time.monotonic()
            self.frames.append((time.monotonic(), x))

    def send(self, ev: dict):
        ev.setdefault("event_id", "evt_" + uuid.uuid4().hex[:12])
        self.channel.send(json.dumps(ev))

    async def wait_for(self, pred, timeout: float = 30.0, since: int = 0):
        """The first event (from index `since`) for which pred(ev) (or ev["type"] == pred) holds."""
        p = (lambda ev: ev["type"] == pred) if isinstance(pred, str) else pred
        for ev in self.events[since:]:
            if p(ev):
                return ev
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((p, fut))
        return await asyncio.wait_for(fut, timeout)

    def types(self):
        return [e["type"] for e in self.events]

    def audio(self, since_t: float = 0.0) -> np.ndarray:
        xs = [x for t, x in self.frames if t >= since_t]
        return np.concatenate(xs) if xs else np.zeros(0, np.float32)

    async def stats(self):
        rep = await self.pc.getStats()
        return {s.type: s for s in rep.values()}

    async def close(self):
        if self.pc is not None:
            await self.pc.close()


def post_offer(base_url, sdp, token=None, session=None, multipart=True):
    """POST /v1/realtime/calls -> (status, headers, body text)."""
    if multipart:
        b = "vita" + uuid.uuid4().hex
        parts = [f'--{b}\r\nContent-Disposition: form-data; name="sdp"\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n']
        if session is not None:
            parts.append(f'--{b}\r\nContent-Disposition: form-data; name="session"\r\n'
                         f'Content-Type: application/json\r\n\r\n{json.dumps(session)}\r\n')
        data = ("".join(parts) + f"--{b}--\r\n").encode()
        ct = f"multipart/form-data; boundary={b}"
    else:
        data, ct = sdp.encode(), "application/sdp"
    req = urllib.request.Request(base_url + "/v1/realtime/calls", data=data, method="POST", headers={"Content-Type": ct})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()

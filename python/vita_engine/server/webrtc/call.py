"""One WebRTC call: the peer connection, its media (tracks.py), the `oai-events` data channel and
the realtime handler that serves it (the same one as the `/v1/realtime` WebSocket), with the
limits: ICE must complete within `webrtc_connect_timeout_s`, RTP must keep coming
(`webrtc_media_timeout_s`), and `max_session_s` as everywhere."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Optional

from aiortc import RTCPeerConnection, RTCSessionDescription

from . import ice, jitter
from .tracks import MicInput, OpusOutTrack

log = logging.getLogger("vita_engine.server.webrtc")
CHANNEL = "oai-events"
MAX_PENDING = 1000  # events held until the data channel opens (session.created, ...)
MAX_CHANNEL_BUFFER = 4 << 20  # bytes queued on the data channel: beyond, the peer does not read


class Call:
    def __init__(self, server, session: Optional[dict] = None) -> None:
        self.srv, self.cfg = server, server.config
        self.id = "rtc_" + uuid.uuid4().hex[:24]
        self.t0 = time.monotonic()
        self.last_rx = self.t0  # last data-channel message
        self.pc = RTCPeerConnection(ice.rtc_configuration(self.cfg.ice_servers))
        self.out = OpusOutTrack(bitrate=self.cfg.webrtc_opus_bitrate, prebuffer_ms=self.cfg.webrtc_prebuffer_ms)
        self.mic: Optional[MicInput] = None
        self.channel = None
        self.pending: list = []
        self.started = False
        self.closed = self._closing = False
        self.close_reason = ""
        self.connected_at: Optional[float] = None
        self.low_delay = bool(getattr(self.cfg, "webrtc_low_delay_jitter", True))
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._tasks: list = []
        self._done = asyncio.Event()
        from ..realtime.handler import RealtimeHandler

        self.handler = RealtimeHandler(server, self.send_event, audio_out=self.out, initial_session=session)
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    # -- signalling -------------------------------------------------------------------------------
    async def answer(self, offer_sdp: str) -> str:
        """Apply the offer, open the engine session (CapacityError propagates), gather and return the
        SDP answer. ValueError: the offer is not usable (the message says why)."""
        if "m=audio" not in offer_sdp:
            raise ValueError("the SDP offer has no audio m-line (the microphone)")
        if ice.only_loopback(self.cfg.ice_hosts):
            offer_sdp = ice.keep_loopback_candidates(offer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as e:  # noqa: BLE001  (aiortc raises ValueError/InvalidStateError/... on bad SDP)
            raise ValueError(f"the SDP offer was refused: {type(e).__name__}: {e}"[:300]) from None
        self.pc.addTrack(self.out)
        await self.handler.start()
        self.started = True
        answer = await self.pc.createAnswer()
        with ice.host_addresses(self.cfg.ice_hosts):
            await self.pc.setLocalDescription(answer)
        self._tasks.append(asyncio.ensure_future(self._watchdog()))
        self._tasks.append(asyncio.ensure_future(self._consume()))
        return self.pc.localDescription.sdp

    # -- events -----------------------------------------------------------------------------------
    async def send_event(self, ev: dict) -> bool:
        if self.closed:
            return False
        ch = self.channel
        if ch is None or ch.readyState != "open":
            if len(self.pending) >= MAX_PENDING:
                return False
            self.pending.append(ev)
            return True
        if ch.bufferedAmount > MAX_CHANNEL_BUFFER:
            asyncio.ensure_future(self.close("slow_client: the data channel is not read"))
            return False
        ch.send(json.dumps(ev, ensure_ascii=False, separators=(",", ":")))
        return True

    def _on_datachannel(self, channel) -> None:
        if channel.label != CHANNEL:
            log.info("call %s: ignoring data channel %r (events ride on %r)", self.id, channel.label, CHANNEL)
            return
        self.channel = channel

        @channel.on("message")
        def on_message(msg) -> None:
            self.last_rx = time.monotonic()
            self._inbox.put_nowait(msg)

        @channel.on("close")
        def on_close() -> None:
            asyncio.ensure_future(self.close("the data channel was closed"))

        def flush() -> None:
            pend, self.pending = self.pending, []
            for ev in pend:
                channel.send(json.dumps(ev, ensure_ascii=False, separators=(",", ":")))

        if channel.readyState == "open":
            flush()
        else:
            channel.on("open", flush)

    async def _consume(self) -> None:
        """Client events, one at a time and in order, to the handler."""
        while not self.closed:
            msg = await self._inbox.get()
            if isinstance(msg, bytes):
                try:
                    msg = msg.decode("utf-8")
                except UnicodeDecodeError:
                    msg = None
            try:
                ev = json.loads(msg) if isinstance(msg, str) else None
            except ValueError:
                ev = None
            if not isinstance(ev, dict):
                await self.send_event({"type": "error", "event_id": "event_" + uuid.uuid4().hex[:20],
                                       "error": {"type": "invalid_request_error", "code": "invalid_json",
                                                 "message": "events on oai-events must be JSON objects",
                                                 "param": None, "event_id": None}})
                continue
            try:
                await self.handler.handle(ev)
            except Exception:  # noqa: BLE001  (the handler answers bad events itself; this is a bug)
                log.exception("call %s: handler failed on %s", self.id, ev.get("type"))

    def _on_track(self, track) -> None:
        if track.kind != "audio" or self.mic is not None:
            return
        for t in self.pc.getTransceivers():
            if t.receiver.track is track and self.low_delay:
                jitter.install(t.receiver)
        self.mic = MicInput(track, self._push, keep_log=getattr(self.cfg, "webrtc_uplink_log", 0)).start()

    def _push(self, pcm16k) -> None:
        if self.started and not self.closed:
            self.handler.push_input_audio(pcm16k)

    def _on_state(self) -> None:
        st = self.pc.connectionState
        if st == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
        elif st in ("failed", "closed"):
            asyncio.ensure_future(self.close(f"the peer connection is {st}"))

    async def _watchdog(self) -> None:
        cfg = self.cfg
        while not self.closed:
            now = time.monotonic()
            if self.connected_at is None:
                if now - self.t0 > cfg.webrtc_connect_timeout_s:
                    return await self.close(f"ICE/DTLS did not complete within {cfg.webrtc_connect_timeout_s:g} s",
                                            "connect_timeout")
            else:
                rx = max(self.connected_at, self.mic.last_rx if self.mic else 0.0)
                if now - rx > cfg.webrtc_media_timeout_s:
                    return await self.close(f"no audio (RTP) for {cfg.webrtc_media_timeout_s:g} s", "media_timeout")
                if now - max(rx, self.last_rx) > cfg.idle_timeout_s:
                    return await self.close(f"no input for {cfg.idle_timeout_s:g} s", "idle_timeout")
            if now - self.t0 > cfg.max_session_s:
                return await self.close(f"session longer than {cfg.max_session_s:g} s", "session_expired")
            await asyncio.sleep(0.25)

    # -- the end ----------------------------------------------------------------------------------
    async def close(self, reason: str = "hang-up", code: Optional[str] = None) -> None:
        """Idempotent: tell the client why (when the channel is open and `code` is given), stop the
        handler (its engine session: KV pages freed), the media and the peer connection."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        if code is not None and await self.send_event(
                {"type": "error", "event_id": "event_" + uuid.uuid4().hex[:20],
                 "error": {"type": "invalid_request_error", "code": code, "message": reason,
                           "param": None, "event_id": None}}):
            await asyncio.sleep(0.1)  # let SCTP send it before the connection goes
        self.closed = True
        self.close_reason = reason
        log.info("call %s closed: %s", self.id, reason)
        try:
            for t in self._tasks:
                if t is not asyncio.current_task():
                    t.cancel()
            if self.mic is not None:
                self.mic.stop()
            try:
                await asyncio.wait_for(self.handler.close(), 10.0)
            except Exception:  # noqa: BLE001
                log.exception("call %s: handler close failed", self.id)
            self.out.stop()
            try:
                await asyncio.wait_for(self.pc.close(), 5.0)
            except Exception:  # noqa: BLE001
                log.exception("call %s: peer connection close failed", self.id)
        finally:
            self.srv.webrtc_call_ended(self)
            self._done.set()

"""The real-time server: an ASGI (Starlette) app with one WebSocket per conversation at `/ws` (wire
protocol: docs/protocol.md) and at `/v1/realtime` (the OpenAI Realtime API: docs/realtime-api.md,
server/realtime/), the browser page at `/`, `/healthz` and `/metrics`.

    app = create_app(engine, ServerConfig(token="s3cret", max_sessions=16))
    serve(app, host="127.0.0.1", port=8000)              # blocking (uvicorn)
    with BackgroundServer(app) as srv: ... srv.ws_url     # tests / bench: a thread on a free port
"""
from __future__ import annotations

import asyncio
import hmac
import io
import itertools
import logging
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import protocol as P
from .metrics import ServerMetrics
from .wire import Wire, ws_protocol_class

log = logging.getLogger("vita_engine.server")
STATIC_DIR = Path(__file__).with_name("static")


@dataclass
class ServerConfig:
    token: Optional[str] = None  # bearer token; None = no auth (bind to loopback then)
    max_sessions: int = 16  # concurrent WebSocket sessions; beyond: refusal + close 1013
    max_frame_bytes: int = 2 << 20  # largest client binary frame handled (audio or image)
    max_json_bytes: int = 64 << 10  # largest client JSON message
    max_session_s: float = 3600.0  # a session is closed (4001) after this long
    idle_timeout_s: float = 120.0  # ... or (4000) after this long without any client message
    hello_timeout_s: float = 10.0  # the first message (hello) must arrive within this
    max_image_pixels: int = 4096 * 4096  # decoded image size limit (decompression bombs)
    max_text_chars: int = 8000  # `text` messages and the system prompt
    min_sample_rate: int = 8000
    max_sample_rate: int = 48000
    # output flow control: audio (seconds at 24 kHz) produced for the client but not yet taken by
    # the transport; beyond it the client reads too slowly: error "slow_client", close 4002
    send_queue_s: float = 4.0
    send_queue_messages: int = 20000  # same, for queued JSON events (text deltas ...)
    # every server-side close (slow client, idle, session limit, refusal, engine error): the error
    # event + close frame must leave the process and the client must answer within this; else the
    # TCP connection is reset
    slow_client_close_timeout_s: float = 5.0
    # outgoing audio is coalesced into frames of at least audio_frame_ms (the engine emits one chunk
    # per codec window, of any size); a partial frame is sent once its
    # first sample has waited audio_max_hold_ms (one frame period), and at every turn boundary
    audio_frame_ms: float = 20.0
    audio_max_hold_ms: float = 20.0
    # WebRTC (POST /v1/realtime/calls, server/webrtc/): the host addresses ICE gathers on (empty:
    # every non-loopback interface, as aioice does), STUN/TURN URLs (none unless configured: no
    # public STUN server by default), and the call limits: ICE + DTLS must complete within
    # webrtc_connect_timeout_s, and a peer that sends no RTP for webrtc_media_timeout_s is closed
    ice_hosts: tuple = ()
    ice_servers: tuple = ()
    webrtc_connect_timeout_s: float = 15.0
    webrtc_media_timeout_s: float = 10.0
    webrtc_opus_bitrate: int = 32000  # the answer's Opus bit rate (mono, 20 ms packets)
    # an answer starts playing once this much of it is queued (or its first sample waited this
    # long): more = fewer gaps from an engine that delivers its first chunks unevenly, later audio
    webrtc_prebuffer_ms: float = 20.0
    # hand each uplink RTP packet to the decoder at once (webrtc/jitter.py) instead of aiortc's
    # buffer, which holds 4 packets (80 ms); False: the stock buffer
    webrtc_low_delay_jitter: bool = True
    webrtc_uplink_log: int = 0  # keep (time, samples) of the first N uplink frames (bench)
    # this server's name among replicas (vita_engine.serving.ray sets it): sent in `ready`
    replica: Optional[str] = None

    @property
    def transport_max_bytes(self) -> int:
        """WebSocket message size the transport reads at all (uvicorn ws_max_size), docs/protocol.md
        §5: 4 x the larger protocol limit. Messages up to it are read and answered with a `too_big`
        error; above it the connection is closed with 1009 unread. Proportional to the configured
        limit so that an operator who lowers it also lowers what one connection can make the
        server buffer."""
        return 4 * max(self.max_frame_bytes, self.max_json_bytes)

    def public(self) -> dict:
        d = asdict(self)
        d.pop("token")
        d["auth"] = self.token is not None
        return d


def _is_capacity_error(e: BaseException) -> bool:
    try:
        from vita_engine.runtime import CapacityError  # type: ignore

        if isinstance(e, CapacityError):
            return True
    except Exception:  # noqa: BLE001
        pass
    return type(e).__name__ == "CapacityError"


def _token_ok(expected: Optional[str], got: Any) -> bool:
    if expected is None:
        return True
    if not isinstance(got, str):
        return False
    return hmac.compare_digest(got.encode("utf-8"), expected.encode("utf-8"))


def _bearer(ws: WebSocket) -> Optional[str]:
    h = ws.headers.get("authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip()
    return None


def _decode_image(data: bytes, max_pixels: int):
    """JPEG/PNG bytes -> RGB PIL image; ProtocolError if it does not decode or is too large."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels or w < 1 or h < 1:
            raise P.ProtocolError(f"image of {w}x{h} pixels exceeds the {max_pixels}-pixel limit", "bad_image")
        im.load()
        return im.convert("RGB")
    except P.ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001  (PIL raises many types for corrupt data)
        raise P.ProtocolError(f"image does not decode: {type(e).__name__}: {e}"[:300], "bad_image") from None


class _Fail:
    def __init__(self, message: str):
        self.message = message


_END = object()  # the session's event stream ended


class _Conn:
    """One WebSocket conversation: a receive loop (client -> session), an event pump
    (session -> client) and a watchdog (idle / session-length limits)."""

    _ids = itertools.count(1)

    def __init__(self, server: "VitaServer", ws: WebSocket):
        self.srv, self.ws, self.cfg, self.m = server, ws, server.config, server.metrics
        self.id = f"s{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        self.session = None
        self.sample_rate = 16000
        self.wire = Wire(ws, self.m, self.cfg.slow_client_close_timeout_s)  # the send path (every endpoint's)
        self.t0 = time.monotonic()
        self.last_rx = self.t0
        self.seq = 0  # next output audio frame's sequence number (session-wide, from 0)
        self.turn = 0  # the turn whose output is streaming now (runtime numbering)
        self.turn_samples = 0  # output samples of self.turn sent so far
        self.answering = False  # some output of self.turn was produced
        self.muted = False  # client asked to interrupt: drop this turn's remaining audio
        # output path: _pump (engine events) -> self.evq -> _writer (coalesce audio, send)
        self.evq: "asyncio.Queue" = asyncio.Queue()
        self.q_samples = 0  # output audio samples (24 kHz) queued: not yet taken by the transport
        self.q_msgs = 0  # events queued
        self.slow = False
        self._recv_task: Optional[asyncio.Task] = None

    # -- sending ----------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """A close was decided or the peer is gone: nothing more is sent or handled."""
        return not self.wire.open

    async def send_json(self, obj: dict) -> bool:
        return await self.wire.send_json(obj)

    async def _send(self, data, kind: str) -> bool:
        return await self.wire.send(data, kind)

    async def error(self, message: str, code: str = "error") -> None:
        """A non-fatal error event: the session goes on."""
        self.m.errors.labels(code).inc()
        await self.send_json({"type": "error", "message": message, "code": code, "fatal": False})

    async def fatal(self, code: str, message: str, close_code: int, reason: str = "", **extra) -> None:
        """A fatal error event and the close, as one bounded close (Wire.close)."""
        self.m.errors.labels(code).inc()
        await self.wire.close(close_code, reason or message,
                              error={"type": "error", "message": message, "code": code, "fatal": True, **extra})
        if self._recv_task is not None and self._recv_task is not asyncio.current_task():
            self._recv_task.cancel()  # run() ends and releases the slot

    async def close(self, code: int, reason: str = "") -> None:
        await self.wire.close(code, reason)

    async def refuse(self, message: str, code: str, close_code: int) -> None:
        self.m.sessions_refused.labels(code).inc()
        await self.fatal(code, message, close_code)

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> None:
        ws = self.ws
        await ws.accept()
        header_token = _bearer(ws)
        try:
            hello = await asyncio.wait_for(self._recv_hello(), self.cfg.hello_timeout_s)
        except asyncio.TimeoutError:
            await self.refuse(f"no hello within {self.cfg.hello_timeout_s:g} s", "hello_timeout", P.CLOSE_POLICY)
            return
        if hello is None:
            return
        if not (_token_ok(self.cfg.token, header_token) or _token_ok(self.cfg.token, hello.get("token"))):
            await self.refuse("unauthorized: missing or invalid token", "unauthorized", P.CLOSE_POLICY)
            return
        try:
            opts = self._check_hello(hello)
        except P.ProtocolError as e:
            await self.refuse(str(e), e.code, P.CLOSE_POLICY)
            return
        if self.srv.draining:
            await self.refuse("this replica is shutting down: reconnect", "draining", P.CLOSE_SERVICE_RESTART)
            return
        if self.srv.active >= self.cfg.max_sessions:
            await self.refuse(f"server busy: {self.srv.active}/{self.cfg.max_sessions} sessions in use, try again later",
                              "capacity", P.CLOSE_TRY_AGAIN)
            return
        self.srv.active += 1  # no await between the check and here: single event loop
        self.srv.conns.add(self)
        self.m.sessions_active.inc()
        try:
            try:
                self.session = self.srv.engine.session(system_prompt=opts.get("system_prompt"))
            except Exception as e:  # noqa: BLE001
                if _is_capacity_error(e):
                    await self.refuse(f"server busy: {e}", "capacity", P.CLOSE_TRY_AGAIN)
                else:
                    log.exception("session creation failed")
                    await self.fatal("internal", f"could not start a session: {type(e).__name__}: {e}",
                                     P.CLOSE_INTERNAL, "session creation failed")
                return
            self.m.sessions_total.inc()
            ignored = sorted(set(hello.get("options") or {}) - {"system_prompt"})
            replica = {"replica": self.cfg.replica} if self.cfg.replica is not None else {}
            await self.send_json({"type": "ready", "session": self.id, "protocol": P.PROTOCOL_VERSION, **replica,
                                  "sample_rate": self.sample_rate, "format": "pcm16",
                                  "output": {"sample_rate": P.OUTPUT_SAMPLE_RATE, "format": "pcm16",
                                             "header_bytes": P.AUDIO_OUT_HEADER_SIZE},
                                  "limits": {"max_frame_bytes": self.cfg.max_frame_bytes,
                                             "max_json_bytes": self.cfg.max_json_bytes,
                                             "max_session_s": self.cfg.max_session_s,
                                             "idle_timeout_s": self.cfg.idle_timeout_s,
                                             "send_queue_s": self.cfg.send_queue_s,
                                             "audio_frame_ms": self.cfg.audio_frame_ms},
                                  "ignored_options": ignored})
            writer = asyncio.create_task(self._writer(), name=f"writer-{self.id}")
            pump = asyncio.create_task(self._pump(writer), name=f"pump-{self.id}")
            dog = asyncio.create_task(self._watchdog(), name=f"watchdog-{self.id}")
            self._recv_task = asyncio.create_task(self._recv_loop(), name=f"recv-{self.id}")
            try:
                await asyncio.wait({self._recv_task})  # ends on disconnect, or cancelled (slow client)
            finally:
                for t in (self._recv_task, pump, dog, writer):
                    t.cancel()
                self._close_session()  # its events() stream ends too
                # bounded: an engine whose event stream ignores cancellation must not pin the slot
                _, late = await asyncio.wait({pump, dog, writer}, timeout=5.0)
                if late:
                    log.warning("session %s: event stream did not stop within 5 s of the disconnect", self.id)
        finally:
            self._close_session()
            self.srv.active -= 1
            self.srv.conns.discard(self)
            self.m.sessions_active.dec()
            await self.close(P.CLOSE_NORMAL)

    @property
    def busy(self) -> bool:
        """A turn is under way: its answer is streaming, or the engine has taken the turn (end of
        speech decided, a speculative start excepted) and not answered yet."""
        st = getattr(self.session, "_state", None)
        turn = getattr(st, "turn", None)
        return self.answering or (turn is not None and not getattr(turn, "speculative", False))

    def _close_session(self) -> None:
        s = self.session
        if s is not None and not getattr(self, "_session_close_called", False):
            self._session_close_called = True
            try:
                s.close()  # frees its KV pages and stops its work
            except Exception:  # noqa: BLE001
                log.exception("session %s: close failed", self.id)

    async def _recv_hello(self) -> Optional[dict]:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                self.wire.gone = True
                return None
            self.last_rx = time.monotonic()
            text = msg.get("text")
            if text is None:
                await self.refuse("the first message must be a JSON hello", "bad_hello", P.CLOSE_POLICY)
                return None
            try:
                hello = P.parse_json_in(text, self.cfg.max_json_bytes)
            except P.ProtocolError as e:
                await self.refuse(f"bad hello: {e}", "bad_hello", P.CLOSE_POLICY)
                return None
            if hello["type"] != "hello":
                await self.refuse(f'the first message must be a "hello", got "{hello["type"]}"', "bad_hello",
                                  P.CLOSE_POLICY)
                return None
            return hello

    def _check_hello(self, hello: dict) -> dict:
        sr = hello.get("sample_rate", 16000)
        if not isinstance(sr, int) or isinstance(sr, bool) or not (self.cfg.min_sample_rate <= sr <= self.cfg.max_sample_rate):
            raise P.ProtocolError(f"hello.sample_rate must be an integer in [{self.cfg.min_sample_rate}, "
                                  f"{self.cfg.max_sample_rate}], got {sr!r}", "bad_hello")
        fmt = hello.get("format", "pcm16")
        if fmt != "pcm16":
            raise P.ProtocolError(f'hello.format must be "pcm16", got {fmt!r}', "bad_hello")
        opts = hello.get("options") or {}
        if not isinstance(opts, dict):
            raise P.ProtocolError("hello.options must be an object", "bad_hello")
        sp = opts.get("system_prompt")
        if sp is not None and (not isinstance(sp, str) or len(sp) > self.cfg.max_text_chars):
            raise P.ProtocolError(f"options.system_prompt must be a string of at most {self.cfg.max_text_chars} "
                                  "characters", "bad_hello")
        self.sample_rate = sr
        return opts

    async def _watchdog(self) -> None:
        while not self.closed:
            now = time.monotonic()
            if now - self.t0 >= self.cfg.max_session_s:
                await self.fatal("session_limit", f"session longer than {self.cfg.max_session_s:g} s: closing",
                                 P.CLOSE_SESSION_LIMIT, "max session length")
                return
            if now - self.last_rx >= self.cfg.idle_timeout_s:
                await self.fatal("idle_timeout", f"no message for {self.cfg.idle_timeout_s:g} s: closing",
                                 P.CLOSE_IDLE, "idle timeout")
                return
            wait = min(self.t0 + self.cfg.max_session_s, self.last_rx + self.cfg.idle_timeout_s) - now
            await asyncio.sleep(max(0.01, min(wait, 1.0)))

    async def _recv_loop(self) -> None:
        while not self.closed:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            self.last_rx = time.monotonic()
            try:
                if msg.get("bytes") is not None:
                    await self._on_binary(msg["bytes"])
                elif msg.get("text") is not None:
                    await self._on_json(msg["text"])
            except P.ProtocolError as e:
                await self.error(str(e), e.code)
            except (ValueError, TypeError) as e:  # the runtime rejected this input (its message says why)
                await self.error(f"{type(e).__name__}: {e}"[:300], "bad_message")
            except Exception as e:  # noqa: BLE001  (a runtime error on one message must not kill the server)
                if type(e).__name__ == "SessionClosedError":
                    await self.fatal("closed", f"the session is closed: {e}"[:300], P.CLOSE_NORMAL, "session closed")
                    return
                log.exception("session %s: error handling a client message", self.id)
                await self.error(f"internal error: {type(e).__name__}: {e}"[:300], "internal")

    async def _on_binary(self, data: bytes) -> None:
        self.m.bytes_in.inc(len(data))
        try:
            kind, payload = P.parse_binary_in(data, self.cfg.max_frame_bytes)
        except P.ProtocolError:
            self.m.frames_in.labels("invalid").inc()
            raise
        if kind == P.KIND_AUDIO:
            self.m.frames_in.labels("audio").inc()
            if payload.size:
                self.session.push_audio(payload, self.sample_rate)
            return
        self.m.frames_in.labels("image" if kind == P.KIND_IMAGE else "video").inc()
        # decode (and the runtime's preprocessing inside push_*) off the event loop; awaiting it
        # keeps the order of this session's inputs
        if kind == P.KIND_IMAGE:
            await asyncio.to_thread(lambda: self.session.push_image(_decode_image(payload, self.cfg.max_image_pixels)))
        else:
            ts, raw = payload
            await asyncio.to_thread(
                lambda: self.session.push_video_frame(_decode_image(raw, self.cfg.max_image_pixels), ts))

    async def _on_json(self, text: str) -> None:
        self.m.bytes_in.inc(len(text))
        try:
            msg = P.parse_json_in(text, self.cfg.max_json_bytes)
        except P.ProtocolError:
            self.m.frames_in.labels("invalid").inc()
            raise
        t = msg["type"]
        self.m.frames_in.labels("control").inc()
        if t == "interrupt":
            if self.answering:
                self.muted = True  # no more audio of this turn goes out, even before the runtime reacts
            self.session.interrupt()
        elif t == "playback":
            pos = msg.get("position_s")
            if isinstance(pos, bool) or not isinstance(pos, (int, float)) or not math.isfinite(pos) or pos < 0:
                raise P.ProtocolError(f"playback.position_s must be a finite number >= 0, got {pos!r}", "bad_message")
            self.session.playback_position(float(pos))
        elif t == "text":
            s = msg.get("text")
            if not isinstance(s, str) or not s or len(s) > self.cfg.max_text_chars:
                raise P.ProtocolError(f"text.text must be a non-empty string of at most {self.cfg.max_text_chars} "
                                      "characters", "bad_message")
            self.session.push_text(s)
        elif t == "end_turn":
            end = getattr(self.session, "end_turn", None)
            if callable(end):
                end()
            else:  # no explicit end-of-turn in this runtime: let its endpointer see a pause
                self.session.push_audio(np.zeros(self.sample_rate, dtype=np.int16), self.sample_rate)
        elif t == "hello":
            raise P.ProtocolError("hello was already received", "bad_message")
        elif t == "ping":
            await self.send_json({"type": "pong", "t": msg.get("t")})  # finite: parse_json_in checked
        else:
            raise P.ProtocolError(f'unknown message type "{t}"', "unknown_type")

    async def _pump(self, writer: asyncio.Task) -> None:
        """Move the session's events to the send queue (`self.evq`) as they come, so the engine is
        never held up by the network; when a client reads so slowly that more than `send_queue_s`
        of audio (or `send_queue_messages` events) waits for the transport, close it (slow_client)."""
        lim = self.cfg.send_queue_s * P.OUTPUT_SAMPLE_RATE
        try:
            async for ev in self.session.events():
                if self.closed:
                    return
                n = 0
                if type(ev).__name__ == "AudioChunk":
                    pcm = np.asarray(ev.pcm)
                    sr = int(getattr(ev, "sample_rate", P.OUTPUT_SAMPLE_RATE))
                    n = int(round(pcm.size * P.OUTPUT_SAMPLE_RATE / sr)) if sr != P.OUTPUT_SAMPLE_RATE else pcm.size
                self.q_samples += n
                self.q_msgs += 1
                self.evq.put_nowait((ev, n))
                if self.q_samples > lim or self.q_msgs > self.cfg.send_queue_messages:
                    await self._slow_client(writer)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.exception("session %s: event stream failed", self.id)
            self.evq.put_nowait((_Fail(f"engine error: {type(e).__name__}: {e}"[:300]), 0))
            return
        self.evq.put_nowait((_END, 0))

    async def _slow_client(self, writer: asyncio.Task) -> None:
        """The client does not keep up: stop its session and close with a clear error (nothing is
        dropped silently: the queued output is discarded and the error says so). The error and the
        close get `slow_client_close_timeout_s` from now; a client that still does not read is then
        disconnected (Wire.close)."""
        self.wire.stop_sending()  # the close deadline starts now; nobody else sends
        self.slow = True
        queued_s = self.q_samples / P.OUTPUT_SAMPLE_RATE
        msg = (f"client reads too slowly: {queued_s:.1f} s of audio and {self.q_msgs} events waiting to be sent "
               f"(limit send_queue_s={self.cfg.send_queue_s:g}); the queued output is discarded and the session closed")
        log.warning("session %s: %s", self.id, msg)
        writer.cancel()  # it waits in a send for the stalled transport: nothing half-written
        await asyncio.wait({writer}, timeout=self.cfg.slow_client_close_timeout_s)
        self._close_session()  # stop generating for this client, free its KV pages
        await self.fatal("slow_client", msg, P.CLOSE_SLOW_CLIENT, "slow client",
                         queued_audio_s=round(queued_s, 3), queued_events=self.q_msgs)

    async def _writer(self) -> None:
        """Forward the queued events to the client, in order, coalescing audio into frames of at
        least `audio_frame_ms` (a partial frame waits at most `audio_max_hold_ms`, and goes out
        before any non-text event: a turn's audio always precedes its metrics/turn_end)."""
        cfg, sr = self.cfg, P.OUTPUT_SAMPLE_RATE
        frame_n = max(1, int(round(cfg.audio_frame_ms * sr / 1000)))
        max_hold = max(0.0, cfg.audio_max_hold_ms / 1000)
        loop = asyncio.get_running_loop()
        pend: list = []  # float32 pieces of the frame being built
        st = {"n": 0, "q": 0, "start": 0, "turn": 0, "t0": 0.0}

        async def flush() -> bool:
            if not pend:
                return True
            pcm = pend[0] if len(pend) == 1 else np.concatenate(pend)
            n_q = st["q"]
            pend.clear()
            st["n"] = st["q"] = 0
            if self.muted:  # interrupted while the frame was being built: dropped on purpose, unnumbered
                self.q_samples -= n_q
                return True
            frame = P.pack_audio_out(self.seq, st["turn"], st["start"], pcm)
            self.seq += 1  # our own numbering: frames dropped on purpose leave no gap
            ok = await self._send(frame, "audio")
            self.q_samples -= n_q
            return ok

        while True:
            try:
                if st["n"]:
                    wait = st["t0"] + max_hold - loop.time()
                    item = await asyncio.wait_for(self.evq.get(), max(0.0, wait))
                else:
                    item = await self.evq.get()
            except asyncio.TimeoutError:
                if not await flush():
                    return
                continue
            ev, n_q = item
            if ev is _END:
                await flush()
                return
            if isinstance(ev, _Fail):
                await flush()
                await self.fatal("internal", ev.message, P.CLOSE_INTERNAL, "engine error")
                return
            self.q_msgs -= 1
            name = type(ev).__name__
            if name == "AudioChunk":
                pcm = np.asarray(ev.pcm)
                if pcm.size == 0:
                    self.q_samples -= n_q
                    continue
                esr = int(getattr(ev, "sample_rate", sr))
                if esr != sr:  # the protocol is 24 kHz; resample anything else
                    k = int(round(pcm.size * sr / esr))
                    pcm = np.interp(np.linspace(0, pcm.size - 1, k), np.arange(pcm.size), pcm.astype(np.float32))
                t_ev = getattr(ev, "turn", None)
                if st["n"] and t_ev is not None and int(t_ev) != st["turn"] and not await flush():
                    return  # the previous turn's frame goes out (or is dropped if muted) first
                self._set_turn(ev)
                self.answering = True
                start = getattr(ev, "offset", None)
                start = self.turn_samples if start is None else int(start)
                self.turn_samples = start + pcm.size
                if self.muted:
                    self.q_samples -= n_q
                    continue
                if st["n"] and (self.turn != st["turn"] or start != st["start"] + st["n"]):
                    if not await flush():  # never coalesce across turns or sample gaps
                        return
                if not st["n"]:
                    st["start"], st["turn"], st["t0"] = start, self.turn, loop.time()
                pend.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
                st["n"] += pcm.size
                st["q"] += n_q
                if st["n"] >= frame_n and not await flush():
                    return
                continue
            if name != "TextDelta" and not await flush():  # a turn's audio goes out before its end
                return
            if name == "TextDelta":
                self._set_turn(ev)
                self.answering = True
                if self.muted:
                    continue
            elif name == "Interrupted":
                self.m.interrupted.inc()
            elif name == "Metrics":
                self._observe(ev.values)
            elif name == "Error":  # the runtime could not run a turn (e.g. prompt over budget)
                self.m.errors.labels("turn_failed").inc()
                if not await self.send_json({"type": "error", "code": "turn_failed", "turn": getattr(ev, "turn", None),
                                             "message": str(getattr(ev, "message", ev)), "fatal": False}):
                    return
                continue
            msg = P.event_to_json(ev, self.turn)
            if name == "TurnEnd":
                self.m.turns.inc()
                self.turn = int(ev.turn) + 1
                self.turn_samples = 0
                self.answering = self.muted = False
            if msg is not None and not await self._send(msg, "json"):
                return

    def _set_turn(self, ev) -> None:
        t = getattr(ev, "turn", None)
        if t is not None and int(t) != self.turn:
            self.turn, self.turn_samples = int(t), 0
            self.muted = False

    def _observe(self, values: dict) -> None:
        for key, hist in (("ttfa_ms", self.m.ttfa), ("response_ms", self.m.response)):
            v = values.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0:
                hist.observe(float(v) / 1e3)


class VitaServer:
    def __init__(self, engine, config: Optional[ServerConfig] = None):
        self.engine = engine
        self.config = config or ServerConfig()
        self.metrics = ServerMetrics(engine)
        self.active = 0
        self.started = time.time()
        self.conns: set = set()  # open sessions (_Conn)
        self.draining = False
        self.webrtc_calls: dict = {}  # call id -> webrtc.call.Call

    async def webrtc_create(self, request: Request) -> Response:
        from .webrtc import signalling

        return await signalling.create_call(self, request)

    async def webrtc_hangup(self, request: Request) -> Response:
        from .webrtc import signalling

        return await signalling.hangup(self, request)

    def webrtc_call_ended(self, call) -> None:
        """A call closed (webrtc/call.py; its handler gave its session slot back)."""
        self.webrtc_calls.pop(call.id, None)

    async def drain(self, grace_s: float = 30.0, poll_s: float = 0.02) -> None:
        """Shut down softly (a replica being stopped, vita_engine.serving.ray): refuse new
        sessions (1012), close each open session with 1012 as soon as it is between turns, and
        every one still in a turn after `grace_s`; returns once they are all closed (bounded)."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        msg = "this replica is shutting down: reconnect"
        while self.conns or self.webrtc_calls:
            late = time.monotonic() >= deadline
            for c in list(self.conns):
                if not c.closed and (late or not c.busy):
                    await c.fatal("draining", msg if not late else msg + f" (the turn did not end within {grace_s:g} s)",
                                  P.CLOSE_SERVICE_RESTART, "replica shutting down")
            for call in list(self.webrtc_calls.values()):  # WebRTC: an `error` event, then the hang-up
                if late or call.handler.resp is None:
                    await call.close(msg, "draining")
            if late:
                break
            await asyncio.sleep(poll_s)
        t_end = time.monotonic() + self.config.slow_client_close_timeout_s + 5.0
        while self.conns and time.monotonic() < t_end:  # their run() ends and frees the slot
            await asyncio.sleep(poll_s)

    async def ws(self, websocket: WebSocket) -> None:
        conn = _Conn(self, websocket)
        try:
            await conn.run()
        except Exception:  # noqa: BLE001  (never let one connection take the server down)
            log.exception("connection %s failed", conn.id)
            await conn.close(P.CLOSE_INTERNAL, "internal error")

    async def realtime(self, websocket: WebSocket) -> None:
        """`/v1/realtime`: the OpenAI Realtime API (docs/realtime-api.md)."""
        from .realtime.ws import realtime_endpoint

        await realtime_endpoint(self, websocket)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "draining" if self.draining else "ok", "sessions_active": self.active,
                             "max_sessions": self.config.max_sessions, "replica": self.config.replica,
                             "uptime_s": round(time.time() - self.started, 1), "protocol": P.PROTOCOL_VERSION})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(engine, config: Optional[ServerConfig] = None) -> Starlette:
    srv = VitaServer(engine, config)
    app = Starlette(routes=[
        Route("/", srv.index),
        Route("/healthz", srv.healthz),
        Route("/metrics", srv.prometheus),
        WebSocketRoute("/ws", srv.ws),
        WebSocketRoute("/v1/realtime", srv.realtime),
        Route("/v1/realtime/calls", srv.webrtc_create, methods=["POST"]),
        Route("/v1/realtime/calls/{call_id}/hangup", srv.webrtc_hangup, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ])
    app.state.vita = srv
    return app


def _uvicorn_config(app: Starlette, host: str, port: int, log_level: str = "info"):
    import uvicorn

    cfg: ServerConfig = app.state.vita.config
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws=ws_protocol_class(),
                          ws_max_size=cfg.transport_max_bytes, ws_ping_interval=20.0, ws_ping_timeout=20.0,
                          lifespan="off", access_log=False)


def _server(app: Starlette, host: str, port: int, log_level: str):
    """uvicorn.Server that, on shutdown, also ends the WebRTC calls (uvicorn knows only the HTTP and
    WebSocket connections): each gets an `error` event (server_shutdown) and its session is closed."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            calls = list(app.state.vita.webrtc_calls.values())
            if calls:
                await asyncio.wait([asyncio.ensure_future(c.close("the server is shutting down", "server_shutdown"))
                                    for c in calls], timeout=10.0)
            await super().shutdown(sockets)

    return Server(_uvicorn_config(app, host, port, log_level))


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    _server(app, host, port, log_level).run()


class BackgroundServer:
    """Run the app with uvicorn in a daemon thread on a free loopback port (tests, bench)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host = app, host
        self.server = _server(app, host, port, log_level)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="vita-server", daemon=True)
        self.port = None

    def start(self, timeout: float = 10.0) -> "BackgroundServer":
        self.thread.start()
        t_end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

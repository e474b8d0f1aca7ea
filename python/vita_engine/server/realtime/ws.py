"""`/v1/realtime` over WebSocket: the handshake as the `openai` SDK and browsers do it, the JSON event
transport with `/ws`'s limits (frame size, session length, idle, slow client; docs/protocol.md §5),
and a `RealtimeHandler` per connection.

Handshake: `GET /v1/realtime?model=...` with `Authorization: Bearer TOKEN` (the SDK), or the key as
a subprotocol (`realtime`, `openai-insecure-api-key.<key>`: browsers cannot set headers; the server
selects `realtime`). Beta clients (`OpenAI-Beta: realtime=v1`, or the subprotocol
`openai-beta.realtime-v1`) get the beta event spelling. A bad token is refused before the upgrade
(HTTP 401, or close 1008 where the ASGI server cannot send a denial response); a full server accepts
and closes with 1013 after an `error` event; uvicorn closes open sessions with 1012 on shutdown."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import protocol as P
from ..app import _bearer, _is_capacity_error, _token_ok
from ..wire import Wire
from .events import ClientError, error_event
from .handler import RealtimeHandler

log = logging.getLogger("vita_engine.server.realtime")

KEY_PREFIX = "openai-insecure-api-key."
BETA_PROTOCOL = "openai-beta.realtime-v1"


def _subprotocols(ws: WebSocket) -> list:
    return list(ws.scope.get("subprotocols") or [])


def handshake_token(ws: WebSocket) -> Optional[str]:
    tok = _bearer(ws)
    if tok is not None:
        return tok
    for p in _subprotocols(ws):
        if p.startswith(KEY_PREFIX):
            return p[len(KEY_PREFIX):]
    return None


def is_beta(ws: WebSocket) -> bool:
    return "realtime=v1" in ws.headers.get("openai-beta", "").replace(" ", "") or BETA_PROTOCOL in _subprotocols(ws)


def json_limit(cfg) -> int:
    """Largest client event read: JSON events carry base64 audio/images, so the frame limit counts
    (4/3 for base64, plus room for the envelope), and never less than the JSON limit."""
    return max(cfg.max_json_bytes, cfg.max_frame_bytes * 4 // 3 + 4096)


class RealtimeConnection:
    def __init__(self, server, ws: WebSocket):
        self.srv, self.ws, self.cfg, self.m = server, ws, server.config, server.metrics
        self.wire = Wire(ws, self.m, self.cfg.slow_client_close_timeout_s)
        self.handler: Optional[RealtimeHandler] = None
        self.q: "asyncio.Queue" = asyncio.Queue()
        self.q_samples = 0
        self.q_msgs = 0
        self.t0 = self.last_rx = time.monotonic()
        self._recv: Optional[asyncio.Task] = None

    async def run(self) -> None:
        ws = self.ws
        if not _token_ok(self.cfg.token, handshake_token(ws)):
            self.m.sessions_refused.labels("unauthorized").inc()
            await self._deny()
            return
        sub = "realtime" if "realtime" in _subprotocols(ws) else None
        await ws.accept(subprotocol=sub)
        writer = asyncio.create_task(self._writer())
        if getattr(self.srv, "draining", False):  # a replica shutting down (vita_engine.serving.ray)
            self.m.sessions_refused.labels("draining").inc()
            await self._fatal(error_event("this replica is shutting down: reconnect", "draining", type="server_error"),
                              P.CLOSE_SERVICE_RESTART, "replica shutting down")
            writer.cancel()
            return
        self.handler = RealtimeHandler(self.srv, self.send_event, beta=is_beta(ws),
                                       model=ws.query_params.get("model") or "vita-1.5")
        conns = getattr(self.srv, "conns", None)
        if conns is not None:
            conns.add(self)  # VitaServer.drain() closes it between turns
        try:
            try:
                await self.handler.start()
            except ClientError as e:
                await self._fatal(error_event(e.message, e.code, e.param), P.CLOSE_POLICY, e.message)
                return
            except Exception as e:  # noqa: BLE001
                if _is_capacity_error(e):
                    self.m.sessions_refused.labels("capacity").inc()
                    await self._fatal(error_event(f"server busy: {e}", "capacity", type="server_error"),
                                      P.CLOSE_TRY_AGAIN, "server busy")
                else:
                    log.exception("realtime: session creation failed")
                    await self._fatal(error_event(f"could not start a session: {type(e).__name__}: {e}"[:400],
                                                  "internal_error", type="server_error"), P.CLOSE_INTERNAL,
                                      "session creation failed")
                return
            dog = asyncio.create_task(self._watchdog())
            self._recv = asyncio.create_task(self._recv_loop())
            try:
                await asyncio.wait({self._recv})
            finally:
                for t in (self._recv, dog):
                    t.cancel()
        finally:
            writer.cancel()
            if self.handler is not None:
                await self.handler.close()
            await self.wire.close(P.CLOSE_NORMAL)
            if conns is not None:
                conns.discard(self)

    # ---- VitaServer.drain() ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self.wire.open

    @property
    def busy(self) -> bool:
        """A response is in progress (drain waits for it to end)."""
        h = self.handler
        return h is not None and (h.resp is not None or h.creating > 0)

    async def fatal(self, code: str, message: str, close_code: int, reason: str = "") -> None:
        await self._fatal(error_event(message, code, type="server_error"), close_code, reason or message)

    async def _deny(self) -> None:
        body = {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                          "message": "Incorrect API key provided (the server's --token).", "param": None}}
        if "websocket.http.response" in (self.ws.scope.get("extensions") or {}):
            from starlette.responses import JSONResponse

            await self.ws.send_denial_response(JSONResponse(body, status_code=401))
            return
        await self.ws.accept()
        await self.wire.close(P.CLOSE_POLICY, "unauthorized", error=error_event(body["error"]["message"],
                                                                                "invalid_api_key"))

    async def _fatal(self, err: dict, code: int, reason: str) -> None:
        self.m.errors.labels(err["error"]["code"] or "error").inc()
        await self.wire.close(code, reason, error=err)
        if self._recv is not None and self._recv is not asyncio.current_task():
            self._recv.cancel()

    # ---- output: a bounded queue, so the engine never waits for the network ------------------------
    async def send_event(self, ev: dict) -> bool:
        if not self.wire.open:
            return False
        n = len(ev.get("delta", "")) * 3 // 8 if ev.get("type", "").endswith("audio.delta") else 0
        self.q_samples += n
        self.q_msgs += 1
        self.q.put_nowait((ev, n))
        if self.q_samples > self.cfg.send_queue_s * 24000 or self.q_msgs > self.cfg.send_queue_messages:
            await self._slow_client()
            return False
        return True

    async def _writer(self) -> None:
        while True:
            ev, n = await self.q.get()
            ok = await self.wire.send(P.dumps(ev), "audio" if n else "json")
            self.q_samples -= n
            self.q_msgs -= 1
            if not ok:
                return

    async def _slow_client(self) -> None:
        queued_s = self.q_samples / 24000
        msg = (f"client reads too slowly: {queued_s:.1f} s of audio and {self.q_msgs} events waiting to be sent "
               f"(limit send_queue_s={self.cfg.send_queue_s:g}); the queued output is discarded and the session closed")
        log.warning("realtime: %s", msg)
        self.wire.stop_sending()
        while not self.q.empty():
            self.q.get_nowait()
        if self.handler is not None:
            asyncio.get_running_loop().create_task(self.handler.close())
        await self._fatal(error_event(msg, "slow_client", type="server_error"), P.CLOSE_SLOW_CLIENT, "slow client")

    # ---- input -------------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        cfg = self.cfg
        while self.wire.open:
            now = time.monotonic()
            if now - self.t0 >= cfg.max_session_s:
                await self._fatal(error_event(f"session longer than {cfg.max_session_s:g} s: closing", "session_limit"),
                                  P.CLOSE_SESSION_LIMIT, "max session length")
                return
            if now - self.last_rx >= cfg.idle_timeout_s:
                await self._fatal(error_event(f"no message for {cfg.idle_timeout_s:g} s: closing", "idle_timeout"),
                                  P.CLOSE_IDLE, "idle timeout")
                return
            wait = min(self.t0 + cfg.max_session_s, self.last_rx + cfg.idle_timeout_s) - now
            await asyncio.sleep(max(0.01, min(wait, 1.0)))

    async def _recv_loop(self) -> None:
        lim = json_limit(self.cfg)
        while self.wire.open:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                self.wire.gone = True
                return
            self.last_rx = time.monotonic()
            text = msg.get("text")
            if text is None:
                self.m.frames_in.labels("invalid").inc()
                await self.send_event(error_event("binary frames are not part of the Realtime API: send JSON events",
                                                  "invalid_json"))
                continue
            self.m.bytes_in.inc(len(text))
            if len(text) > lim:
                self.m.frames_in.labels("invalid").inc()
                await self.send_event(error_event(f"event of {len(text)} characters exceeds the {lim}-byte limit",
                                                  "too_big"))
                continue
            try:
                ev = P.loads(text)
            except P.NonFiniteNumber as e:
                self.m.frames_in.labels("invalid").inc()
                await self.send_event(error_event(f"numbers must be finite: {e}", "invalid_json"))
                continue
            except (ValueError, RecursionError) as e:
                self.m.frames_in.labels("invalid").inc()
                await self.send_event(error_event(f"invalid JSON: {e}"[:300], "invalid_json"))
                continue
            kind = ev.get("type") if isinstance(ev, dict) else None
            self.m.frames_in.labels("audio" if kind == "input_audio_buffer.append" else "control").inc()
            try:
                await self.handler.handle(ev)
            except Exception as e:  # noqa: BLE001  (SessionClosedError: the engine closed the session)
                await self._fatal(error_event(f"the session is closed: {e}"[:300], "session_closed",
                                              type="server_error"), P.CLOSE_NORMAL, "session closed")
                return


async def realtime_endpoint(server, websocket: WebSocket) -> None:
    conn = RealtimeConnection(server, websocket)
    try:
        await conn.run()
    except Exception:  # noqa: BLE001  (never let one connection take the server down)
        log.exception("realtime connection failed")
        await conn.wire.close(P.CLOSE_INTERNAL, "internal error")

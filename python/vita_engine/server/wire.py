"""The send side of one server WebSocket, shared by every endpoint (`/ws` today; a `/v1/realtime`
endpoint reuses it as is): strict JSON, one sender at a time, and a close that ends the connection
within a bound whatever the peer does.

Why the bound needs the transport: a peer that stops reading fills its TCP window; the ASGI server's
send then waits for a write buffer that never drains, and a graceful `transport.close()` waits for the
same buffer, so the socket and everything the connection holds would stay forever. `Wire.close()`
gives the error event and the close frame `close_timeout_s` (from the decision) to leave the process
and the peer to answer; past it the TCP connection is reset (SO_LINGER 0, then abort: the kernel
drops what it still queues for that peer too).

uvicorn hands the app its transport through `scope["extensions"]["vita.transport"]`
(`ws_protocol_class()` below); under another ASGI server there is none and the close is bounded only
by what that server does.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any, Optional

from . import protocol as P

log = logging.getLogger("vita_engine.server")

TRANSPORT_EXT = "vita.transport"


class Wire:
    """Output of one WebSocket. `send*` return False (and send nothing) once a close was decided or
    the peer is gone; `close()` is the one way the server ends a connection."""

    def __init__(self, ws, metrics, close_timeout_s: float):
        self.ws, self.m = ws, metrics
        self.close_timeout_s = float(close_timeout_s)
        self.transport = (ws.scope.get("extensions") or {}).get(TRANSPORT_EXT)
        self.lock = asyncio.Lock()
        self.closing = False  # a close was decided: from now on only that close goes out
        self.gone = False  # a send failed: the peer is gone
        self.outcome: Optional[str] = None  # after close(): "closed", "dropped" (reset) or "gone"
        self._decided: Optional[float] = None
        self._close_task: Optional[asyncio.Task] = None

    @property
    def open(self) -> bool:
        return not (self.closing or self.gone)

    # -- sending ----------------------------------------------------------------------------------
    async def send_json(self, obj: Any) -> bool:
        return await self.send(P.dumps(obj), "json")

    async def send(self, data, kind: str) -> bool:
        if not self.open:
            return False
        try:
            async with self.lock:
                if not self.open:  # a close was decided while this send waited for the lock
                    return False
                await self._write(data)
        except Exception:  # noqa: BLE001  (peer gone)
            self.gone = True
            return False
        self._count(data, kind)
        return True

    async def _write(self, data) -> None:
        if isinstance(data, (bytes, bytearray)):
            await self.ws.send_bytes(bytes(data))
        else:
            await self.ws.send_text(data)

    def _count(self, data, kind: str) -> None:
        self.m.frames_out.labels(kind).inc()
        self.m.bytes_out.inc(len(data))

    # -- closing ----------------------------------------------------------------------------------
    def stop_sending(self) -> None:
        """The close is decided (its deadline starts now) but not sent yet: nothing else goes out."""
        self.closing = True
        if self._decided is None:
            self._decided = time.monotonic()

    async def close(self, code: int, reason: str = "", error: Optional[dict] = None) -> Optional[str]:
        """End the connection: `error` (an event, if given), the close frame, and the peer's close
        reply, within `close_timeout_s` of the decision (`stop_sending()` or this call); past it the
        TCP connection is reset. A second call waits for the first close (its own code and error are
        not sent). Cancelling the caller does not cancel the close. -> `outcome`."""
        if self._close_task is None:
            self.stop_sending()
            deadline = self._decided + self.close_timeout_s
            self._close_task = asyncio.get_running_loop().create_task(self._close(code, reason, error, deadline))
        await asyncio.shield(self._close_task)
        return self.outcome

    async def _close(self, code: int, reason: str, error: Optional[dict], deadline: float) -> None:
        sent = False
        try:
            sent = await asyncio.wait_for(self._send_close(code, reason, error), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        t = self.transport
        if t is None:
            self.outcome = "closed" if sent else "gone"
            return
        # the frames are handed to the transport: wait for them to leave the process and for the peer's
        # close reply (uvicorn then closes the transport)
        while sent and not (t.is_closing() and t.get_write_buffer_size() == 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if t.get_write_buffer_size() == 0:
            if not t.is_closing():
                t.close()  # flushed, but no reply in time: FIN now (a reading peer still gets the close frame)
            self.outcome = "closed" if sent else "gone"
            return
        # bytes still wait in the process for a peer that does not read: drop the connection
        self._reset(t)
        self.outcome = "dropped"
        log.warning("connection %s: the close (%d) did not go out within %g s: connection reset",
                    _peer(self.ws), code, self.close_timeout_s)

    async def _send_close(self, code: int, reason: str, error: Optional[dict]) -> bool:
        async with self.lock:
            try:
                if error is not None:
                    text = P.dumps(error)
                    await self.ws.send_text(text)
                    self._count(text, "json")
                await self.ws.close(code=code, reason=_close_reason(reason))
                return True
            except Exception:  # noqa: BLE001  (peer gone, or the app state is already closed)
                self.gone = True
                return False

    def _reset(self, t) -> None:
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:  # linger 0: close() sends RST and frees the kernel's queued bytes at once
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, ValueError):
                pass
        t.abort()
        self.m.dropped.inc()


def _close_reason(reason: str) -> str:
    """At most 123 UTF-8 bytes fit a close frame (RFC 6455 5.5.1); cut on a character boundary."""
    return reason.encode("utf-8")[:120].decode("utf-8", "ignore")


def _peer(ws) -> str:
    c = ws.scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"


_PROTOCOL_CLASS = None


def ws_protocol_class():
    """uvicorn's sans-I/O WebSocket protocol, handing the app its transport (TRANSPORT_EXT)."""
    global _PROTOCOL_CLASS
    if _PROTOCOL_CLASS is None:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        class VitaWebSocketProtocol(WebSocketsSansIOProtocol):
            async def run_asgi(self) -> None:
                self.scope.setdefault("extensions", {})[TRANSPORT_EXT] = self.transport
                await super().run_asgi()

        _PROTOCOL_CLASS = VitaWebSocketProtocol
    return _PROTOCOL_CLASS

"""`POST /v1/realtime/calls` (SDP offer in, SDP answer out, as OpenAI's Realtime API over WebRTC)
and `POST /v1/realtime/calls/{call_id}/hangup`. The offer comes as multipart/form-data (an `sdp`
part and an optional `session` JSON part) or as a bare application/sdp body; the answer is `201`,
application/sdp, with `Location: /v1/realtime/calls/{call_id}`. Errors are JSON in OpenAI's shape
`{"error": {"type", "code", "message", "param"}}`."""
from __future__ import annotations

import json
import logging
from email.parser import BytesParser
from email.policy import HTTP
from typing import Optional, Tuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import INSTALL_HINT, missing

log = logging.getLogger("vita_engine.server.webrtc")
MAX_BODY = 256 << 10  # an SDP offer is a few kB; a session object a few more


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error",
           param: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "code": code, "message": message, "param": param}},
                        status_code=status, headers=headers)


def _bearer(request: Request) -> Optional[str]:
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h[:7].lower() == "bearer " else None


async def _body(request: Request) -> bytes:
    n = int(request.headers.get("content-length") or 0)
    if n > MAX_BODY:
        raise ValueError(f"request body of {n} bytes exceeds the {MAX_BODY}-byte limit")
    out = bytearray()
    async for chunk in request.stream():
        out += chunk
        if len(out) > MAX_BODY:
            raise ValueError(f"request body exceeds the {MAX_BODY}-byte limit")
    return bytes(out)


def parse_offer(content_type: str, body: bytes) -> Tuple[str, Optional[dict]]:
    """-> (SDP offer, session object or None); ValueError naming the part and what was expected."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct == "application/sdp":
        sdp, session = body.decode("utf-8", "replace"), None
    elif ct == "multipart/form-data":
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        parts = {}
        for part in msg.iter_parts() if msg.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            if name:
                parts[name] = part.get_payload(decode=True) or b""
        if "sdp" not in parts:
            raise ValueError('the multipart body has no "sdp" part (the SDP offer)')
        sdp = parts["sdp"].decode("utf-8", "replace")
        session = None
        if "session" in parts:
            try:
                session = json.loads(parts["session"])
            except ValueError:
                raise ValueError('the "session" part must be a JSON object') from None
            if not isinstance(session, dict):
                raise ValueError('the "session" part must be a JSON object')
    else:
        raise ValueError(f"Content-Type must be multipart/form-data (parts sdp, session) or application/sdp, got {ct or 'none'!r}")
    if not sdp.lstrip().startswith("v=0"):
        raise ValueError('the "sdp" part must be an SDP offer (starting with "v=0")')
    return sdp, session


async def create_call(srv, request: Request) -> Response:
    cfg = srv.config
    from ..app import _is_capacity_error, _token_ok

    if not _token_ok(cfg.token, _bearer(request)):
        srv.metrics.sessions_refused.labels("unauthorized").inc()
        return _error(401, "missing or invalid bearer token (Authorization: Bearer TOKEN)", "invalid_api_key")
    lack = missing()
    if lack:
        return _error(501, f"WebRTC needs {', '.join(lack)}, which this server does not have: {INSTALL_HINT}",
                      "webrtc_unavailable", "server_error")
    try:
        sdp, session = parse_offer(request.headers.get("content-type", ""), await _body(request))
    except ValueError as e:
        return _error(400, str(e), "invalid_offer", param="sdp")
    if getattr(srv, "draining", False):  # a replica shutting down (vita_engine.serving.ray)
        srv.metrics.sessions_refused.labels("draining").inc()
        return _error(503, "this replica is shutting down: reconnect", "draining", "server_error",
                      headers={"Retry-After": "1"})
    if srv.active >= cfg.max_sessions:
        srv.metrics.sessions_refused.labels("capacity").inc()
        return _error(503, f"server busy: {srv.active}/{cfg.max_sessions} sessions in use, try again later",
                      "capacity", "server_error", headers={"Retry-After": "1"})
    from .call import Call

    call = Call(srv, session)  # its handler takes the session slot in answer() (handler.start)
    srv.webrtc_calls[call.id] = call
    try:
        answer = await call.answer(sdp)
    except ValueError as e:
        await call.close(str(e))
        return _error(400, str(e), "invalid_offer", param="sdp")
    except Exception as e:  # noqa: BLE001
        await call.close(f"{type(e).__name__}: {e}")
        from ..realtime.events import ClientError

        if isinstance(e, ClientError):  # the `session` part is not a usable session config
            return _error(400, e.message, e.code, e.type, param=f"session.{e.param}" if e.param else "session")
        if _is_capacity_error(e):
            srv.metrics.sessions_refused.labels("capacity").inc()
            return _error(503, f"server busy: {e}", "capacity", "server_error", headers={"Retry-After": "1"})
        log.exception("call setup failed")
        return _error(500, f"could not start the call: {type(e).__name__}: {e}"[:300], "internal", "server_error")
    return Response(answer, status_code=201, media_type="application/sdp",
                    headers={"Location": f"/v1/realtime/calls/{call.id}"})


async def hangup(srv, request: Request) -> Response:
    from ..app import _token_ok

    if not _token_ok(srv.config.token, _bearer(request)):
        return _error(401, "missing or invalid bearer token (Authorization: Bearer TOKEN)", "invalid_api_key")
    call = srv.webrtc_calls.get(request.path_params["call_id"])
    if call is None:
        return _error(404, f"no active call {request.path_params['call_id']!r}", "call_not_found", param="call_id")
    await call.close("hang-up (POST .../hangup)")
    return Response(status_code=200)

"""The `/ws` wire protocol (documented in docs/protocol.md): constants, frame packing/parsing and
the event dataclasses shared by the server and `vita_engine.client`.

Kept free of torch and of the server's dependencies so that the client stays light.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

PROTOCOL_VERSION = 1
OUTPUT_SAMPLE_RATE = 24000

# Client -> server binary frames: 1-byte kind prefix, then the payload.
KIND_AUDIO = 0x01  # PCM16 little-endian mono at the hello's sample_rate
KIND_IMAGE = 0x02  # a still image (JPEG or PNG bytes) -> Session.push_image
KIND_VIDEO = 0x03  # float64 LE timestamp (seconds) + JPEG/PNG bytes -> Session.push_video_frame

# Server -> client binary frames: a 16-byte header, then PCM16 LE mono at 24 kHz.
KIND_AUDIO_OUT = 0x81
AUDIO_OUT_HEADER = struct.Struct("<BBHIII")  # kind, version, reserved, seq, turn, start_sample
AUDIO_OUT_HEADER_SIZE = AUDIO_OUT_HEADER.size  # 16

# WebSocket close codes used by the server.
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # missing/invalid token, bad hello
CLOSE_TOO_BIG = 1009  # frame beyond the transport limit (the server never reads it)
CLOSE_INTERNAL = 1011
CLOSE_SERVICE_RESTART = 1012  # the replica is shutting down (drain) or was lost: reconnect
CLOSE_TRY_AGAIN = 1013  # capacity: max sessions reached or the engine is out of KV memory
CLOSE_IDLE = 4000  # no client message for idle_timeout_s
CLOSE_SESSION_LIMIT = 4001  # session older than max_session_s
CLOSE_SLOW_CLIENT = 4002  # the client read its output too slowly (send queue over send_queue_s)

MAGIC_JPEG = b"\xff\xd8\xff"
MAGIC_PNG = b"\x89PNG\r\n\x1a\n"


class ProtocolError(ValueError):
    """A malformed client frame. `code` is the machine-readable error code sent to the client."""

    def __init__(self, message: str, code: str = "bad_frame"):
        super().__init__(message)
        self.code = code


# --- event dataclasses: the runtime's when it is importable, identical stand-ins otherwise -------
try:  # pragma: no cover - depends on which branches are merged
    from vita_engine.runtime import AudioChunk, Interrupted, Metrics, TextDelta, TurnEnd  # type: ignore
except Exception:  # noqa: BLE001  (runtime absent, or its import needs something missing)

    @dataclass
    class TextDelta:  # type: ignore[no-redef]
        text: str

    @dataclass
    class AudioChunk:  # type: ignore[no-redef]
        pcm: np.ndarray
        sample_rate: int = OUTPUT_SAMPLE_RATE

    @dataclass
    class TurnEnd:  # type: ignore[no-redef]
        turn: int

    @dataclass
    class Interrupted:  # type: ignore[no-redef]
        turn: int

    @dataclass
    class Metrics:  # type: ignore[no-redef]
        turn: int
        values: Dict[str, float] = field(default_factory=dict)


@dataclass
class Ready:
    """The server accepted the hello: a session exists."""

    session: str
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Error:
    """An `error` event. `fatal` is True when the server closes the connection after it."""

    message: str
    code: str = "error"
    fatal: bool = False


# --- packing ---------------------------------------------------------------------------------------
def float_to_pcm16(pcm: np.ndarray) -> bytes:
    x = np.asarray(pcm)
    if x.dtype == np.int16:
        return x.astype("<i2", copy=False).tobytes()
    x = np.clip(np.asarray(x, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / 32768.0


def pack_audio_out(seq: int, turn: int, start_sample: int, pcm: np.ndarray) -> bytes:
    return AUDIO_OUT_HEADER.pack(KIND_AUDIO_OUT, PROTOCOL_VERSION, 0, seq & 0xFFFFFFFF, turn & 0xFFFFFFFF,
                                 start_sample & 0xFFFFFFFF) + float_to_pcm16(pcm)


def unpack_audio_out(frame: bytes) -> Tuple[int, int, int, bytes]:
    """-> (seq, turn, start_sample, pcm16 bytes)."""
    if len(frame) < AUDIO_OUT_HEADER_SIZE:
        raise ProtocolError(f"audio frame shorter than its {AUDIO_OUT_HEADER_SIZE}-byte header")
    kind, ver, _, seq, turn, start = AUDIO_OUT_HEADER.unpack_from(frame)
    if kind != KIND_AUDIO_OUT:
        raise ProtocolError(f"unknown server binary frame kind 0x{kind:02x}")
    if ver != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {ver}")
    return seq, turn, start, bytes(frame[AUDIO_OUT_HEADER_SIZE:])


def pack_audio_in(pcm: np.ndarray) -> bytes:
    return bytes([KIND_AUDIO]) + float_to_pcm16(pcm)


def pack_image_in(data: bytes) -> bytes:
    return bytes([KIND_IMAGE]) + bytes(data)


def pack_video_in(data: bytes, timestamp: float) -> bytes:
    return bytes([KIND_VIDEO]) + struct.pack("<d", float(timestamp)) + bytes(data)


def parse_binary_in(frame: bytes, max_bytes: int) -> Tuple[int, Any]:
    """Validate a client binary frame -> (kind, payload). payload: int16 ndarray for audio,
    bytes for an image, (timestamp, bytes) for a video frame. Raises ProtocolError."""
    n = len(frame)
    if n > max_bytes:
        raise ProtocolError(f"frame of {n} bytes exceeds the {max_bytes}-byte limit", "too_big")
    if n < 1:
        raise ProtocolError("empty binary frame")
    kind = frame[0]
    body = memoryview(frame)[1:]
    if kind == KIND_AUDIO:
        if len(body) % 2:
            raise ProtocolError(f"odd-length PCM16 payload ({len(body)} bytes)", "bad_audio")
        return kind, np.frombuffer(body, dtype="<i2").astype(np.int16, copy=True)
    if kind in (KIND_IMAGE, KIND_VIDEO):
        ts = None
        if kind == KIND_VIDEO:
            if len(body) < 8:
                raise ProtocolError("video frame shorter than its 8-byte timestamp", "bad_image")
            (ts,) = struct.unpack_from("<d", body)
            if not np.isfinite(ts):
                raise ProtocolError("video frame timestamp is not finite", "bad_image")
            body = body[8:]
        data = bytes(body)
        if not (data.startswith(MAGIC_JPEG) or data.startswith(MAGIC_PNG)):
            raise ProtocolError("image payload is neither JPEG nor PNG", "bad_image")
        return kind, (data if ts is None else (ts, data))
    raise ProtocolError(f"unknown binary frame kind 0x{kind:02x} (expected 0x01 audio, 0x02 image, 0x03 video)")


# --- strict JSON (RFC 8259: no NaN / Infinity; a browser's JSON.parse rejects them) ---------------
class NonFiniteNumber(ValueError):
    """A JSON text holds NaN, Infinity, -Infinity or a number that overflows a double."""


def _reject_constant(name: str):
    raise NonFiniteNumber(f"{name} is not a JSON number")


def _finite_float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise NonFiniteNumber(f"{s[:40]} overflows a double")
    return x


def _finite_int(s: str) -> int:
    digits = len(s) - s.startswith("-")
    if digits > 309 or (digits == 309 and abs(int(s)) > sys.float_info.max):  # above ~1.8e308
        raise NonFiniteNumber(f"an integer of {digits} digits overflows a double")
    return int(s)


def loads(text: str) -> Any:
    """json.loads that accepts only finite numbers (a JSON peer reads them as IEEE doubles)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_finite_int)


def _nulled(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _nulled(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nulled(v) for v in x]
    return x


def dumps(obj: Any) -> str:
    """json.dumps that never writes NaN / Infinity (allow_nan=False): a non-finite float becomes null."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:  # a non-finite float somewhere (an engine metric): null, never invalid JSON
        return json.dumps(_nulled(obj), allow_nan=False)


def dumps_strict(obj: Any) -> str:
    """json.dumps(allow_nan=False) with a message that names the problem (client side: no silent null)."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"JSON message has a NaN or infinite number, which the protocol forbids: {e}") from None


def parse_json_in(text: str, max_bytes: int) -> Dict[str, Any]:
    if len(text) > max_bytes:
        raise ProtocolError(f"message of {len(text)} characters exceeds the {max_bytes}-byte limit", "too_big")
    try:
        msg = loads(text)
    except NonFiniteNumber as e:
        raise ProtocolError(f"numbers must be finite (no NaN, Infinity or overflow): {e}", "bad_message") from None
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"invalid JSON: {e}", "bad_json") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError('a JSON message must be an object with a string "type"', "bad_json")
    return msg


def event_to_json(ev: Any, turn: Optional[int] = None) -> Optional[str]:
    """Runtime event (not AudioChunk) -> JSON text, or None for an unknown event."""
    name = type(ev).__name__
    if name == "TextDelta":
        return dumps({"type": "text", "delta": ev.text, "turn": turn})
    if name == "TurnEnd":
        return dumps({"type": "turn_end", "turn": int(ev.turn)})
    if name == "Interrupted":
        return dumps({"type": "interrupted", "turn": int(ev.turn)})
    if name == "Metrics":
        vals = {str(k): (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                for k, v in dict(ev.values).items()}
        return dumps({"type": "metrics", "turn": int(ev.turn), "values": vals})
    return None


def json_to_event(msg: Dict[str, Any]) -> Any:
    """A server JSON event -> the client-side event object (None for unknown types)."""
    t = msg.get("type")
    if t == "text":
        return TextDelta(msg.get("delta", ""))
    if t == "turn_end":
        return TurnEnd(int(msg["turn"]))
    if t == "interrupted":
        return Interrupted(int(msg["turn"]))
    if t == "metrics":
        return Metrics(int(msg["turn"]), dict(msg.get("values") or {}))
    if t == "ready":
        return Ready(str(msg.get("session", "")), {k: v for k, v in msg.items() if k not in ("type", "session")})
    if t == "error":
        return Error(str(msg.get("message", "")), str(msg.get("code", "error")), bool(msg.get("fatal", False)))
    return None

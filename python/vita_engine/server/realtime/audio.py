"""Realtime audio formats: `audio/pcm` (PCM16 LE mono 24 kHz), `audio/pcmu` (G.711 mu-law, 8 kHz),
`audio/pcma` (G.711 A-law, 8 kHz) in; PCM16 24 kHz base64 out."""
from __future__ import annotations

import base64
import binascii
from typing import Tuple

import numpy as np

from .events import ClientError

RATES = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exp, mant = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    mag = (((mant << 3) + 0x84) << exp) - 0x84
    return np.where(sign != 0, -mag, mag).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign, exp, mant = a & 0x80, (a >> 4) & 0x07, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    return np.where(sign != 0, mag, -mag).astype(np.int16)


_ULAW, _ALAW = _ulaw_table(), _alaw_table()


def b64decode(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{param} is not valid base64", "invalid_value", param) from None


def decode(data: str, fmt: str, param: str = "audio") -> Tuple[np.ndarray, int]:
    """Base64 audio in the session's input format -> (int16 samples, sample rate)."""
    raw = b64decode(data, param)
    if fmt == "audio/pcm":
        if len(raw) % 2:
            raise ClientError(f"{param}: audio/pcm is 16-bit PCM, got an odd number of bytes ({len(raw)})",
                              "invalid_value", param)
        return np.frombuffer(raw, dtype="<i2").astype(np.int16), 24000
    b = np.frombuffer(raw, dtype=np.uint8)
    return (_ULAW if fmt == "audio/pcmu" else _ALAW)[b], 8000


def encode_pcm16(pcm: np.ndarray) -> str:
    """float32 [-1, 1] 24 kHz -> base64 PCM16 LE."""
    x = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    return base64.b64encode(np.round(x * 32767.0).astype("<i2").tobytes()).decode("ascii")


def to_24k(pcm: np.ndarray, sr: int) -> np.ndarray:
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if sr == 24000 or pcm.size == 0:
        return pcm
    k = int(round(pcm.size * 24000 / sr))
    return np.interp(np.linspace(0, pcm.size - 1, k), np.arange(pcm.size), pcm).astype(np.float32)

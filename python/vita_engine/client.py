"""Async Python client for `vita-engine serve` (protocol: docs/protocol.md).

    import asyncio
    from vita_engine.client import connect, TextDelta, AudioChunk, TurnEnd

    async def main():
        async with connect("ws://127.0.0.1:8000/ws", token=None) as c:
            send = asyncio.create_task(c.stream_file("question.wav", realtime=True, trailing_silence_s=1.0))
            async for ev in c.events():
                if isinstance(ev, TextDelta): print(ev.text, end="", flush=True)
                if isinstance(ev, TurnEnd): break
            await send

`events()` yields the runtime's event dataclasses (`TextDelta`, `AudioChunk` (float32, 24 kHz),
`TurnEnd`, `Interrupted`, `Metrics`) plus `Ready` and `Error` from the protocol. Output audio
frames carry sequence numbers; `client.stats` counts frames, gaps (`lost`) and `duplicates`.
"""
from __future__ import annotations

import asyncio
import time
import wave
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Optional, Union

import numpy as np

from .server.protocol import (  # noqa: F401  (re-exported)
    AudioChunk,
    Error,
    Interrupted,
    Metrics,
    OUTPUT_SAMPLE_RATE,
    ProtocolError,
    Ready,
    TextDelta,
    TurnEnd,
    dumps_strict,
    json_to_event,
    loads,
    pack_audio_in,
    pack_image_in,
    pack_video_in,
    pcm16_to_float,
    unpack_audio_out,
)

__all__ = ["connect", "Client", "Refused", "read_wav", "TextDelta", "AudioChunk", "TurnEnd", "Interrupted",
           "Metrics", "Ready", "Error"]


class Refused(ConnectionError):
    """The server refused the session (auth, capacity, bad hello). `close_code` is the WebSocket
    close code (1008 policy/auth, 1013 capacity), `code` the protocol error code."""

    def __init__(self, message: str, code: str = "", close_code: Optional[int] = None):
        super().__init__(f"{message} (code={code}, close={close_code})")
        self.message, self.code, self.close_code = message, code, close_code


def read_wav(path: Union[str, Path]) -> tuple:
    """-> (int16 mono ndarray, sample_rate). PCM16 WAV, mono or multi-channel (averaged)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported (sample width {w.getsampwidth()})")
        sr, ch = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if ch > 1:
        x = x.reshape(-1, ch).astype(np.float32).mean(axis=1).round().astype(np.int16)
    return x.astype(np.int16), sr


def _resample_int16(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out or x.size == 0:
        return x
    n = int(round(x.size * sr_out / sr_in))
    y = np.interp(np.arange(n) * (sr_in / sr_out), np.arange(x.size), x.astype(np.float32))
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def _make(cls, *args, **extra):
    """cls(*args, **the extra fields cls has): the runtime's events carry turn/seq/offset, the
    stand-ins may not."""
    names = getattr(cls, "__dataclass_fields__", {})
    return cls(*args, **{k: v for k, v in extra.items() if k in names})


def _parse(text: str) -> Dict[str, Any]:
    """A server event; strict: NaN / Infinity (which a browser's JSON.parse rejects) is a protocol error."""
    try:
        return loads(text)
    except ValueError as e:
        raise ProtocolError(f"the server sent an event that is not strict JSON: {e}: {text[:120]!r}") from None


class Client:
    def __init__(self, ws, sample_rate: int, ready: Ready):
        self.ws = ws
        self.sample_rate = sample_rate
        self.ready = ready
        limits = ready.info.get("limits") or {}
        self.max_frame_bytes = int(limits.get("max_frame_bytes", 1 << 20))
        # frames/samples received; lost/duplicates from `seq`; sample_gaps: a frame whose
        # start_sample is not where the previous frame of its turn ended
        self.stats: Dict[str, int] = {"frames": 0, "samples": 0, "lost": 0, "duplicates": 0, "sample_gaps": 0,
                                      "sent_frames": 0}
        self._turn_end: Dict[int, int] = {}
        self.next_seq = 0
        self.last_header: Optional[tuple] = None  # (seq, turn, start_sample) of the last audio frame
        self.close_code: Optional[int] = None
        self.close_reason: str = ""

    @property
    def session_id(self) -> str:
        return self.ready.session

    # -- sending ----------------------------------------------------------------------------------
    async def send_raw(self, data: Union[bytes, str]) -> None:
        """Send one frame as is (tests of malformed input)."""
        await self.ws.send(data)

    async def send_json(self, obj: Dict[str, Any]) -> None:
        """Strict JSON: a NaN or infinite number raises ValueError (the server would reject it)."""
        await self.ws.send(dumps_strict(obj))

    async def send_audio(self, pcm: np.ndarray) -> None:
        """PCM at the hello's sample rate: int16, or float in [-1, 1]; split into frames that fit."""
        x = np.asarray(pcm)
        if x.dtype != np.int16:
            x = np.clip(np.round(np.asarray(x, dtype=np.float32) * 32767.0), -32768, 32767).astype(np.int16)
        x = x.reshape(-1)
        step = max(1, (self.max_frame_bytes - 1) // 2)
        for i in range(0, x.size, step):
            await self.ws.send(pack_audio_in(x[i:i + step]))
            self.stats["sent_frames"] += 1

    async def send_image(self, data: bytes) -> None:
        """A still image, JPEG or PNG bytes."""
        await self.ws.send(pack_image_in(data))

    async def send_video_frame(self, data: bytes, timestamp: float) -> None:
        """A camera frame (JPEG/PNG bytes) taken at `timestamp` seconds (session-relative)."""
        await self.ws.send(pack_video_in(data, timestamp))

    async def send_text(self, text: str) -> None:
        await self.send_json({"type": "text", "text": text})

    async def interrupt(self) -> None:
        await self.send_json({"type": "interrupt"})

    async def playback(self, position_s: float) -> None:
        """How many seconds of the current answer's audio were actually played."""
        await self.send_json({"type": "playback", "position_s": float(position_s)})

    async def end_turn(self) -> None:
        """Push-to-talk: the user finished speaking, answer now (no need to wait for the endpointer)."""
        await self.send_json({"type": "end_turn"})

    async def stream_file(self, wav_path: Union[str, Path], realtime: bool = True, chunk_ms: float = 20.0,
                          trailing_silence_s: float = 0.0, end_turn: bool = False) -> float:
        """Stream a WAV file as audio frames (resampled to the session rate), paced in real time
        (absolute schedule, no drift) unless realtime=False; optionally followed by silence and an
        `end_turn`. Returns the seconds of audio sent."""
        x, sr = read_wav(wav_path)
        x = _resample_int16(x, sr, self.sample_rate)
        if trailing_silence_s > 0:
            x = np.concatenate([x, np.zeros(int(trailing_silence_s * self.sample_rate), np.int16)])
        return await self.stream_pcm(x, realtime=realtime, chunk_ms=chunk_ms, end_turn=end_turn)

    async def stream_pcm(self, x: np.ndarray, realtime: bool = True, chunk_ms: float = 20.0,
                         end_turn: bool = False) -> float:
        n = max(1, int(self.sample_rate * chunk_ms / 1000))
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(x), n)):
            if realtime:
                delay = t0 + k * chunk_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.send_audio(x[i:i + n])
        if end_turn:
            await self.end_turn()
        return len(x) / self.sample_rate

    # -- receiving --------------------------------------------------------------------------------
    def _audio(self, frame: bytes) -> AudioChunk:
        seq, turn, start, pcm = unpack_audio_out(frame)
        if seq < self.next_seq:
            self.stats["duplicates"] += 1
        else:
            self.stats["lost"] += seq - self.next_seq
            self.next_seq = seq + 1
        self.last_header = (seq, turn, start)
        n = len(pcm) // 2
        if turn in self._turn_end and self._turn_end[turn] != start:
            self.stats["sample_gaps"] += 1
        self._turn_end[turn] = start + n
        self.stats["frames"] += 1
        self.stats["samples"] += n
        return _make(AudioChunk, pcm16_to_float(pcm), OUTPUT_SAMPLE_RATE, turn=turn, seq=seq, offset=start)

    async def events(self) -> AsyncIterator[Any]:
        """Events until the server closes the connection (then `close_code` is set)."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                msg = await self.ws.recv()
            except ConnectionClosed as e:
                self._closed(e)
                return
            if isinstance(msg, (bytes, bytearray)):
                yield self._audio(msg)
                continue
            m = _parse(msg)
            ev = json_to_event(m)
            if isinstance(ev, TextDelta) and m.get("turn") is not None:
                ev = _make(TextDelta, ev.text, turn=int(m["turn"]))
            if ev is not None:
                yield ev

    async def next_event(self, timeout: float = 10.0) -> Any:
        """The next event (None when the connection closed); asyncio.TimeoutError after `timeout`."""
        async def one():
            async for ev in self.events():
                return ev
            return None
        return await asyncio.wait_for(one(), timeout)

    def _closed(self, e) -> None:
        rcvd = getattr(e, "rcvd", None)
        if rcvd is not None:
            self.close_code, self.close_reason = rcvd.code, rcvd.reason
        elif self.close_code is None:
            self.close_code = getattr(self.ws, "close_code", None)

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _Connecting:
    """`await connect(...)` -> Client, or `async with connect(...) as client:`."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.client = args, kwargs, None

    def __await__(self):
        return _open(*self.args, **self.kwargs).__await__()

    async def __aenter__(self) -> Client:
        self.client = await _open(*self.args, **self.kwargs)
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


def connect(url: str, token: Optional[str] = None, sample_rate: int = 16000,
            options: Optional[Dict[str, Any]] = None, timeout: float = 30.0,
            token_in_header: bool = False, headers: Optional[Dict[str, str]] = None) -> _Connecting:
    """Open a session: WebSocket + hello, wait for `ready`. Raises `Refused` when the server says no.
    The token goes in the hello (or, with token_in_header, as `Authorization: Bearer`). `headers`:
    extra handshake headers (e.g. `x-session-id` for replica affinity, docs/ray-serve.md).
    Use as `client = await connect(...)` or `async with connect(...) as client:`."""
    return _Connecting(url, token=token, sample_rate=sample_rate, options=options, timeout=timeout,
                       token_in_header=token_in_header, headers=headers)


async def _open(url: str, token: Optional[str] = None, sample_rate: int = 16000,
                options: Optional[Dict[str, Any]] = None, timeout: float = 30.0,
                token_in_header: bool = False, headers: Optional[Dict[str, str]] = None) -> Client:
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    headers = dict(headers or {})
    if token and token_in_header:
        headers["Authorization"] = f"Bearer {token}"
    headers = headers or None
    ws = await ws_connect(url, additional_headers=headers, max_size=None, open_timeout=timeout,
                          compression=None, ping_interval=20, ping_timeout=20)
    hello: Dict[str, Any] = {"type": "hello", "sample_rate": int(sample_rate), "format": "pcm16"}
    if token and not token_in_header:
        hello["token"] = token
    if options:
        hello["options"] = dict(options)
    try:
        await ws.send(dumps_strict(hello))
        while True:
            msg = await asyncio.wait_for(ws.recv(), timeout)
            if isinstance(msg, (bytes, bytearray)):
                continue
            ev = json_to_event(_parse(msg))
            if isinstance(ev, Ready):
                return Client(ws, sample_rate, ev)
            if isinstance(ev, Error):
                err = ev
                try:  # the server closes right after a fatal error: collect the close code
                    await asyncio.wait_for(ws.recv(), 5.0)
                except ConnectionClosed as e:
                    rc = getattr(e, "rcvd", None)
                    raise Refused(err.message, err.code, rc.code if rc else None) from None
                except asyncio.TimeoutError:
                    pass
                await ws.close()
                raise Refused(err.message, err.code, None)
    except ConnectionClosed as e:
        rc = getattr(e, "rcvd", None)
        raise Refused(rc.reason if rc else "connection closed", "", rc.code if rc else None) from None
    except BaseException:
        await ws.close()
        raise

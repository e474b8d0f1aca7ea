"""Helpers for the server tests: run an app on a loopback port in a thread, make test audio."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def running_server(engine, **config):
    from vita_engine.server import BackgroundServer, ServerConfig, create_app

    app = create_app(engine, ServerConfig(**config))
    with BackgroundServer(app) as srv:
        srv.vita = app.state.vita
        yield srv


def run(coro, timeout: float = 30.0):
    """Run a coroutine in a fresh event loop with an overall time bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def http_get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode()


def healthz(srv) -> dict:
    return json.loads(http_get(srv.url + "/healthz")[2])


def metric(text: str, name: str, labels: str = "") -> float:
    """Value of one sample in Prometheus text format (0.0 when absent)."""
    key = name + (("{" + labels + "}") if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal (int16) that energy/VAD front ends take for speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum((0.6 / k) * np.sin(k * phase) for k in range(1, 12))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    x = x * env + 0.02 * rng.standard_normal(t.size)
    x = x / np.abs(x).max() * 0.5
    return np.round(x * 32767).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, sr: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return path


def png_bytes(w: int = 32, h: int = 24) -> bytes:
    from PIL import Image

    im = Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8))
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    from PIL import Image

    im = Image.fromarray((np.random.default_rng(1).random((h, w, 3)) * 255).astype(np.uint8))
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=80)
    return b.getvalue()


async def until_closed(client, timeout: float = 30.0):
    """Every event of a client connection until the server closes it."""
    evs = []

    async def go():
        async for ev in client.events():
            evs.append(ev)

    await asyncio.wait_for(go(), timeout)
    return evs


async def collect_turn(client, timeout: float = 20.0):
    """Events up to and including the next TurnEnd -> list (raises on timeout)."""
    out = []

    async def go():
        async for ev in client.events():
            out.append(ev)
            if type(ev).__name__ == "TurnEnd":
                return

    await asyncio.wait_for(go(), timeout)
    return out


def load_engine():
    """The real tiny engine when `vita_engine.runtime` is available, else the fake (-> (engine, real?))."""
    try:
        from vita_engine.runtime import Engine
    except ImportError:
        from _fake_engine import FakeEngine

        return FakeEngine(), False
    # the tiny random model rarely stops by itself, and its TTS speaks ~12 codec tokens (0.3 s) per text
    # token: bound the answers (text, and 0.6 s of audio per TTS segment) so the tests stay fast
    try:
        return Engine.from_pretrained("tiny", device="cpu", max_new_tokens=24, tts_max_tokens=24), True
    except TypeError:  # a runtime without that option
        return Engine.from_pretrained("tiny", device="cpu"), True


def kv_free(engine) -> tuple:
    """(free, reserved) KV blocks of an engine (real: its KVPool; fake: its page counter)."""
    kv = getattr(engine, "kv", None)
    if kv is not None and hasattr(kv, "free_blocks"):
        return int(kv.free_blocks), int(getattr(kv, "reserved_blocks", 0))
    return int(engine.kv_free), 0


def speech_sample(name: str):
    """A bundled speech sample (vita_engine.data) as int16 at 16 kHz, or None when not shipped."""
    try:
        from vita_engine.data import load_sample
    except ImportError:
        return None
    try:
        x, sr = load_sample(name)
    except FileNotFoundError:
        return None
    if sr != 16000:
        from vita_engine.client import _resample_int16

        return _resample_int16(np.round(x * 32767).astype(np.int16), sr, 16000)
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


class RawClient:
    """A WebSocket client on a plain blocking socket (websockets' sans-I/O protocol) that reads
    only when told to: a test can stall it for real. `rcvbuf` shrinks its kernel receive buffer (set
    before connect, so the TCP window it advertises stays small)."""

    def __init__(self, url: str, rcvbuf: int = 0, timeout: float = 10.0):
        import socket

        from websockets.client import ClientProtocol
        from websockets.protocol import State
        from websockets.uri import parse_uri

        u = parse_uri(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((u.host, u.port))
        self.addr = self.sock.getsockname()
        self.proto = ClientProtocol(u, max_size=None)
        self.frames: list = []  # received frames: ("text", dict) / ("binary", bytes) in order
        self.eof = self.reset = False
        self.proto.send_request(self.proto.connect())
        self._flush()
        deadline = time.monotonic() + timeout
        while self.proto.state == State.CONNECTING:
            assert self._read_some(deadline), "no handshake response"
        assert self.proto.handshake_exc is None and self.proto.state == State.OPEN, self.proto.handshake_exc

    def _pending(self) -> None:
        from websockets.frames import Opcode

        for ev in self.proto.events_received():
            op = getattr(ev, "opcode", None)
            if op == Opcode.TEXT:
                self.frames.append(("text", json.loads(ev.data)))
            elif op == Opcode.BINARY:
                self.frames.append(("binary", bytes(ev.data)))
        self._flush()  # pong / close replies the protocol queued

    def _flush(self) -> None:
        data = b"".join(self.proto.data_to_send())
        if data and not (self.eof or self.reset):
            try:
                self.sock.sendall(data)
            except OSError:
                self.reset = True

    def _read_some(self, deadline: float) -> bool:
        """One recv (until deadline): False at EOF/reset/timeout."""
        import socket

        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            self.reset = True
            return False
        if not data:
            self.eof = True
            self.proto.receive_eof()
            return False
        self.proto.receive_data(data)
        self._pending()
        return True

    def send_json(self, obj) -> None:
        self.proto.send_text(json.dumps(obj).encode())
        self._flush()

    def read_until_closed(self, timeout: float) -> bool:
        """Read everything until the connection ends (EOF or reset) -> True, or False at timeout."""
        deadline = time.monotonic() + timeout
        while not (self.eof or self.reset) and time.monotonic() < deadline:
            self._read_some(deadline)
        return self.eof or self.reset

    @property
    def close_code(self):
        rc = self.proto.close_rcvd
        return rc.code if rc is not None else None

    def texts(self) -> list:
        return [m for kind, m in self.frames if kind == "text"]

    def close(self) -> None:
        self.sock.close()


def server_sockets(port: int, peer=None) -> list:
    """This process's open TCP sockets on local port `port` (the server's side of its connections),
    optionally only the one whose remote end is `peer` (host, port) -> psutil connection entries."""
    import psutil

    out = []
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.laddr and c.laddr.port == port and c.raddr and (peer is None or tuple(c.raddr) == tuple(peer)):
            out.append(c)
    return out

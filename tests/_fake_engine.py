"""A small stand-in for `vita_engine.runtime.Engine` with the exact DESIGN §6 interface, used by the
fast protocol tests of the server (no model, no torch work).

A turn starts after voiced audio (|x| > ~0.015) followed by `pause_s` of no voice (silence frames or
nothing at all), or at once on `push_text`. It then emits `n_text` TextDeltas and `n_chunks`
AudioChunks of `chunk_s` seconds each (24 kHz sine), paced by `delay_s`, then Metrics and TurnEnd.
`interrupt()` stops it: Interrupted, Metrics, TurnEnd, no audio after Interrupted. Each session
holds `pages_per_session` KV "pages" (+1 per turn) of a pool of `kv_pages`, freed on close;
creating a session with too few free pages raises CapacityError.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


class CapacityError(RuntimeError):
    pass


# The event classes below deliberately carry only the fields DESIGN §6 promises (no turn/seq/offset
# extras of vita_engine.runtime.events): the server must work with any engine honouring the contract.


@dataclass
class TextDelta:
    text: str


@dataclass
class AudioChunk:
    pcm: np.ndarray
    sample_rate: int = 24000


@dataclass
class TurnEnd:
    turn: int


@dataclass
class Interrupted:
    turn: int


@dataclass
class Metrics:
    turn: int
    values: Dict[str, float] = field(default_factory=dict)


class FakeSession:
    def __init__(self, engine: "FakeEngine", system_prompt: Optional[str]):
        self.engine, self.system_prompt = engine, system_prompt
        self.pages = engine.pages_per_session
        self.closed = False
        self.turn = 0
        self.audio_samples = 0
        self.audio: List[np.ndarray] = []  # every pushed chunk (tests inspect it)
        self.sample_rates: List[int] = []
        self.images: list = []
        self.video: list = []
        self.texts: List[str] = []
        self.playback: List[float] = []
        self.interrupts = 0
        self._voiced = False
        self._last_voice = 0.0
        self._text_pending = False
        self._interrupt = False
        self._in_turn = False

    # -- input --------------------------------------------------------------------------------------
    def _poke(self):
        pass

    def push_audio(self, pcm, sample_rate):
        assert not self.closed, "push_audio on a closed session"
        x = np.asarray(pcm)
        self.sample_rates.append(int(sample_rate))
        self.audio_samples += x.size
        self.audio.append(x.copy())
        amp = np.abs(x.astype(np.float32) / (32768.0 if x.dtype == np.int16 else 1.0))
        if x.size and float(amp.max()) > 0.015:
            self._voiced = True
            self._last_voice = time.monotonic()
        self._poke()

    def push_image(self, img):
        self.images.append(img)

    def push_video_frame(self, frame, timestamp):
        self.video.append((frame, timestamp))

    def push_text(self, text):
        self.texts.append(text)
        self._text_pending = True
        self._last_voice = time.monotonic()
        self._poke()

    def interrupt(self):
        self.interrupts += 1
        if self._in_turn:
            self._interrupt = True

    def playback_position(self, seconds):
        self.playback.append(float(seconds))

    def close(self):
        if not self.closed:
            self.closed = True
            self.engine._free(self)
            self._poke()

    # -- output -------------------------------------------------------------------------------------
    async def events(self):
        e = self.engine
        while not self.closed:
            now = time.monotonic()
            due = self._text_pending or (self._voiced and now - self._last_voice >= e.pause_s)
            if not due:  # poll (asyncio.wait_for can swallow a cancellation on Python < 3.12)
                await asyncio.sleep(0.01)
                continue
            self._text_pending = self._voiced = False
            last_voice = self._last_voice
            t_decide = time.monotonic()
            turn = self.turn
            self._in_turn, self._interrupt = True, False
            self.pages += 1
            e.kv_free -= 1
            first_audio = None
            interrupted = False
            words = e.text.split()
            for i in range(max(e.n_text, e.n_chunks)):
                if self.closed:
                    return
                if self._interrupt:
                    interrupted = True
                    break
                if i < e.n_text:
                    yield TextDelta((" " if i else "") + words[i % len(words)])
                if i < e.n_chunks:
                    n = int(e.chunk_s * 24000)
                    t = (np.arange(n) + i * n) / 24000.0
                    if first_audio is None:
                        first_audio = time.monotonic()
                    yield AudioChunk((0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32), 24000)
                await asyncio.sleep(e.delay_s)
                if self.closed:
                    return
            if interrupted or self._interrupt:
                yield Interrupted(turn)
            first_audio = first_audio or time.monotonic()
            yield Metrics(turn, {"ttfa_ms": (first_audio - t_decide) * 1e3,
                                 "response_ms": (first_audio - last_voice) * 1e3})
            self._in_turn = False
            self.turn += 1
            yield TurnEnd(turn)


class FakeEngine:
    def __init__(self, kv_pages: int = 256, pages_per_session: int = 4, n_text: int = 3, n_chunks: int = 5,
                 chunk_s: float = 0.1, delay_s: float = 0.02, pause_s: float = 0.25,
                 text: str = "hello from the fake engine"):
        self.kv_total = self.kv_free = kv_pages
        self.pages_per_session = pages_per_session
        self.n_text, self.n_chunks, self.chunk_s, self.delay_s, self.pause_s = n_text, n_chunks, chunk_s, delay_s, pause_s
        self.text = text
        self.sessions: List[FakeSession] = []

    def session(self, system_prompt=None) -> FakeSession:
        if self.kv_free < self.pages_per_session:
            raise CapacityError(f"KV cache full: {self.kv_free} pages free, a session needs {self.pages_per_session}")
        self.kv_free -= self.pages_per_session
        s = FakeSession(self, system_prompt)
        self.sessions.append(s)
        return s

    def _free(self, s: FakeSession) -> None:
        self.kv_free += s.pages
        s.pages = 0

    @property
    def open_sessions(self) -> int:
        return sum(not s.closed for s in self.sessions)

    @property
    def stats(self) -> dict:
        """The KV keys of Engine.stats (the server's /metrics exports them); nothing is "reserved" here."""
        return {"sessions": self.open_sessions, "kv_blocks": self.kv_total, "kv_free_blocks": self.kv_free,
                "kv_reserved_blocks": 0, "kv_block_size": 16,
                "kv_session_blocks": sorted((s.pages for s in self.sessions if not s.closed), reverse=True)}

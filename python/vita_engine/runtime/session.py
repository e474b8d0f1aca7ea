"""`Session`: one conversation (docs/architecture.md §5). Thread-safe: push_* / interrupt / close may be called
from any thread (or an asyncio loop); the Engine's scheduler thread does all model work and delivers
events to `events()` (asyncio) or to the synchronous helpers (`next_event`, `collect`, `run_turn`).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from . import _compat
from .events import AudioChunk, Interrupted, Metrics, SessionClosedError, TextDelta, TurnEnd

__all__ = ["Session", "TurnResult"]

_CLOSED = object()


class _EventSink:
    """The session's event queue, shared by every consumer: `events()` iterators (on any event loop,
    one after another: each `asyncio.run(...)` may drain a turn) and the synchronous helpers. An
    event put while no consumer waits, or while a finished loop is bound, stays queued."""

    def __init__(self):
        self._cv = threading.Condition()
        self._items: "collections.deque" = collections.deque()
        self._waiters: List[tuple] = []  # (loop, future) of events() iterators awaiting an event

    def put(self, ev) -> None:
        with self._cv:
            self._items.append(ev)
            self._cv.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed: the event waits for the next consumer
                pass

    def get(self, timeout: Optional[float]):
        with self._cv:
            if not self._cv.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            return self._items.popleft()

    async def aget(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cv:
                if self._items:
                    return self._items.popleft()
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await fut
            finally:
                with self._cv:
                    self._waiters = [w for w in self._waiters if w[1] is not fut]


def _wake(fut) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class TurnResult:
    turn: int
    text: str
    audio: np.ndarray                  # float32, 24 kHz
    sample_rate: int
    metrics: Dict[str, float]
    interrupted: bool
    events: List[object] = field(default_factory=list)


class Session:
    """Create with `engine.session(system_prompt=None)`. See docs/architecture.md §5 for the event contract."""

    def __init__(self, engine, sid: int, system_prompt: Optional[str], seed: int, temperature: float, top_k: int,
                 max_new_tokens: int):
        self.engine = engine
        self.id = sid
        self.system_prompt = system_prompt
        self.seed, self.temperature, self.top_k, self.max_new_tokens = int(seed), float(temperature), int(top_k), int(max_new_tokens)
        self._sink = _EventSink()
        self._inbox: "collections.deque" = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._released = threading.Event()  # set by the scheduler once the pages are free
        self._ended = False
        self._resamplers: Dict[int, object] = {}
        self._playback_s: Optional[float] = None
        self._state = None  # SessionState, set by the scheduler

    # ---- input -------------------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise SessionClosedError(f"Session.{what}: session {self.id} is closed")

    _API_NAME = {"audio": "push_audio", "image": "push_image", "frame": "push_video_frame", "text": "push_text",
                 "config": "configure", "truncate": "truncate_answer"}

    def _send(self, *cmd) -> None:
        with self._lock:
            self._check_open(self._API_NAME.get(cmd[0], cmd[0]))
            self._inbox.append(cmd)
        self.engine._scheduler.wake()

    def push_audio(self, pcm, sample_rate: int = 16000) -> None:
        """Append microphone audio: any chunk size, int16 or float32 (or float64) mono/stereo, any
        rate in [8, 192] kHz (resampled to 16 kHz, state kept per rate). Raises ValueError/TypeError
        on bad input (NaN, empty, wrong dtype, too long) and SessionClosedError after close()."""
        self._check_open("push_audio")
        x = _compat.to_float32_mono(pcm, sample_rate=sample_rate, name="push_audio: pcm",
                                    max_seconds=self.engine.options["max_push_seconds"])
        sr = int(sample_rate)
        with self._lock:
            r = self._resamplers.get(sr)
            if r is None and sr != 16000:
                r = self._resamplers[sr] = _compat.Resampler(sr, 16000)
            y = x if r is None else r.process(x)
        if y.size:
            self._send("audio", np.ascontiguousarray(y, dtype=np.float32), time.perf_counter())

    def push_image(self, img) -> None:
        """Attach an image (PIL image, HxWx3 uint8 array, or pixel_values) to the next turn: dynamic
        tiling as the vision tower's preprocess; tokens go first in the user turn."""
        self._check_open("push_image")
        pv = self.engine._preprocess_image(img, max_tiles=None)
        self._send("image", pv, time.perf_counter())

    def push_video_frame(self, frame, timestamp: float) -> None:
        """A camera frame (one 448x448 tile, no tiling) seen at `timestamp` seconds; the next turn
        uses up to 4 frames evenly spaced over those pushed since the previous turn."""
        self._check_open("push_video_frame")
        ts = float(timestamp)
        if not np.isfinite(ts):
            raise ValueError(f"push_video_frame: timestamp must be a finite number of seconds, got {timestamp!r}")
        pv = self.engine._preprocess_image(frame, max_tiles=1)
        self._send("frame", pv, ts)

    def push_text(self, text: str) -> None:
        """A typed user turn. Queued behind the turn in flight, if any."""
        if not isinstance(text, str):
            raise TypeError(f"push_text: text must be str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("push_text: text is empty")
        self._send("text", text, time.perf_counter())

    def interrupt(self) -> None:
        """Stop the answer in flight (if any) within one scheduler tick: Interrupted, no more audio,
        then Metrics and TurnEnd; the history keeps only the text whose audio was delivered."""
        self._send("interrupt", time.perf_counter())

    def playback_position(self, seconds: float) -> None:
        """Report how many seconds of the current answer's audio the client has actually played;
        barge-in then trims the history to that point (default: all emitted audio counts)."""
        s = float(seconds)
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"playback_position: seconds must be >= 0, got {seconds!r}")
        self._playback_s = s

    _CONFIG_KEYS = ("manual", "vad", "preroll_ms", "barge_in", "input_events", "auto_respond", "speak",
                    "max_new_tokens", "system_prompt")

    def configure(self, **opts) -> None:
        """Per-session turn-taking and answer options (the Realtime API's session config), applied on
        the scheduler thread in order with the inputs:
          manual (bool): no VAD turn taking; turns start with `respond()` only;
          vad (dict of VADConfig fields): this session's VAD (a new detector: its stream time goes on);
          preroll_ms (int): audio kept before the detected speech start;
          barge_in (bool): speech during an answer interrupts it;
          input_events (bool): also emit SpeechStarted / SpeechStopped / TurnStarted;
          auto_respond (bool): a VAD end of turn starts the answer (False: the utterance is held for
            `respond()`);
          speak (bool), max_new_tokens (int): defaults for the turns that do not set them;
          system_prompt (str): the system prompt; after the first turn the history is replayed
            behind the new one at the next turn (no re-encode of audio or images)."""
        unknown = set(opts) - set(self._CONFIG_KEYS)
        if unknown:
            raise TypeError(f"Session.configure: unknown options {sorted(unknown)}; known: {list(self._CONFIG_KEYS)}")
        cfg = dict(opts)
        v = cfg.get("vad")
        if isinstance(v, dict):  # fields over the engine's VAD config; ValueError on bad values, here
            if "threshold" in v and "neg_threshold" not in v:
                v = {**v, "neg_threshold": None}  # derived from the new threshold
            try:
                cfg["vad"] = dataclasses.replace(self.engine.vad_config, **v)
            except TypeError as e:
                raise ValueError(f"Session.configure: vad: {e}") from None
        for k in ("preroll_ms", "max_new_tokens"):
            if cfg.get(k) is not None:
                n = cfg[k]
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"Session.configure: {k} must be an integer >= 0, got {n!r}")
        sp = cfg.get("system_prompt")
        if sp is not None and not isinstance(sp, str):
            raise TypeError(f"Session.configure: system_prompt must be str, got {type(sp).__name__}")
        self._send("config", cfg)

    def respond(self, audio=None, sample_rate: int = 16000, *, text: Optional[str] = None,
                speak: Optional[bool] = None, max_new_tokens: Optional[int] = None) -> None:
        """Start a turn now (queued behind the turn in flight): the user block holds `audio` (a whole
        utterance, encoded at once), else the utterances the VAD held (auto_respond off), plus `text`.
        `speak=False`: a text-only answer (no TTS work). ValueError when there is nothing to answer is
        not raised here: such a turn fails with an Error event."""
        self._check_open("respond")
        x = None
        if audio is not None:
            x = _compat.to_float32_mono(audio, sample_rate=sample_rate, name="respond: audio",
                                        max_seconds=self.engine.options["max_push_seconds"])
            if int(sample_rate) != 16000:
                x = _compat.Resampler(int(sample_rate), 16000).process(x)
        if text is not None and not isinstance(text, str):
            raise TypeError(f"respond: text must be str or None, got {type(text).__name__}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 0):
            raise ValueError(f"respond: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self._send("respond", x, text or None, {"speak": speak, "max_new_tokens": max_new_tokens}, time.perf_counter())

    def clear_held(self) -> None:
        """Drop the utterances held for `respond()` (auto_respond off)."""
        self._send("clear_held")

    def truncate_answer(self, turn: int, seconds: float) -> None:
        """After turn `turn` ended: the client played only its first `seconds` of audio; the history
        (KV cache and the record replayed on eviction) keeps only the answer text spoken by then, so
        the next turn's prompt no longer holds what was never heard. Only the latest finished turn,
        and only while no later turn is committed (a speculative one is discarded and redone)."""
        s = float(seconds)
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"truncate_answer: seconds must be >= 0, got {seconds!r}")
        self._send("truncate", int(turn), s)

    def close(self, wait: bool = True) -> None:
        """Stop everything and free the KV pages (waits for the scheduler, about one tick, unless
        `wait=False` or called from the scheduler thread); `events()` ends. Idempotent."""
        with self._lock:
            first = not self._closed
            self._closed = True
            if first:
                self._inbox.append(("close",))
        if first:
            self.engine._scheduler.wake()
        sch = self.engine._scheduler
        if wait and sch.alive and threading.current_thread() is not sch._thread:
            self._released.wait(timeout=10.0)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> dict:
        """Counters: prefill_tokens (total), turn_prefill_tokens (per turn, by the turn itself),
        prefix_tokens (of those, prefilled ahead of a turn: its images, prefix_stage.py), prefix_hits /
        prefix_misses / prefix_dropped, decode_tokens, evictions, ..."""
        st = self._state
        return {} if st is None else {k: (list(v) if isinstance(v, list) else v) for k, v in st.stats.items()}

    @property
    def kv_length(self) -> int:
        st = self._state
        return 0 if st is None else st.seq.length

    # ---- output ------------------------------------------------------------------------------------
    async def events(self):
        """Async iterator over TextDelta, AudioChunk, Interrupted, Metrics, TurnEnd (, Error); ends
        after close(). It may be left (break) and started again, on the same or another event loop
        (events not yet consumed stay queued), and mixed with the synchronous helpers."""
        if self._ended:
            return
        while True:
            ev = await self._sink.aget()
            if ev is _CLOSED:
                self._ended = True
                return
            yield ev

    def next_event(self, timeout: Optional[float] = None):
        """Synchronous: the next event (None once the session is closed and drained)."""
        if self._ended:
            return None
        try:
            ev = self._sink.get(timeout)
        except queue.Empty:
            raise TimeoutError(f"Session {self.id}: no event within {timeout} s") from None
        if ev is _CLOSED:
            self._ended = True
            return None
        return ev

    def collect(self, timeout: float = 60.0) -> List[object]:
        """Synchronous: events up to and including the next TurnEnd."""
        out, end = [], time.monotonic() + timeout
        while True:
            ev = self.next_event(timeout=max(0.0, end - time.monotonic()))
            if ev is None:
                return out
            out.append(ev)
            if isinstance(ev, TurnEnd):
                return out

    def run_turn(self, audio=None, sample_rate: int = 16000, *, text: Optional[str] = None, image=None,
                 chunk_ms: float = 100.0, realtime: bool = False, trailing_silence_ms: Optional[float] = None,
                 timeout: float = 120.0) -> TurnResult:
        """Synchronous helper: push an image (optional), then either `text` or `audio` (in `chunk_ms`
        chunks, paced in real time if `realtime`, followed by silence so the VAD ends the turn), and
        collect the turn's events."""
        if (audio is None) == (text is None):
            raise ValueError("run_turn: pass exactly one of audio or text")
        if image is not None:
            self.push_image(image)
        if text is not None:
            self.push_text(text)
        else:
            feed_audio(self, audio, sample_rate, chunk_ms=chunk_ms, realtime=realtime,
                       trailing_silence_ms=trailing_silence_ms)
        evs = self.collect(timeout)
        return summarize_turn(evs)


def feed_audio(session: Session, audio, sample_rate: int, *, chunk_ms: float = 100.0, realtime: bool = False,
               trailing_silence_ms: Optional[float] = None, sleep=time.sleep) -> None:
    """Push `audio` in chunks, then enough silence for the VAD to end the turn."""
    x = np.asarray(audio)
    n = max(1, int(sample_rate * chunk_ms / 1000))
    if trailing_silence_ms is None:
        trailing_silence_ms = session.engine.vad_config.min_silence_ms + 300
    sil = np.zeros(int(sample_rate * trailing_silence_ms / 1000), dtype=x.dtype)
    t0 = time.perf_counter()
    pos = 0
    for buf in (x, sil):
        for i in range(0, len(buf), n):
            c = buf[i:i + n]
            if realtime:
                lag = t0 + pos / sample_rate - time.perf_counter()
                if lag > 0:
                    sleep(lag)
            session.push_audio(c, sample_rate)
            pos += len(c)


def summarize_turn(evs: List[object]) -> TurnResult:
    text = "".join(e.text for e in evs if isinstance(e, TextDelta))
    chunks = [e.pcm for e in evs if isinstance(e, AudioChunk)]
    sr = next((e.sample_rate for e in evs if isinstance(e, AudioChunk)), 24000)
    met = next((e.values for e in evs if isinstance(e, Metrics)), {})
    te = next((e.turn for e in evs if isinstance(e, TurnEnd)), -1)
    return TurnResult(te, text, np.concatenate(chunks) if chunks else np.zeros(0, np.float32), sr, met,
                      any(isinstance(e, Interrupted) for e in evs), evs)

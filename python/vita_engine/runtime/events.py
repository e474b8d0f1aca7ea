"""Events a Session delivers (docs/architecture.md §5) and the runtime's error types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import numpy as np

__all__ = ["TextDelta", "AudioChunk", "TurnEnd", "Interrupted", "Metrics", "Error", "Event",
           "SpeechStarted", "SpeechStopped", "TurnStarted", "CapacityError", "SessionClosedError"]


@dataclass
class TextDelta:
    """A piece of the assistant's answer text (decoded incrementally; concatenation = full text)."""
    text: str
    turn: int = 0


@dataclass
class AudioChunk:
    """Output speech: float32 mono in [-1, 1] at `sample_rate` (24 kHz). `seq` counts the session's
    chunks from 0 (no gaps), `offset` is the turn-relative index of the first sample."""
    pcm: np.ndarray
    sample_rate: int = 24000
    turn: int = 0
    seq: int = 0
    offset: int = 0


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


@dataclass
class Error:
    """A turn failed (e.g. the prompt alone exceeds the session's token budget); followed by
    Metrics and TurnEnd of that turn."""
    turn: int
    message: str


@dataclass
class SpeechStarted:
    """Input events (only with `Session.configure(input_events=True)`): the VAD heard speech start at
    `audio_start_ms` (ms of 16 kHz input since the session started, pre-roll padding included)."""
    audio_start_ms: float


@dataclass
class SpeechStopped:
    """Input event: the utterance ended at `audio_end_ms`. `status`: "turn" (a turn answers it, now
    or after the turn in flight), "held" (kept for `respond()`: auto_respond off) or "discarded"
    (shorter than the VAD's min_speech_ms: no turn)."""
    audio_start_ms: float
    audio_end_ms: float
    status: str = "turn"


@dataclass
class TurnStarted:
    """Input event: turn `turn` is committed (its answer's events follow); `kind` "audio" | "text"."""
    turn: int
    kind: str = "audio"


Event = object


class CapacityError(RuntimeError):
    """The engine cannot admit a new session (KV pages or session slots exhausted). Existing
    sessions are unaffected; retry later or raise the engine's `max_sessions` / KV budget."""


class SessionClosedError(RuntimeError):
    """The session was closed; it accepts no more input."""

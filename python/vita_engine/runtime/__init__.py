"""Real-time runtime (docs/architecture.md §5): Engine, Session, events, paged KV pool, scheduler."""
from .._errors import require_torch

require_torch(__name__)  # first: a clear message, not a traceback, when torch is missing
from .events import AudioChunk, CapacityError, Error, Interrupted, Metrics, SessionClosedError, TextDelta, TurnEnd
from .engine import Engine
from .session import Session, TurnResult

__all__ = ["Engine", "Session", "TurnResult", "TextDelta", "AudioChunk", "TurnEnd", "Interrupted", "Metrics", "Error",
           "CapacityError", "SessionClosedError"]

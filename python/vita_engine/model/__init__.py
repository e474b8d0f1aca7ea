"""The VITA-1.5 model on vita_engine ops: config parsing, checkpoint loading and every component."""
from .._errors import require_torch

require_torch(__name__)  # first: a clear message, not a traceback, when torch is missing
from .llm import LLM
from .loading import CheckpointError
from .vita import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX, VitaModel

__all__ = ["LLM", "VitaModel", "CheckpointError", "IMAGE_TOKEN_INDEX", "AUDIO_TOKEN_INDEX"]

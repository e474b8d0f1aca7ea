"""One import point for the parts of the pipeline written on other branches (now all merged):
audio input, VAD, incremental audio frontend, bundled samples, batched TTS, text segmenter.
(The temporary stand-ins that lived here until the audio/tts/codec branches landed are gone.)"""
from __future__ import annotations

from ..data import load_sample  # noqa: F401
from ..model.tts_batch import TTSBatchDecoder, TTSCapacityError  # noqa: F401
from .audio_in import Resampler, to_float32_mono  # noqa: F401
from .frontend import IncrementalAudioFrontend  # noqa: F401
from .text_segmenter import TextSegmenter, normalize_tts_text  # noqa: F401
from .vad import SpeculativeEnd, SpeechDiscarded, SpeechResumed, SpeechStart, StreamingVAD, TurnEnd, VADConfig  # noqa: F401


def load_codec_fallback(model_path):
    """The codec now loads with the model (VitaModel.codec); kept for checkpoints without one."""
    return None

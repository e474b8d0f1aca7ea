"""Scheduler-side state of a session and of its turn in flight (owned by the scheduler thread)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Deque, List, Optional, Tuple

import numpy as np
import torch

from .metrics import TurnClock

__all__ = ["Segment", "Turn", "TurnRecord", "SessionState", "Visual", "Prefix"]


@dataclass
class Segment:
    """A piece of answer text handed to the TTS, with the LLM tokens it covers."""
    text: str
    tok_start: int
    tok_end: int
    text_ids: List[int]
    sid: Optional[int] = None          # TTS stream id once started
    codec: List[int] = field(default_factory=list)
    pushed: int = 0                    # codec tokens collected into the turn's codec queue (Turn.collect_codec)
    tts_done: bool = False
    waiting_since: Optional[float] = None  # first TTSCapacityError (the segment waits for a free slot/pages)
    dropped: bool = False              # never spoken: TTS capacity exhausted (reported with an Error event)


@dataclass
class TurnRecord:
    """What a finished turn left in the KV cache, kept to replay it after evicting older turns."""
    x_user: torch.Tensor               # spliced input embeddings of the user block + assistant header
    answer_ids: List[int]


@dataclass
class Turn:
    idx: int
    kind: str                          # "audio" | "text"
    clock: TurnClock
    x: torch.Tensor                    # prompt embeddings still to prefill ([n, hidden])
    kv_start: int                      # session KV length before this turn
    restore: Tuple[Any, ...]           # (needs_close, unfed_ids, sys_len, records) to undo the turn
    record_x: torch.Tensor             # user-block embeddings for the history record
    max_new_tokens: int
    speculative: bool = False
    spec_end_ms: Optional[float] = None
    state: str = "prefill"             # prefill | ready | decode | speak
    prefilled: int = 0
    held_token: Optional[int] = None
    tokens: List[int] = field(default_factory=list)
    n_fed: int = 0
    llm_done: bool = False
    detok: Any = None
    segmenter: Any = None
    seg_tokens: int = 0                # tokens whose text went into the segmenter
    segments: List[Segment] = field(default_factory=list)
    head: int = 0                      # first segment whose codec tokens are not all collected
    codec_pending: List[int] = field(default_factory=list)  # collected in segment order, not yet pushed
    codec_pushed: int = 0              # codec tokens pushed into the turn's codec stream
    codec_stream: Any = None
    samples: int = 0                   # PCM samples emitted
    text: str = ""
    speak: bool = True                 # False: a text-only answer (no TTS work; segments are never spoken)
    frames_seen: List[Any] = field(default_factory=list)  # camera frames pending at the start (spent by the commit)
    prefix_tokens: int = 0             # tokens of x already in the KV at the start (a Prefix prefilled ahead)

    @property
    def prompt_end(self) -> int:
        return self.kv_start + int(self.x.shape[0])

    def collect_codec(self) -> None:
        """Move the codec tokens that are next in playback order (the head segment's, then the next
        segment's once the head one is finished) into `codec_pending`."""
        while self.head < len(self.segments):
            seg = self.segments[self.head]
            if seg.pushed < len(seg.codec):
                self.codec_pending += seg.codec[seg.pushed:]
                seg.pushed = len(seg.codec)
            if not seg.tts_done:
                break
            self.head += 1

    @property
    def codec_available(self) -> int:
        """Codec tokens in playback order so far (pushed + pending; call collect_codec first)."""
        return self.codec_pushed + len(self.codec_pending)

    @property
    def tts_idle(self) -> bool:
        """No segment is waiting for or in TTS: more audio needs more text from the LLM."""
        return all(g.tts_done for g in self.segments)


class UnspokenSegments(list):
    """`Turn.segments` of a text-only turn: every segment the LLM stage hands over is marked done and
    without TTS text, so the TTS and codec stages never see work for it (and the policy decodes it as
    a turn without TTS)."""

    def append(self, seg: Segment) -> None:
        seg.text_ids, seg.tts_done = [], True
        super().append(seg)


class Visual:
    """A pushed image or camera frame: its pixel values until the vision stage (or the turn start)
    encodes it, then only its features [tiles, tokens, hidden] (smaller than the pixels at the real
    sizes: 256 x 3584 bf16 against 3 x 448 x 448 float32 per tile)."""

    __slots__ = ("pv", "feats", "ts", "arrived")

    def __init__(self, pv: torch.Tensor, ts: Optional[float], arrived: float):
        self.pv: Optional[torch.Tensor] = pv
        self.feats: Optional[torch.Tensor] = None
        self.ts = ts            # the client's timestamp (frames), None for images
        self.arrived = arrived  # time.perf_counter() at the push

    @property
    def tiles(self) -> int:
        return int((self.pv if self.feats is None else self.feats).shape[0])


class Prefix:
    """The start of the next turn's prompt, prefilled into the session's KV while the user still speaks
    (prefix_stage.py): the close of the previous answer, the system prompt on the first turn,
    `<|im_start|>user\n` and the pushed images' tokens, which the chat template puts before the text
    and audio, so they do not depend on what the user says next. Its KV sits at kv_start ..
    kv_start + prefilled of the session's sequence, right after the history."""

    __slots__ = ("x", "kv_start", "prefilled", "head_key", "visuals", "ends", "refs")

    def __init__(self, x: torch.Tensor, kv_start: int, head_key: Tuple, visuals: List["Visual"], ends: List[int],
                 refs: Tuple = ()):
        self.x = x                      # [P, hidden] embeddings of the prefix
        self.kv_start = kv_start        # session KV length before it (the end of the history)
        self.prefilled = 0              # tokens of x in the KV
        self.head_key = head_key        # what the part before the images was built from
        self.visuals = visuals          # the pushed images it covers, in push order
        self.ends = ends                # token end of each visual in x
        self.refs = refs                # objects whose id() is in head_key (kept alive: ids stay unique)

    @property
    def remaining(self) -> int:
        return int(self.x.shape[0]) - self.prefilled

    @property
    def next_arrival(self) -> float:
        """Push time of the first image whose tokens are not all in the KV (the policy's order)."""
        for v, end in zip(self.visuals, self.ends):
            if end > self.prefilled:
                return v.arrived
        return self.visuals[-1].arrived if self.visuals else 0.0


class SessionState:
    def __init__(self, session, seq, reserved_blocks: int, vad, frontend, preroll_samples: int):
        self.session = session
        self.seq = seq
        self.reserved_blocks = reserved_blocks
        self.vad, self.frontend = vad, frontend
        self.preroll = preroll_samples
        self.n_samples = 0                                 # 16 kHz samples seen
        self.arrivals: Deque[Tuple[int, float]] = collections.deque(maxlen=4096)  # (end sample, wall time)
        self.hist = np.zeros(0, np.float32)                # recent audio (pre-roll)
        self.utt_start: Optional[int] = None               # sample index of the utterance's first sample
        self.spec_request: Optional[Tuple[float, float]] = None  # (SpeculativeEnd speech_end_ms, time): not yet served
        self.pending_images: List[Visual] = []             # for the next turn, in push order
        self.pending_frames: List[Visual] = []             # camera frames since the last turn (<= 64)
        self.queued_texts: Deque[Tuple[str, float]] = collections.deque()
        self.records: List[TurnRecord] = []
        self.sys_len: Optional[int] = None                 # KV length of the system prompt
        self.needs_close = False
        self.unfed_ids: List[int] = []                     # answer tokens emitted but not in the KV
        self.turn: Optional[Turn] = None
        self.next_turn = 0
        self.gen_step = 0
        self.chunk_seq = 0
        self.closed = False
        # Session.configure() (the Realtime API's session options); defaults = the engine's behaviour
        self.manual = False                                # no VAD turn taking: turns start by respond() only
        self.barge_in: Optional[bool] = None               # None: the engine's barge_in option
        self.input_events = False                          # emit SpeechStarted / SpeechStopped / TurnStarted
        self.auto_respond = True                           # a VAD end of turn starts the answer
        self.speak = True                                  # default of turns that do not say
        self.max_new_tokens: Optional[int] = None          # default of turns that do not say (None: the session's)
        self.vad_base_ms = 0.0                             # stream time at which the current VAD started
        self.held_audio: List[Any] = []                    # utterance features kept for respond() (auto_respond off)
        self.last_turn: Optional[Turn] = None              # the latest finished turn (truncate_answer)
        self.system_changed = False                        # the system prompt changed after it was prefilled
        self.replay_x: Optional[torch.Tensor] = None       # history to replay after a system prompt change
        self.prefix: Optional[Prefix] = None               # the next turn's prompt start, prefilled ahead
        self.prefix_refused: Optional[Tuple] = None        # what the last prefix too long for the budget was built from
        self.stats = {"prefill_tokens": 0, "turn_prefill_tokens": [], "decode_tokens": 0, "evictions": 0,
                      "interrupts": 0, "codec_tokens": 0, "audio_samples": 0, "prefix_tokens": 0}

    def arrival_time(self, sample: int) -> Optional[float]:
        for end, t in self.arrivals:
            if end >= sample:
                return t
        return self.arrivals[-1][1] if self.arrivals else None

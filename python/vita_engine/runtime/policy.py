"""What runs in each scheduler tick (the policy), apart from how each stage does its work.

The stages (turns.py, llm_stage.py, tts_stage.py, codec_stage.py) ask this module: when audio input
is processed and speculative starts run, which LLM rows run this tick (and which get extra back-to-back
forwards), when a TTS segment starts and how many AR steps each stream gets, and how many codec
tokens each turn pushes into its codec window now. Change the scheduling here without reading the
stages; docs/architecture.md §4 gives the reasoning.

`CriticalPathPolicy` (default, option `scheduling="critical_path"`): the first audio of a turn is
the latency users feel, so the chain that produces it runs back to back and everything with slack
waits for it:

* LLM: a turn whose first TTS segment has not been handed over decodes up to `llm_first_segment_steps`
  tokens per tick (extra forwards with only those rows). Afterwards the LLM only has to stay ahead of
  the TTS: a speaking turn gets a decode row while its text lead (answer tokens whose speech the TTS
  has not finished) is below `llm_text_lead_tokens`, or when the TTS has nothing left to say. A tick
  where no row qualifies runs no LLM forward at all, so the LLM yields to first-window work.
  Prefill: committed turns first, then speculative ones, oldest first, `prefill_chunk_tokens` per tick.
* TTS: a segment's stream starts when the segmenter hands it over; a later segment of a turn waits for
  the one before it while another turn's first audio is being made. The stream that plays next in a
  turn without audio yet gets the AR steps it still needs for the first window (codec look-ahead +
  `tts_first_window_tokens`), up to `tts_burst_steps` in one tick. After the first window it gets 1
  step per tick, plus `tts_catchup_steps` while its audio lead over real-time playback is below
  `audio_lead_ms`. Streams of later segments (spoken afterwards) get 1.
* Codec: the first window (exactly the look-ahead + `tts_first_window_tokens` tokens) is pushed as soon
  as those tokens exist; later windows in multiples of `codec_window_ms` of audio (at most a
  look-ahead's worth of tokens per piece), so a window finalizes a useful amount of audio and streams
  at the same count batch, and only once the client holds less than `codec_lead_ms` of decoded audio
  beyond real-time playback (a window's cost is mostly per call: later, larger windows are cheaper).
  While a first audio is being made, later windows share `codec_budget_ms` per tick, the streams whose
  client runs out of audio first going first.
* Vision: pushed images and camera frames are encoded as they arrive, up to `vision_tiles_per_tick`
  tiles per tick and never while a first audio is being made (the turn start encodes what is left).
* Prefix (option `prefix_prefill`): once a session with no turn in flight has its pushed images
  encoded (and no camera frames pending), the start of its next prompt (close of the previous answer,
  system prompt on the first turn, `<|im_start|>user\n`, the image tokens: prefix_stage.py) is
  prefilled in the ticks' slack: never while a first audio is being made, after the tick's committed
  and speculative turn prefill, within what they left of `prefill_chunk_tokens`, oldest pending image
  first. The turn start then prefills only the text/audio and the assistant header.
* Slack: speculative work (the encoder run at a pause and the speculative turn's prefill) has the
  end-of-turn timer as slack, so while a committed turn awaits its first audio it waits, up to
  `speculative_defer_ms`. Audio input is batched over `audio_interval_ms` (one VAD + fbank call for
  every session's new audio; the end-of-turn decision comes at most that much later).

`LockstepPolicy` (`scheduling="lockstep"`, the engine before issue 12, kept for comparison): every
answering session decodes one token per tick, every TTS stream takes one AR step per tick, and every
new codec token is pushed at once; images and frames are encoded, and their tokens prefilled, when
their turn starts.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Tuple

from .state import Segment, SessionState, Turn

__all__ = ["Policy", "CriticalPathPolicy", "LockstepPolicy", "make_policy", "SCHEDULING"]

SCHEDULING = ("critical_path", "lockstep")


def make_policy(options: Dict, codec=None, has_tts: bool = True) -> "Policy":
    kind = options.get("scheduling", "critical_path")
    if kind == "critical_path":
        return CriticalPathPolicy(options, codec, has_tts)
    if kind == "lockstep":
        return LockstepPolicy(options, codec, has_tts)
    raise ValueError(f"Engine: scheduling must be one of {SCHEDULING}, got {kind!r}")


def _int_opt(options: Dict, key: str, lo: int) -> int:
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"Engine: option {key} must be an int >= {lo}, got {v!r}")
    return v


def _bool_opt(options: Dict, key: str) -> bool:
    v = options[key]
    if not isinstance(v, bool):
        raise ValueError(f"Engine: option {key} must be True or False, got {v!r}")
    return v


def _float_opt(options: Dict, key: str, lo: float) -> float:
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise ValueError(f"Engine: option {key} must be a number >= {lo}, got {v!r}")
    return float(v)


class Policy:
    """The questions the stages ask; see the module docstring."""

    def __init__(self, options: Dict, codec=None, has_tts: bool = True):
        self.prefill_chunk_tokens = int(options["prefill_chunk_tokens"])
        self.has_tts = has_tts
        self.has_codec = codec is not None
        hop = int(getattr(codec, "hop_length", 600) or 600)
        sr = int(getattr(codec, "sample_rate", 24000) or 24000)
        self.token_ms = hop * 1000.0 / sr                    # audio per codec token
        self.sample_rate = sr
        self.lookahead = int(codec.lookahead_tokens) if codec is not None else 0

    audio_interval_ms = 0.0  # audio input waits this long to be batched (VAD + fbank) with other sessions'

    # ---- turn taking -------------------------------------------------------------------------------
    def speculative_starts(self, states: List[SessionState], ages_ms: List[float]) -> int:
        """How many of the waiting speculative starts (oldest first, `ages_ms` since their pause) run now."""
        return len(ages_ms)

    def vision_tiles(self, urgent: bool) -> int:
        """Image/frame tiles the vision stage may encode ahead of their turn in this tick (`urgent`:
        first_audio_pending). 0: visuals are encoded when their turn starts."""
        return 0

    prefix_prefill = False  # the prefix stage builds the next turn's prompt start (images) ahead of it

    # ---- LLM ---------------------------------------------------------------------------------------
    def llm_rows(self, states: List[SessionState]) -> Tuple[List[SessionState], List[Tuple[SessionState, int]]]:
        """-> (sessions that get a decode row, [(session, prefill tokens)]) for this tick's LLM forward."""
        raise NotImplementedError

    def prefix_rows(self, states: List[SessionState], used: int) -> List[Tuple[SessionState, int]]:
        """[(session, tokens of its `prefix` to prefill)] joining this tick's LLM forward, `used`: the
        turn prefill tokens llm_rows already gave it."""
        return []

    def llm_extra_rows(self, states: List[SessionState]) -> List[SessionState]:
        """Sessions that get one more back-to-back decode forward in this tick (none: no extra forward)."""
        return []

    @property
    def llm_extra_forwards(self) -> int:
        """At most this many extra forwards per tick (llm_extra_rows is asked before each)."""
        return 0

    # ---- TTS ---------------------------------------------------------------------------------------
    def first_audio_pending(self, states: List[SessionState]) -> bool:
        """Is a committed turn waiting for its first audio (work on the critical path in flight)?"""
        return False

    def tts_start(self, t: Turn, index: int, urgent: bool) -> bool:
        """Start the TTS stream of segment `index` of `t` now? (`urgent`: first_audio_pending)."""
        return True

    def tts_steps(self, t: Turn, seg: Segment, now: float) -> int:
        """AR steps this tick for the TTS stream of `seg` (a segment of turn `t` in flight); `now` is
        time.perf_counter(), the clock of TurnClock."""
        raise NotImplementedError

    # ---- codec -------------------------------------------------------------------------------------
    def codec_push(self, t: Turn, now: float) -> int:
        """How many of `t.codec_pending` (codec tokens in playback order) to push into the codec now.
        At the end of the turn the stage pushes the rest and flushes, whatever this says."""
        raise NotImplementedError

    def codec_budget_ms(self, urgent: bool) -> float:
        """Time per tick for later (not first) codec windows; `urgent`: first_audio_pending."""
        return math.inf

    def order_windows(self, later: list, now: float) -> list:
        """The order in which the later windows [(session, turn, n)] of this tick are pushed."""
        return later

    def codec_steady_windows(self) -> Tuple[int, ...]:
        """The token counts of the later (steady) codec windows this policy mostly pushes: the codec's
        static steps (CUDA graphs, model/codec_graphs.py) are built for these; other counts run eagerly."""
        return (1,)  # a push of every new token at once: one per tick (one TTS AR step)

    def describe(self) -> Dict[str, float]:
        return {}


class LockstepPolicy(Policy):
    def llm_rows(self, states):
        decode = [st for st in states if st.turn is not None and st.turn.state == "decode" and not st.turn.llm_done]
        return decode, _prefill_chunks(states, self.prefill_chunk_tokens, committed_first=False)

    def tts_steps(self, t, seg, now):
        return 1

    def codec_push(self, t, now):
        return len(t.codec_pending)

    def describe(self):
        return {"scheduling": "lockstep"}


class CriticalPathPolicy(Policy):
    def __init__(self, options: Dict, codec=None, has_tts: bool = True):
        super().__init__(options, codec, has_tts)
        self.first_segment_steps = _int_opt(options, "llm_first_segment_steps", 1)
        self.text_lead_tokens = _int_opt(options, "llm_text_lead_tokens", 1)
        self.first_window_tokens = _int_opt(options, "tts_first_window_tokens", 1)
        self.burst_steps = _int_opt(options, "tts_burst_steps", 1)
        self.catchup_steps = _int_opt(options, "tts_catchup_steps", 0)
        self.audio_lead_ms = _float_opt(options, "audio_lead_ms", 0.0)
        window_ms = _float_opt(options, "codec_window_ms", 0.0)
        self.codec_lead_ms = _float_opt(options, "codec_lead_ms", 0.0)
        self.codec_budget_ms_urgent = _float_opt(options, "codec_budget_ms", 0.0)
        self.audio_interval_ms = _float_opt(options, "audio_interval_ms", 0.0)
        self.speculative_defer_ms = _float_opt(options, "speculative_defer_ms", 0.0)
        self.vision_tiles_per_tick = _int_opt(options, "vision_tiles_per_tick", 0)
        self.prefix_prefill = _bool_opt(options, "prefix_prefill")
        # tokens finalized by the first window: everything pushed except the look-ahead tail
        self.first_window = self.lookahead + self.first_window_tokens
        # later pieces: >= codec_window_ms of audio, but never more than a look-ahead of tokens (a codec
        # with a tiny hop, like the tiny test model's 0.5 ms per token, would otherwise hold its audio
        # back for a whole segment)
        self.window = max(1, min(math.ceil(window_ms / self.token_ms - 1e-9), max(1, self.lookahead)))

    # ---- turn taking -------------------------------------------------------------------------------
    def first_audio_pending(self, states: List[SessionState]) -> bool:
        """Is a committed turn waiting for its first audio (work on the critical path in flight)?"""
        if not (self.has_tts and self.has_codec):
            return False
        return any(st.turn is not None and not st.turn.speculative and "first_audio" not in st.turn.clock.t
                   for st in states)

    def speculative_starts(self, states, ages_ms):
        # a speculative start (encoder + prefill) has the end-of-turn timer as slack (500 - 200 ms by
        # default): it waits while another turn's first audio is being made, up to speculative_defer_ms
        if not self.first_audio_pending(states):
            return len(ages_ms)
        return sum(a >= self.speculative_defer_ms for a in ages_ms)

    def vision_tiles(self, urgent):
        # a visual's encode has until its turn starts as slack (the turn start encodes what is left):
        # it never delays a first audio, and a tick's share is bounded so decode ticks stay short
        return 0 if urgent else self.vision_tiles_per_tick

    # ---- LLM ---------------------------------------------------------------------------------------
    def _first_segment_pending(self, t: Turn) -> bool:
        return self.has_tts and not any(g.text_ids for g in t.segments)

    def _needs_text(self, t: Turn) -> bool:
        """Decode this turn now: no TTS (text is the output), its first segment is not out yet, the TTS
        has nothing left to say, or its text lead is below the budget."""
        if not self.has_tts or self._first_segment_pending(t) or t.tts_idle:
            return True
        spoken = 0  # answer tokens whose segments the TTS has finished, in order
        for g in t.segments:
            if not g.tts_done:
                break
            spoken = g.tok_end
        return len(t.tokens) - spoken < self.text_lead_tokens

    def llm_rows(self, states):
        decode = [st for st in states if _decoding(st.turn) and self._needs_text(st.turn)]
        prefill = _prefill_chunks(states, self.prefill_chunk_tokens, committed_first=True)
        if prefill and any(st.turn.speculative for st, _ in prefill) and self.first_audio_pending(states):
            # speculative prefill has slack too: it waits (up to speculative_defer_ms after its start)
            now = time.perf_counter()
            prefill = [(st, n) for st, n in prefill if not st.turn.speculative
                       or (now - st.turn.clock.t.get("created", now)) * 1e3 >= self.speculative_defer_ms]
        return decode, prefill

    def prefix_rows(self, states, used):
        # a prefix's slack is the rest of the user's speech: it never delays a first audio, and turn
        # prefill (committed, then speculative) goes first within the tick's prefill budget
        if not self.prefix_prefill or self.first_audio_pending(states):
            return []
        budget = self.prefill_chunk_tokens - used
        out: List[Tuple[SessionState, int]] = []
        todo = [st for st in states if st.turn is None and st.prefix is not None and st.prefix.remaining > 0]
        for st in sorted(todo, key=lambda st: st.prefix.next_arrival):
            if budget <= 0:
                break
            n = min(budget, st.prefix.remaining)
            out.append((st, n))
            budget -= n
        return out

    def llm_extra_rows(self, states):
        return [st for st in states if _decoding(st.turn) and not st.turn.speculative
                and self._first_segment_pending(st.turn)]

    @property
    def llm_extra_forwards(self) -> int:
        return self.first_segment_steps - 1

    # ---- TTS ---------------------------------------------------------------------------------------
    def tts_start(self, t, index, urgent):
        # the segment that plays next starts at once; a later one (decoded in parallel for throughput)
        # waits for its predecessor while another turn's first audio is being made: its NAR + prefix
        # prefill then stays out of the critical ticks
        return not urgent or index == 0 or t.segments[index - 1].tts_done

    def tts_steps(self, t, seg, now):
        if t.head >= len(t.segments) or t.segments[t.head] is not seg:
            return 1  # a later segment: decoded in parallel, spoken after the head one
        have = t.codec_available
        if t.codec_pushed == 0:  # before the first window: back to back up to the look-ahead
            return max(1, min(self.burst_steps, self.first_window - have))
        lead = self.audio_lead(t, now, have)
        return 1 + (self.catchup_steps if lead < self.audio_lead_ms else 0)

    def audio_lead(self, t: Turn, now: float, have: Optional[int] = None) -> float:
        """ms of audio the turn's codec tokens can finalize beyond what real-time playback, started at
        the first AudioChunk, has consumed by `now` (negative: playback would have stalled)."""
        have = t.codec_available if have is None else have
        ahead = (have - self.lookahead) * self.token_ms
        t0 = t.clock.t.get("first_audio")
        return ahead if t0 is None else ahead - (now - t0) * 1e3

    # ---- codec -------------------------------------------------------------------------------------
    def codec_push(self, t, now):
        ready = len(t.codec_pending)
        if t.codec_pushed == 0:  # exactly the first window: every turn's first push batches with the others'
            return self.first_window if ready >= self.first_window else 0
        if ready < self.window or self.client_lead(t, now) >= self.codec_lead_ms:
            return 0  # the client still holds enough decoded audio: a later, larger window is cheaper
        return ready - ready % self.window

    def codec_budget_ms(self, urgent):
        # while a first audio is being made, later windows get a time slice per tick (the ones whose
        # client runs out of audio first go first), so the tick stays short when the codec is the
        # bottleneck and the critical path moves on in the next tick
        return self.codec_budget_ms_urgent if urgent else math.inf

    def order_windows(self, later, now):
        return sorted(later, key=lambda c: self.client_lead(c[1], now))

    def codec_steady_windows(self):
        # later windows are multiples of `window` (what the TTS made since the last push, rounded down);
        # a stream that keeps up pushes one window, one that caught up after a slow tick two
        return (self.window, 2 * self.window)

    def client_lead(self, t: Turn, now: float) -> float:
        """ms of decoded audio sent beyond what real-time playback from the first AudioChunk has used."""
        t0 = t.clock.t.get("first_audio")
        sent = t.samples * 1e3 / self.sample_rate
        return sent if t0 is None else sent - (now - t0) * 1e3

    def describe(self):
        return {"scheduling": "critical_path", "prefix_prefill": self.prefix_prefill, "codec_lookahead_tokens": self.lookahead,
                "first_window_tokens": self.first_window, "codec_window_tokens": self.window,
                "codec_token_ms": self.token_ms}


def _decoding(t: Optional[Turn]) -> bool:
    return t is not None and t.state == "decode" and not t.llm_done


def _prefill_chunks(states, budget: int, committed_first: bool) -> List[Tuple[SessionState, int]]:
    """Chunks of turns still prefilling within `budget` tokens, oldest turn first (committed turns
    before speculative ones when `committed_first`): a long prompt never stalls decoding."""
    def key(s):
        t = s.turn
        created = t.clock.t.get("created", 0) if t else 0
        return (bool(t is not None and t.speculative), created) if committed_first else created

    out: List[Tuple[SessionState, int]] = []
    for st in sorted(states, key=key):
        t = st.turn
        if budget <= 0:
            break
        if t is None or t.state != "prefill":
            continue
        n = min(budget, t.x.shape[0] - t.prefilled)
        out.append((st, n))
        budget -= n
    return out


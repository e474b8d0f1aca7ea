"""The Engine's one scheduler thread. Each tick:

1. turns.py: drains every session's inbox (audio -> VAD -> incremental audio features; images; text
   turns; interrupts; close) and runs turn taking (speculative prefill on a short pause, commit on end
   of turn, discard on resumed speech, barge-in on new speech while answering);
2. prefix_stage.py builds the next turns' prompt starts (pushed images) of idle sessions; llm_stage.py:
   ONE batched LLM forward over the rows the policy picks (decode rows + chunked prefill of turns, then
   of those prefixes);
3. tts_stage.py: batched TTS AR steps for the active TTS streams (segments start as soon as the text
   segmenter hands one over);
4. codec_stage.py: codec windows for the turns with new codec tokens (`Codec.push_many`);
5. vision_stage.py, then turns.speculate(): work with slack (images and camera frames encoded as they
   arrive; the speculative encode + prefill at a pause);
6. events go to each session's sink (thread-safe; asyncio via call_soon_threadsafe).

What runs when is decided in policy.py; lifecycle.py holds turn start/commit/discard/endings and the
history trimming.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Dict, List

import torch

from .batch_llm import BatchLLM
from .codec_stage import CodecStage
from .lifecycle import Lifecycle
from .llm_stage import LLMStage
from .metrics import TickHistograms, TickStats
from .policy import make_policy
from .prefix_stage import PrefixStage
from .state import SessionState
from .tts_stage import TTSStage
from .vision_stage import VisionStage
from .turns import TurnTaking

log = logging.getLogger(__name__)

__all__ = ["Scheduler"]


class Scheduler:
    def __init__(self, engine):
        self.e = engine
        self.o = engine.options
        self.model = engine.model
        self.llm = BatchLLM(engine.model.llm, engine.kv)
        self.states: Dict[int, SessionState] = {}
        self._new: List[SessionState] = []
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._wake = False
        self._stop = False
        self.ticks = 0
        self.tick_errors = 0
        self.tick_stats = TickStats()  # per-tick rows: scheduler_stats(), vita-engine bench
        self.tick_hist = TickHistograms()  # cumulative histograms: /metrics
        self.nvtx = bool(self.o["nvtx"])
        self.policy = make_policy(self.o, codec=engine.codec, has_tts=engine.tts is not None)
        self.life = Lifecycle(self)
        self.turns = TurnTaking(self)
        self.llm_stage = LLMStage(self)
        self.tts_stage = TTSStage(self)
        self.codec_stage = CodecStage(self)
        self.vision_stage = VisionStage(self)
        self.prefix_stage = PrefixStage(self)
        self._thread = threading.Thread(target=self._run, name="vita-engine-scheduler", daemon=True)
        self._thread.start()

    # ---- thread ------------------------------------------------------------------------------------
    def add(self, st: SessionState) -> None:
        with self._lock:
            self._new.append(st)
        self.wake()

    def wake(self) -> None:
        with self._cv:
            self._wake = True
            self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self.o.get("cpu_threads"):
            torch.set_num_threads(int(self.o["cpu_threads"]))
        while not self._stop:
            t0 = self.tick_hist.start()
            try:
                busy = self.tick()
            except Exception:  # never let the loop die; the failing turns were already reported
                self.tick_errors += 1
                log.error("scheduler tick failed:\n%s", traceback.format_exc())
                busy = False
            self.tick_hist.stop(t0, busy)
            if not busy:
                self.tick_stats.idle_waits += 1
                wait = 0.02
                if self.turns.next_due is not None:  # audio is waiting for its batch interval
                    wait = min(wait, max(0.0, self.turns.next_due - time.perf_counter()))
                with self._cv:
                    if not self._wake and wait > 0:
                        self._cv.wait(timeout=wait)
                    self._wake = False
        for st in list(self.states.values()):
            self.life.close(st)

    # ---- one tick ----------------------------------------------------------------------------------
    def tick(self) -> bool:
        self.ticks += 1
        clock, cpu = time.perf_counter, time.thread_time
        c0, t0 = cpu(), clock()
        f0, r0 = self.llm.forwards, self.llm.rows
        s0, p0 = self.tts_stage.steps, self.codec_stage.pushes
        with self._lock:
            new, self._new = self._new, []
        for st in new:
            self.states[st.session.id] = st
        busy = bool(new)
        busy |= self.turns.step()
        t1 = clock()
        busy |= self.prefix_stage.step()
        busy |= self.llm_stage.step()
        t2 = clock()
        busy |= self.tts_stage.step()
        t3 = clock()
        busy |= self.codec_stage.step()
        busy |= self.vision_stage.step()
        busy |= self.turns.speculate()  # after the critical work of the tick: it has slack
        t4 = clock()
        if busy:
            self.tick_stats.add(((t4 - t0) * 1e3, (cpu() - c0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                                 (t3 - t2) * 1e3, (t4 - t3) * 1e3, len(self.states), self.llm.forwards - f0,
                                 self.llm.rows - r0, self.tts_stage.steps - s0, self.codec_stage.pushes - p0))
        return busy

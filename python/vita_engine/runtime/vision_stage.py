"""The vision stage: encodes pushed images and camera frames as they arrive, in the ticks' slack, so
the start of a turn (on the critical path when its prefill was not speculative) pays only for the
visuals still unencoded (and prefix_stage.py prefills the images' tokens ahead too). Each visual is encoded by itself, in one call, wherever that happens (here
or at the turn start): its features never depend on timing or on other sessions' visuals.

How many tiles run in a tick is the policy's (`Policy.vision_tiles`): none while a committed turn
awaits its first audio, otherwise up to `vision_tiles_per_tick`, oldest push first across sessions (a visual
with more tiles than that is left to its turn start).
Every camera frame is encoded (one tile each): the frames a turn uses are chosen among all those
pushed since the previous turn only when it starts, so which ones will be needed is not known
earlier; the camera's frame rate times the sessions bounds this work (docs/architecture.md §4)."""
from __future__ import annotations

import time
from typing import Iterable, List

import torch

from .metrics import nvtx_range
from .stage import Stage
from .state import Visual

__all__ = ["VisionStage", "encode_visuals"]


@torch.inference_mode()
def encode_visuals(vision, visuals: Iterable[Visual], nvtx: bool = False) -> float:
    """Encode each visual without features (one `vision.encode` call per visual); frees its pixels.
    -> ms spent."""
    t0 = time.perf_counter()
    for v in visuals:
        if v.feats is not None:
            continue
        with nvtx_range("vision", nvtx):
            v.feats = vision.encode(v.pv)
        v.pv = None
    return (time.perf_counter() - t0) * 1e3


class VisionStage(Stage):
    tiles = 0  # tiles encoded ahead of their turn (a counter for tests and the tick statistics)

    def step(self) -> bool:
        if self.model.vision is None:
            return False
        todo: List[Visual] = [v for st in self.states.values() for v in (*st.pending_images, *st.pending_frames)
                              if v.feats is None]
        if not todo:
            return False
        budget = self.policy.vision_tiles(self.policy.first_audio_pending(list(self.states.values())))
        batch: List[Visual] = []
        for v in sorted(todo, key=lambda v: v.arrived):
            if v.tiles > budget:
                continue  # never split: a visual larger than the budget is left to its turn start
            budget -= v.tiles
            batch.append(v)
        if not batch:
            return False
        encode_visuals(self.model.vision, batch, self.nvtx)
        self.tiles += sum(v.tiles for v in batch)
        return True

"""Base of the scheduler's stages: each stage is a small object holding a reference to the one
`Scheduler` (its sessions, the other stages, the policy) and the engine's parts it needs."""
from __future__ import annotations

__all__ = ["Stage"]


class Stage:
    def __init__(self, sch):
        self.sch = sch
        self.e = sch.e
        self.o = sch.o
        self.model = sch.model
        self.nvtx = sch.nvtx

    @property
    def policy(self):
        return self.sch.policy  # looked up each time: the policy can be swapped on a running engine

    @property
    def states(self):
        return self.sch.states

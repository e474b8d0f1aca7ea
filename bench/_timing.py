"""Timing helpers shared by the bench scripts: median wall time on CPU, CUDA events on GPU."""
from __future__ import annotations

import statistics
import time

import torch


def time_fn(fn, *, device="cpu", warmup=3, reps=20, min_time_s=0.2, max_reps=2000) -> float:
    """Median milliseconds per call of fn()."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fastest(*fns, **kw) -> float:
    """The best of several reference implementations (fair baselines)."""
    return min(time_fn(f, **kw) for f in fns)

"""Timing harness for the kernel benchmarks: ours vs the best plain-torch reference, same run.

Built for a shared, noisy machine:
* every function runs in batches of calls sized to about `target_ms` (one call when a call is
  longer), so timer resolution and per-call jitter do not matter; a batch is timed as `parts`
  sub-batches and the fastest counts (being preempted only ever adds time);
* rounds are interleaved (ours, refs, then refs, ours, ...) and each round gives one ratio
  ref_ms / ours_ms from timings taken seconds apart, so load drifting over the run cancels out;
* the figure reported is the median of the per-round ratios, with their min and max as the spread.
A reference with several variants (e.g. SDPA with enable_gqa vs pre-expanded heads) counts with
its fastest variant in each round. CUDA timings use events around the batch (no host sync inside).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

__all__ = ["Case", "Measurement", "Timer", "interleave", "calibrate", "best_of", "measure", "peak_for", "cpu_description",
           "contention", "crowded", "loadavg"]


@dataclass
class Case:
    """One benchmark: `ours()` and each `refs[variant]()` do the same work on the same inputs.

    bytes / flops: the minimum memory traffic / arithmetic of one call (for GB/s, TFLOP/s).
    check(): optional, run once untimed -> max relative difference of ours vs the reference.
    rounds: a cap on the default number of rounds for cases whose calls take seconds.
    """

    name: str
    family: str
    dtype: str
    shape: str
    ours: Callable[[], Any]
    refs: Dict[str, Callable[[], Any]]
    bytes: Optional[float] = None
    flops: Optional[float] = None
    check: Optional[Callable[[], float]] = None
    rounds: Optional[int] = None
    note: str = ""


@dataclass
class Measurement:
    ours_ms: float
    ref_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    rounds: int
    ref_variant: str
    per_round: List[tuple] = field(default_factory=list)  # (ours_ms, best ref_ms, variant)
    calls: tuple = ()  # (calls per batch of ours, {variant: calls per batch})


def interleave(time_ours: Callable[[], float], time_refs: Dict[str, Callable[[], float]], rounds: int) -> Measurement:
    """Run `rounds` rounds of timings (each callable returns ms per call for one batch); even rounds
    time ours first, odd rounds the references first. Pure bookkeeping, so tests drive it with fake
    timers."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not time_refs:
        raise ValueError("a case needs at least one reference")
    per_round = []
    for r in range(rounds):
        if r % 2 == 0:
            o = time_ours()
            rs = {k: f() for k, f in time_refs.items()}
        else:
            rs = {k: f() for k, f in reversed(list(time_refs.items()))}
            o = time_ours()
        best = min(rs, key=rs.get)
        per_round.append((o, rs[best], best))
    ratios = [(b / a) if a > 0 else math.inf for a, b, _ in per_round]
    return Measurement(
        ours_ms=statistics.median(p[0] for p in per_round),
        ref_ms=statistics.median(p[1] for p in per_round),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        rounds=rounds,
        ref_variant=Counter(p[2] for p in per_round).most_common(1)[0][0],
        per_round=per_round,
    )


class Timer:
    """ms per call of fn over a batch of n calls: perf_counter on CPU, CUDA events on the GPU
    (the device is synchronized before the batch so earlier work does not leak in).

    clock="cpu": the calling thread's CPU time instead of wall time. Time spent preempted by other
    processes does not count, so on a crowded machine it measures the work itself; valid only when
    all the work runs on the calling thread (one thread for torch and vita_engine)."""

    def __init__(self, device: str = "cpu", clock: str = "wall"):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
        self.cuda = str(device).startswith("cuda")
        if self.cuda and clock == "cpu":
            raise ValueError("clock='cpu' measures CPU work; use the wall clock (CUDA events) on a GPU")
        self._now = time.thread_time if clock == "cpu" else time.perf_counter
        if self.cuda:
            import torch

            self._torch = torch
            self._ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def __call__(self, fn: Callable[[], Any], n: int) -> float:
        if self.cuda:
            s, e = self._ev
            self._torch.cuda.synchronize()
            s.record()
            for _ in range(n):
                fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / n
        now = self._now
        t0 = now()
        for _ in range(n):
            fn()
        return (now() - t0) * 1e3 / n


def calibrate(timer: Callable[[Callable, int], float], fn: Callable[[], Any], target_ms: float, max_calls: int = 100_000) -> tuple:
    """Warm fn up -> (calls that take about target_ms (>= 1), ms per call). The warm-up is one call,
    then batches growing up to 16x until one lasts a quarter of the target."""
    fn()
    n = 1
    while True:
        per = timer(fn, n)
        if per * n >= target_ms / 4 or n >= max_calls:
            break
        n = min(max_calls, max(2 * n, min(16 * n, math.ceil(target_ms / 4 / max(per, 1e-6)))))
    return max(1, min(max_calls, round(target_ms / max(per, 1e-6)))), per


def best_of(timer: Callable[[Callable, int], float], fn: Callable[[], Any], n: int, parts: int) -> float:
    """One round's figure for fn: its batch of n calls timed as `parts` sub-batches, the fastest
    kept. Other processes only ever add time, so the least disturbed sub-batch is the best estimate."""
    k = max(1, min(parts, n))
    return min(timer(fn, max(1, n // k)) for _ in range(k))


def measure(case: Case, device: str = "cpu", rounds: int = 7, target_ms: float = 30.0, parts: int = 3,
            clock: str = "wall", prune: float = 1.5, timer: Optional[Callable[[Callable, int], float]] = None) -> Measurement:
    """Calibrate every function, drop reference variants slower than `prune` x the fastest, then
    `rounds` interleaved rounds (see `interleave`). `timer(fn, n) -> ms per call` defaults to Timer."""
    timer = timer or Timer(device, clock)
    n_ours, _ = calibrate(timer, case.ours, target_ms)
    cal = {k: calibrate(timer, f, target_ms) for k, f in case.refs.items()}
    # reference variants far slower than the best one at calibration cannot win a round: not timed
    best = min(per for _, per in cal.values())
    n_refs = {k: n for k, (n, per) in cal.items() if per <= prune * best}
    m = interleave(lambda: best_of(timer, case.ours, n_ours, parts),
                   {k: (lambda f=case.refs[k], n=n: best_of(timer, f, n, parts)) for k, n in n_refs.items()}, rounds)
    m.calls = (n_ours, n_refs)
    return m


# ---- device facts -----------------------------------------------------------------------------------

# Datasheet peaks: HBM bandwidth (GB/s) and dense tensor-core TFLOP/s for bf16/fp16 (fp32: no tensor
# cores). Matched by substring of torch.cuda.get_device_name(), first match wins.
_PEAKS = [
    ("H200", dict(gbps=4800, bf16=989, fp16=989, fp32=67)),
    ("H100 PCIe", dict(gbps=2000, bf16=756, fp16=756, fp32=51)),
    ("H100 NVL", dict(gbps=3900, bf16=835, fp16=835, fp32=60)),
    ("H100", dict(gbps=3350, bf16=989, fp16=989, fp32=67)),
    ("A100-SXM4-80GB", dict(gbps=2039, bf16=312, fp16=312, fp32=19.5)),
    ("A100 80GB PCIe", dict(gbps=1935, bf16=312, fp16=312, fp32=19.5)),
    ("A100", dict(gbps=1555, bf16=312, fp16=312, fp32=19.5)),
    ("L40S", dict(gbps=864, bf16=362, fp16=362, fp32=91.6)),
    ("L4", dict(gbps=300, bf16=121, fp16=121, fp32=30.3)),
]


def peak_for(device_name: str) -> Optional[dict]:
    for key, p in _PEAKS:
        if key in device_name:
            return p
    return None


_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi2", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_description() -> dict:
    """CPU model name and the SIMD flags relevant to the kernels (from /proc/cpuinfo), plus what
    `_C` reports about its own dispatch when it can."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "Processor", "CPU part") and model == "unknown":
                    model = v.strip()
                elif k in ("flags", "Features") and not flags:
                    flags = set(v.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    used = [f for f in _ISA_FLAGS if f in flags]
    out = {"model": model, "flags": used, "cores": os.cpu_count()}
    try:
        from .. import _C

        for attr in ("cpu_isa", "cpu_features", "cpu_dispatch"):
            fn = getattr(_C, attr, None)
            if callable(fn):
                out["kernel_isa"] = fn()
                break
    except Exception:  # noqa: BLE001  (informational only)
        pass
    return out


def _proc_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait (jiffies)


def contention(probe_s: float = 0.2) -> dict:
    """How crowded the CPUs are right now: spin this thread for probe_s and compare its CPU time with
    the wall time (`share`: the fraction of a core it got), and, on Linux, read how many cores the
    other processes kept busy meanwhile (`others_busy`, from /proc/stat)."""
    try:
        s0 = _proc_stat()
    except (OSError, ValueError, IndexError):
        s0 = None
    w0, c0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - w0 < probe_s:
        pass
    w, c = time.perf_counter() - w0, time.thread_time() - c0
    out = {"share": round(c / w, 3)}
    if s0 is not None:
        try:
            s1 = _proc_stat()
            total, idle = s1[0] - s0[0], s1[1] - s0[1]
            if total > 0:
                out["others_busy"] = round(max(0.0, (total - idle) / total * (os.cpu_count() or 1) - c / w), 2)
        except (OSError, ValueError, IndexError):
            pass
    return out


def crowded(probe: dict) -> bool:
    return probe["share"] < 0.85 or probe.get("others_busy", 0.0) > 0.5


def loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None

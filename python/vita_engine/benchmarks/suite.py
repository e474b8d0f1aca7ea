"""Glue for the pytest-benchmark suite in bench/ (bench_*.py): the same cases as `bench-kernels`,
one pytest-benchmark test per (case, device, dtype, impl). pytest itself is not imported here.

The authoritative figure stays the interleaved same-run ratio of the harness: the "vita" test of
each case also measures it and stores ratio / ratio_min / ratio_max in `benchmark.extra_info`."""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .cases import all_specs, select
from .cases._spec import DTYPES
from .harness import Timer, calibrate
from .runner import run_case

__all__ = ["FULL", "devices", "params", "pytest_params", "bench"]

FULL = os.environ.get("VITA_BENCH_FULL") == "1"


def devices() -> List[str]:
    import vita_engine

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and vita_engine.cuda_available() else [])


def params(families: Iterable[str], dtypes: Optional[dict] = None) -> List[Tuple[str, str, str, str]]:
    """(device, case name, dtype, impl) for every selected case; dtypes: {device: [names]}, default
    float32 on CPU and bfloat16 on CUDA (sampling: float32 logits). VITA_BENCH_FULL=1 adds the
    --full shapes."""
    dtypes = dtypes or {"cpu": ["float32"], "cuda": ["bfloat16"]}
    out = []
    for dev in devices():
        for s in select(all_specs(), list(families), full=FULL):
            for dt in (s.dtypes or dtypes[dev]):
                for impl in ("vita", "torch"):
                    out.append((dev, s.name, dt, impl))
    return out


def pytest_params(families: Iterable[str], dtypes: Optional[dict] = None) -> list:
    """`params` as pytest.param objects with readable ids, the CUDA ones marked `cuda`."""
    import pytest  # only ever called while pytest collects bench/

    return [pytest.param(*p, id="-".join(p), marks=[pytest.mark.cuda] if p[0] == "cuda" else []) for p in params(families, dtypes)]


_built: dict = {}
_calls: dict = {}


def _case(name: str, device: str, dtype: str):
    key = (name, device, dtype)
    if key not in _built:
        _built.clear()  # one case alive at a time (real-size models are large)
        _calls.clear()
        spec = next(s for s in all_specs() if s.name == name)
        with torch.inference_mode():
            _built[key] = spec.build(device, DTYPES[dtype])
    return _built[key]


def bench(benchmark, name: str, device: str, dtype: str, impl: str, rounds: Sequence[int] = (5, 15), target_ms: float = 30.0) -> None:
    """Time `impl` ("vita" or "torch": its fastest variant) of a case with pytest-benchmark; one
    iteration = a batch of as many calls as ours makes in ~target_ms, synchronized on CUDA."""
    case = _case(name, device, dtype)
    timer = Timer(device)
    with torch.inference_mode():
        if impl == "vita":
            fn = case.ours
        else:
            cal = {k: calibrate(timer, f, target_ms)[1] for k, f in case.refs.items()}
            variant = min(cal, key=cal.get)
            fn = case.refs[variant]
            benchmark.extra_info["torch_variant"] = variant
        # the same number of calls per iteration for both impls, so pytest-benchmark's columns compare
        n = _calls.get(name) or _calls.setdefault(name, calibrate(timer, case.ours, target_ms)[0])
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def batch():
            with torch.inference_mode():
                for _ in range(n):
                    fn()
                sync()

        benchmark.group = f"{name}-{device}-{dtype}"
        benchmark.extra_info.update(shape=case.shape, calls_per_iteration=n)
        benchmark.pedantic(batch, rounds=rounds[0] if device == "cpu" else rounds[1], warmup_rounds=1, iterations=1)
        if impl == "vita":
            row = run_case(case, device, rounds=3, target_ms=target_ms)
            for k in ("ratio", "ratio_min", "ratio_max", "ref", "ours_ms", "ref_ms", "gbps", "tflops", "peak_frac", "max_err"):
                if row.get(k) is not None:
                    benchmark.extra_info[k] = row[k]
            print(f"\n{device} {name} {dtype}: ours {row['ours_ms']:.4g} ms  torch {row['ref_ms']:.4g} ms  ratio {row['ratio']:.2f} "
                  f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})")

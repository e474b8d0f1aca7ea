"""Run benchmark specs and turn measurements into result rows (shared by the CLI and bench/)."""
from __future__ import annotations

import gc
import sys
import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .cases._spec import DTYPES, Spec
from .harness import Case, Measurement, contention, cpu_description, loadavg, measure, peak_for
from .models import clear_cache

__all__ = ["environment", "run_cases", "run_case", "result_row", "default_dtypes", "default_rounds"]


def default_dtypes(device: str) -> List[str]:
    return ["float32", "bfloat16"] if device == "cpu" else ["bfloat16"]


def default_rounds(device: str) -> int:
    return 7 if device == "cpu" else 15


def environment(device: str, clock: str = "wall") -> dict:
    """What the figures were measured on: device, CPU model and SIMD flags, threads, versions, load."""
    import vita_engine
    from vita_engine import _C

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    cpu = cpu_description()
    return {
        "device": device, "device_name": name, "peak": peak_for(name) if device == "cuda" else None,
        "cpu": f"{cpu['model']} [{' '.join(cpu['flags'])}]" + (f" kernels: {cpu['kernel_isa']}" if "kernel_isa" in cpu else ""),
        "cpu_info": cpu, "threads": {"torch": torch.get_num_threads(), "vita_engine": _C.num_threads(),
                                          "vita_engine_pool": _C.threadpool_backend()}, "clock": clock,
        "torch": torch.__version__, "vita_engine": vita_engine.__version__, "loadavg": loadavg(),
    }


_COMPUTE_BOUND = {"paged_prefill", "varlen_attention", "codec_conv1d", "codec_conv_transpose1d"}


def _rates(case: Case, m: Measurement, peak: Optional[dict]) -> dict:
    out = {}
    s = m.ours_ms * 1e-3
    if case.bytes:
        out["gbps"] = round(case.bytes / s / 1e9, 2)
    if case.flops:
        out["tflops"] = round(case.flops / s / 1e12, 4)
    if peak:
        fr = []
        if "gbps" in out:
            fr.append(out["gbps"] / peak["gbps"])
        if "tflops" in out:
            fr.append(out["tflops"] / peak[{"bfloat16": "bf16", "float16": "fp16"}.get(case.dtype, "fp32")])
        if fr:
            out["peak_frac"] = round(max(fr), 4)  # the binding resource (roofline)
    out["metric"] = "tflops" if ("tflops" in out and (case.family in _COMPUTE_BOUND or "gbps" not in out)) else \
        ("gbps" if "gbps" in out else None)
    return out


def result_row(case: Case, m: Measurement, peak: Optional[dict] = None, max_err: Optional[float] = None) -> dict:
    row = {"name": case.name, "family": case.family, "dtype": case.dtype, "shape": case.shape, "ours_ms": round(m.ours_ms, 5),
           "ref_ms": round(m.ref_ms, 5), "ratio": round(m.ratio, 4), "ratio_min": round(m.ratio_min, 4),
           "ratio_max": round(m.ratio_max, 4), "rounds": m.rounds, "ref": m.ref_variant, "calls": [m.calls[0], m.calls[1]],
           "max_err": max_err, **_rates(case, m, peak)}
    if case.note:
        row["note"] = case.note
    return row


def run_case(case: Case, device: str, rounds: Optional[int] = None, target_ms: float = 30.0, clock: str = "wall",
             check: bool = True, peak: Optional[dict] = None) -> dict:
    """Check (once, untimed) and measure one built case -> its result row."""
    err = case.check() if (check and case.check is not None) else None
    r = rounds if rounds is not None else min(default_rounds(device), case.rounds or default_rounds(device))
    return result_row(case, measure(case, device, rounds=r, target_ms=target_ms, clock=clock), peak, err)


def run_cases(specs: Iterable[Spec], device: str = "cpu", dtypes: Optional[Sequence[str]] = None, rounds: Optional[int] = None,
              target_ms: float = 30.0, clock: str = "wall", check: bool = True,
              progress: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Build, check and measure every (spec, dtype); a failing case gives a row with "error" and the
    run goes on. Specs with fixed dtypes (sampling: float32 logits) run in those only."""
    dtypes = list(dtypes or default_dtypes(device))
    peak = peak_for(torch.cuda.get_device_name()) if device == "cuda" else None
    specs = [s for s in specs if s.devices is None or device in s.devices]
    jobs = list(dict.fromkeys((s, d) for s in specs for d in (s.dtypes or dtypes)))
    rows = []
    for spec, dt in jobs:
        t0 = time.perf_counter()
        # wall-clock rows measured while other processes kept a core busy are flagged (the load moves)
        busy = contention(0.05).get("others_busy") if (device == "cpu" and clock == "wall") else None
        try:
            with torch.inference_mode():
                case = spec.build(device, DTYPES[dt])
                row = run_case(case, device, rounds, target_ms, clock, check, peak)
            del case
        except Exception as e:  # noqa: BLE001  (one broken case must not hide the others)
            row = {"name": spec.name, "family": spec.family, "dtype": dt, "error": f"{type(e).__name__}: {e}"}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if busy is not None:
            row["others_busy"] = busy
        rows.append(row)
        if progress is not None:
            progress(row)
        gc.collect()
    clear_cache()
    return rows


def print_progress(row: dict, file=None) -> None:
    file = file or sys.stderr
    if "error" in row:
        print(f"  {row['name']:<26} {row['dtype']:<9} ERROR {row['error']}", file=file, flush=True)
        return
    print(f"  {row['name']:<26} {row['dtype']:<9} ratio {row['ratio']:5.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})  "
          f"ours {row['ours_ms']:.4g} ms  torch {row['ref_ms']:.4g} ms  [{row['seconds']:.1f} s]", file=file, flush=True)

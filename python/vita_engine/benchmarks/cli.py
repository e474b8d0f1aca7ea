"""`vita-engine bench-kernels`: every kernel family against its plain-torch reference in the same run.

Importing this module is cheap (no torch): cli.py registers the subcommand with `add_parser`.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import List, Optional

__all__ = ["add_parser", "add_arguments", "run", "main"]

_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
                  "fp16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(_DTYPE_ALIASES), metavar="DTYPE",
                   help="float32 | bfloat16 | float16, one or more (default: float32 bfloat16 on CPU, bfloat16 on CUDA); "
                        "the sampling cases always use float32 logits")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="a case name, a family (e.g. paged_decode) or a glob (codec_rb*); repeatable or comma-separated")
    p.add_argument("--full", action="store_true", help="also the extra shapes (more codec layers, InternViT varlen, 8 codec streams)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 7 on CPU, 15 on CUDA)")
    p.add_argument("--target-ms", type=float, default=30.0, help="length of one timed batch of calls (default 30 ms)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both torch and vita_engine (default: torch's)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: count this thread's CPU time, not time preempted by other processes (CPU only; "
                        "implies --threads 1). For crowded machines")
    p.add_argument("--no-check", action="store_true", help="skip the one-off correctness check of each case")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench-kernels", help="microbenchmark every kernel against its torch reference (ratio >= 1: ours faster)")
    add_arguments(p)
    p.set_defaults(fn=run)
    return p


def _fail(msg: str) -> int:
    print(f"vita-engine bench-kernels: {msg}", file=sys.stderr)
    return 2


def _metrics(case, m, peak) -> dict:
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
            key = {"bfloat16": "bf16", "float16": "fp16"}.get(case.dtype, "fp32")
            fr.append(out["tflops"] / peak[key])
        if fr:
            out["peak_frac"] = round(max(fr), 4)  # the binding resource (roofline)
    return out


def _fmt_table(rows: List[dict]) -> str:
    cols = [("name", "case", "<"), ("dtype", "dtype", "<"), ("ours_ms", "ours ms", ">"), ("ref_ms", "torch ms", ">"),
            ("ratio", "ratio", ">"), ("spread", "min-max", "<"), ("rate", "achieved", ">"), ("peak", "%peak", ">"),
            ("err", "max err", ">"), ("ref", "torch variant", "<"), ("shape", "shape", "<")]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append({"name": r["name"], "dtype": r["dtype"], "ours_ms": "ERROR", "shape": r["error"][:100]})
            continue
        rate = f"{r['tflops']:.3f} TFLOP/s" if "tflops" in r and r.get("family") in _COMPUTE else \
            (f"{r['gbps']:.1f} GB/s" if "gbps" in r else (f"{r['tflops']:.3f} TFLOP/s" if "tflops" in r else ""))
        lines.append({"name": r["name"], "dtype": r["dtype"], "ours_ms": f"{r['ours_ms']:.4g}", "ref_ms": f"{r['ref_ms']:.4g}",
                      "ratio": f"{r['ratio']:.2f}", "spread": f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", "rate": rate,
                      "peak": f"{100 * r['peak_frac']:.0f}%" if "peak_frac" in r else "",
                      "err": f"{r['max_err']:.1e}" if r.get("max_err") is not None else "", "ref": r["ref"], "shape": r["shape"]})
    width = {k: max([len(t)] + [len(str(x.get(k, ""))) for x in lines]) for k, t, _ in cols}
    out = []
    fmt = lambda d: " | ".join(f"{str(d.get(k, '')):{a}{width[k]}}" for k, _, a in cols).rstrip()  # noqa: E731
    out.append(fmt({k: t for k, t, _ in cols}))
    out.append("-" * len(out[-1]))
    out += [fmt(x) for x in lines]
    return "\n".join(out)


_COMPUTE = {"paged_prefill", "varlen_attention", "codec_conv1d", "codec_conv_transpose1d"}


def run(args) -> int:
    from .cases import all_specs, select

    specs = select(all_specs(), args.only, full=args.full)
    if args.list:
        for s in specs:
            print(f"{s.name:<28} {s.family:<24} {'(--full)' if s.full_only else ''}".rstrip())
        return 0
    if not specs:
        return _fail(f"--only {','.join(args.only)}: no case matches (see --list)")
    if args.rounds is not None and args.rounds < 1:
        return _fail(f"--rounds must be >= 1, got {args.rounds}")
    if args.target_ms <= 0:
        return _fail(f"--target-ms must be > 0, got {args.target_ms}")
    if args.threads is not None and args.threads < 1:
        return _fail(f"--threads must be >= 1, got {args.threads}")
    try:
        import torch
    except ImportError:
        return _fail('needs torch: pip install "vita-engine[torch]"')
    import vita_engine
    from vita_engine import _C

    from .cases._spec import DTYPES
    from .harness import cpu_description, loadavg, measure, peak_for
    from .models import clear_cache

    dev = args.device
    if dev == "cuda" and not (torch.cuda.is_available() and vita_engine.cuda_available()):
        return _fail("--device cuda: no usable GPU or this build of vita_engine has no CUDA kernels")
    if args.clock == "cpu":
        if dev != "cpu":
            return _fail("--clock cpu: only for --device cpu (CUDA timings use events)")
        if args.threads not in (None, 1):
            return _fail(f"--clock cpu needs --threads 1 (all work on the timing thread), got --threads {args.threads}")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        _C.set_num_threads(args.threads)
    dtypes = list(dict.fromkeys(_DTYPE_ALIASES[d] for d in (args.dtype or (["float32", "bfloat16"] if dev == "cpu" else ["bfloat16"]))))
    default_rounds = 7 if dev == "cpu" else 15
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = peak_for(dev_name) if dev == "cuda" else None
    cpu = cpu_description()
    header = {
        "device": dev if dev == "cpu" else f"{dev} ({dev_name})",
        "cpu": f"{cpu['model']} [{' '.join(cpu['flags'])}]" + (f" kernels: {cpu['kernel_isa']}" if "kernel_isa" in cpu else ""),
        "threads": f"torch {torch.get_num_threads()} / vita_engine {_C.num_threads()}, clock {args.clock}",
        "versions": f"torch {torch.__version__}, vita_engine {vita_engine.__version__}",
    }
    la = loadavg()
    if dev == "cpu" and args.clock == "wall" and la is not None and la > (cpu["cores"] or 1):
        header["note"] = (f"load average {la:.1f} on {cpu['cores']} cores: other processes compete; multi-threaded torch ops "
                          "suffer most from that (--clock cpu counts the work only)")
    if not args.json:
        print("\n".join(f"{k}: {v}" for k, v in header.items()), flush=True)
        print("ratio = torch ms / ours ms, median over interleaved rounds (>= 1: ours faster); min-max over rounds", flush=True)
    results, failed, t_start = [], False, time.perf_counter()
    jobs = [(s, d) for s in specs for d in (s.dtypes if s.dtypes else dtypes)]
    jobs = list(dict.fromkeys(jobs))
    for spec, dt in jobs:
        row = {"name": spec.name, "family": spec.family, "dtype": dt}
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                case = spec.build(dev, DTYPES[dt])
                err = None if (args.no_check or case.check is None) else case.check()
                rounds = args.rounds if args.rounds is not None else min(default_rounds, case.rounds or default_rounds)
                m = measure(case, dev, rounds=rounds, target_ms=args.target_ms, clock=args.clock)
            row.update(shape=case.shape, ours_ms=round(m.ours_ms, 5), ref_ms=round(m.ref_ms, 5), ratio=round(m.ratio, 4),
                       ratio_min=round(m.ratio_min, 4), ratio_max=round(m.ratio_max, 4), rounds=m.rounds, ref=m.ref_variant,
                       calls=[m.calls[0], m.calls[1]], max_err=err, **_metrics(case, m, peak))
            if case.note:
                row["note"] = case.note
            del case
        except Exception as e:  # noqa: BLE001  (one broken case must not hide the others)
            row["error"] = f"{type(e).__name__}: {e}"
            failed = True
        row["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(row)
        print(_progress(row), file=sys.stderr, flush=True)
        gc.collect()
    clear_cache()
    total = time.perf_counter() - t_start
    if args.json:
        print(json.dumps({"device": dev, "device_name": dev_name, "cpu": header["cpu"], "cpu_info": cpu,
                          "threads": {"torch": torch.get_num_threads(), "vita_engine": _C.num_threads()}, "clock": args.clock,
                          "torch": torch.__version__, "vita_engine": vita_engine.__version__, "loadavg": la,
                          "seconds": round(total, 1), "results": results}, indent=1))
    else:
        print()
        print(_fmt_table(results))
        slow = [r for r in results if "ratio" in r and r["ratio"] < 1.0]
        print(f"\n{len(results)} cases in {total:.0f} s; " + (f"{len(slow)} below 1.0: " + ", ".join(f"{r['name']}/{r['dtype']} {r['ratio']:.2f}"
                                                                                                  for r in slow) if slow else "all ratios >= 1.0"))
    return 1 if failed else 0


def _progress(r: dict) -> str:
    if "error" in r:
        return f"  {r['name']:<26} {r['dtype']:<9} ERROR {r['error']}"
    return f"  {r['name']:<26} {r['dtype']:<9} ratio {r['ratio']:5.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})  " \
           f"ours {r['ours_ms']:.4g} ms  torch {r['ref_ms']:.4g} ms  [{r['seconds']:.1f} s]"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="vita-engine bench-kernels", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""`vita-engine bench-kernels`: every kernel family against its plain-torch reference in the same run.

Importing this module is cheap (no torch): cli.py registers the subcommand with `add_parser`.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="wall: elapsed time, every core. cpu: this thread's CPU time, so time preempted by other "
                        "processes does not count (CPU only; implies --threads 1). auto (default): wall, or cpu when "
                        "a short probe finds other processes competing for the cores and --threads is not given")
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


def _fmt_table(rows: List[dict]) -> str:
    cols = [("name", "case", "<"), ("dtype", "dtype", "<"), ("ours_ms", "ours ms", ">"), ("ref_ms", "torch ms", ">"),
            ("ratio", "ratio", ">"), ("spread", "min-max", "<"), ("rate", "achieved", ">"), ("peak", "%peak", ">"),
            ("err", "max err", ">"), ("ref", "torch variant", "<"), ("shape", "shape", "<")]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append({"name": r["name"], "dtype": r["dtype"], "ours_ms": "ERROR", "shape": r["error"][:100]})
            continue
        rate = {"tflops": f"{r.get('tflops', 0):.3f} TFLOP/s", "gbps": f"{r.get('gbps', 0):.1f} GB/s"}.get(r.get("metric"), "")
        lines.append({"name": r["name"], "dtype": r["dtype"], "ours_ms": f"{r['ours_ms']:.4g}", "ref_ms": f"{r['ref_ms']:.4g}",
                      "ratio": f"{r['ratio']:.2f}" + ("*" if r.get("others_busy", 0) > 0.5 else ""), "spread": f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", "rate": rate,
                      "peak": f"{100 * r['peak_frac']:.0f}%" if "peak_frac" in r else "",
                      "err": f"{r['max_err']:.1e}" if r.get("max_err") is not None else "", "ref": r["ref"], "shape": r["shape"]})
    width = {k: max([len(t)] + [len(str(x.get(k, ""))) for x in lines]) for k, t, _ in cols}
    out = []
    fmt = lambda d: " | ".join(f"{str(d.get(k, '')):{a}{width[k]}}" for k, _, a in cols).rstrip()  # noqa: E731
    out.append(fmt({k: t for k, t, _ in cols}))
    out.append("-" * len(out[-1]))
    out += [fmt(x) for x in lines]
    return "\n".join(out)


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

    dev = args.device
    if dev == "cuda" and not (torch.cuda.is_available() and vita_engine.cuda_available()):
        return _fail("--device cuda: no usable GPU or this build of vita_engine has no CUDA kernels")
    probe = None
    if args.clock == "auto":
        args.clock = "wall"
        if dev == "cpu" and args.threads is None:
            from .harness import contention, crowded

            probe = contention()
            if crowded(probe):
                args.clock = "cpu"
    if args.clock == "cpu":
        if dev != "cpu":
            return _fail("--clock cpu: only for --device cpu (CUDA timings use events)")
        if args.threads not in (None, 1):
            return _fail(f"--clock cpu needs --threads 1 (all work on the timing thread), got --threads {args.threads}")
        args.threads = 1
    saved = torch.get_num_threads(), _C.num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
        _C.set_num_threads(args.threads)
    try:
        return _run(args, specs, dev, probe)
    finally:  # callers in-process (tests, scripts) keep their thread counts
        torch.set_num_threads(saved[0])
        _C.set_num_threads(saved[1])


def _run(args, specs, dev, probe) -> int:
    from .runner import default_dtypes, environment, print_progress, run_cases

    dtypes = list(dict.fromkeys(_DTYPE_ALIASES[d] for d in (args.dtype or default_dtypes(dev))))
    env = environment(dev, args.clock)
    header = {
        "device": dev if dev == "cpu" else f"{dev} ({env['device_name']})",
        "cpu": env["cpu"],
        "threads": f"torch {env['threads']['torch']} / vita_engine {env['threads']['vita_engine']}, clock {args.clock}",
        "versions": f"torch {env['torch']}, vita_engine {env['vita_engine']}",
    }
    if probe is not None:
        env["probe"] = probe
        busy = f", other processes kept {probe['others_busy']:.1f} cores busy" if "others_busy" in probe else ""
        header["probe"] = f"this thread got {100 * probe['share']:.0f}% of a core{busy}" + \
            (": crowded, so the CPU-time clock on one thread (--clock wall to override)" if args.clock == "cpu" else "")
    la, cores = env["loadavg"], env["cpu_info"]["cores"] or 1
    if dev == "cpu" and args.clock == "wall" and la is not None and la > cores:
        header["note"] = (f"load average {la:.1f} on {cores} cores: other processes compete; multi-threaded torch ops "
                          "suffer most from that (--clock cpu counts the work only)")
    if not args.json:
        print("\n".join(f"{k}: {v}" for k, v in header.items()), flush=True)
        print("ratio = torch ms / ours ms, median over interleaved rounds (>= 1: ours faster); min-max over rounds", flush=True)
    t0 = time.perf_counter()
    results = run_cases(specs, dev, dtypes, rounds=args.rounds, target_ms=args.target_ms, clock=args.clock, check=not args.no_check,
                        progress=print_progress)
    total = time.perf_counter() - t0
    if args.json:
        env.pop("peak")
        print(json.dumps({**env, "seconds": round(total, 1), "results": results}, indent=1))
    else:
        print()
        print(_fmt_table(results))
        if any(r.get("others_busy", 0) > 0.5 for r in results):
            print("* measured while other processes kept more than half a core busy (wall clock): less reliable")
        slow = [r for r in results if "ratio" in r and r["ratio"] < 1.0]
        print(f"\n{len(results)} cases in {total:.0f} s; " + (f"{len(slow)} below 1.0: " + ", ".join(f"{r['name']}/{r['dtype']} {r['ratio']:.2f}"
                                                                                                  for r in slow) if slow else "all ratios >= 1.0"))
    return 1 if any("error" in r for r in results) else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="vita-engine bench-kernels", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

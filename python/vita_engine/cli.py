"""The `vita-engine` command.

`vita-engine check` runs every available kernel once on small random inputs against its torch
reference, on every available backend, and prints what is available.
`vita-engine demo` runs one spoken turn end to end (tiny model by default) and prints the latency
report; `vita-engine bench` drives N concurrent sessions and prints p50/p90/p99 per stage;
`vita-engine bench-kernels` times every kernel against its torch reference (vita_engine.benchmarks).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import _errors as E
from ._errors import UsageError

DTYPES = ["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


def _check(args) -> int:
    import torch

    import vita_engine
    from vita_engine import ops
    from vita_engine.ops import reference as ref

    info = {
        "version": vita_engine.__version__,
        "built_with_cuda": vita_engine.built_with_cuda(),
        "cuda_archs": vita_engine.cuda_arch_list(),
        "cuda_devices": vita_engine._C.cuda_device_count(),
        "cuda_available": vita_engine.cuda_available(),
        "cpu_threads": vita_engine._C.num_threads(),
        "cpu_threadpool": vita_engine._C.threadpool_backend(),  # "omp": torch's OpenMP team
        "torch": torch.__version__,
    }
    devices = ["cpu"] + (["cuda"] if vita_engine.cuda_available() and torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)

    def rnd(*s, dtype=torch.float32, device="cpu"):
        return torch.randn(*s, generator=g).to(dtype=dtype, device=device)

    def cases(dev, dt):
        x, w, r = rnd(7, 257, dtype=dt, device=dev), rnd(257, dtype=dt, device=dev), rnd(7, 257, dtype=dt, device=dev)
        q, k = rnd(5, 8, 64, dtype=dt, device=dev), rnd(5, 2, 64, dtype=dt, device=dev)
        pos = torch.arange(5, device=dev) * 31
        ids = torch.tensor([3, -1, 5, -1], device=dev)
        emb, mm = rnd(10, 32, dtype=dt, device=dev), rnd(2, 32, dtype=dt, device=dev)
        yield "rms_norm", lambda: ops.rms_norm(x, w), lambda: ref.rms_norm(x, w)
        yield "fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x, r, w)[0], lambda: ref.fused_add_rms_norm(x, r, w)[0]
        yield "rotary_embedding", lambda: ops.rotary_embedding(q, k, pos, 1e6)[0], lambda: ref.rotary_embedding(q, k, pos, 1e6)[0]
        yield "silu_and_mul", lambda: ops.silu_and_mul(x[:, :256]), lambda: ref.silu_and_mul(x[:, :256])
        yield "fuse_embeddings", lambda: ops.fuse_embeddings(ids, emb, mm), lambda: ref.fuse_embeddings(ids, emb, mm)
        for name, fn, rfn in _extra_cases(ops, ref, rnd, dev, dt):
            yield name, fn, rfn

    rows, ok = [], True
    for dev in devices:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            tol = 1e-4 if dt == torch.float32 else 3e-2
            for name, fn, rfn in cases(dev, dt):
                try:
                    t0 = time.perf_counter()
                    got = fn()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    dt_ms = (time.perf_counter() - t0) * 1e3
                    want = rfn()
                    err = (got.float() - want.float()).abs().max().item() / max(1.0, want.float().abs().max().item())
                    good = err <= tol and bool(torch.isfinite(got).all())
                    rows.append((name, dev, str(dt).replace("torch.", ""), "ok" if good else "MISMATCH", f"{err:.2e}", f"{dt_ms:.2f}"))
                    ok &= good
                except Exception as e:  # report and keep going: this is a self-check
                    rows.append((name, dev, str(dt).replace("torch.", ""), "ERROR", type(e).__name__, str(e)[:60]))
                    ok = False
    if args.json:
        print(json.dumps({"info": info, "kernels": rows, "ok": ok}, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
        print()
        print(f"{'kernel':<20} {'device':<6} {'dtype':<9} {'status':<8} {'max rel err':<11} ms")
        for r in rows:
            print(f"{r[0]:<20} {r[1]:<6} {r[2]:<9} {r[3]:<8} {r[4]:<11} {r[5]}")
        print("\nall kernels OK" if ok else "\nSOME KERNELS FAILED")
    return 0 if ok else 1


def _extra_cases(ops, ref, rnd, dev, dt):
    """Kernel families that may not be present in every build."""
    import torch

    if hasattr(ops, "paged_attention"):
        bs, Hq, Hk, D = 16, 4, 2, 64
        kc, vc = rnd(8, bs, Hk, D, dtype=dt, device=dev), rnd(8, bs, Hk, D, dtype=dt, device=dev)
        bt = torch.tensor([[3, 1, 6], [0, 7, 2]], dtype=torch.int32, device=dev)
        kv = torch.tensor([40, 20], dtype=torch.int32, device=dev)
        cu = torch.tensor([0, 5, 6], dtype=torch.int32, device=dev)
        q = rnd(6, Hq, D, dtype=dt, device=dev)
        yield "paged_attention", lambda: ops.paged_attention(q, kc, vc, bt, kv, cu), lambda: ref.paged_attention(q, kc, vc, bt, kv, cu)
    if hasattr(ops, "varlen_attention"):
        q, k, v = rnd(30, 4, 64, dtype=dt, device=dev), rnd(30, 2, 64, dtype=dt, device=dev), rnd(30, 2, 64, dtype=dt, device=dev)
        cu = torch.tensor([0, 13, 30], dtype=torch.int32, device=dev)
        yield "varlen_attention", lambda: ops.varlen_attention(q, k, v, cu), lambda: ref.varlen_attention(q, k, v, cu)


def _serve(args) -> int:
    """`vita-engine serve`: load the engine once, serve /ws, the browser page, /healthz, /metrics."""
    import ipaddress
    import logging
    import os

    E.require_torch("vita-engine serve")
    ray_spec = _ray_args(args)
    if ray_spec is not None and args.address:
        model = args.model  # checked on the cluster's nodes, where the replicas load it
    else:
        model = _model_arg(args.model)
        E.check_device("--device", args.device)
        _check_listen(args.host, args.port)
    from vita_engine.model.loading import CheckpointError
    from vita_engine.server import ServerConfig, create_app, serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token or os.environ.get("VITA_TOKEN") or None
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and token is None:
        print(f"vita-engine serve: WARNING: listening on {args.host} without --token: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    if ray_spec is not None:
        from vita_engine.serving.ray import serve_forever

        ray_spec["model"] = model
        ray_spec["token"] = token
        return serve_forever(ray_spec, args.host, args.port, args.address)
    from vita_engine.runtime import Engine

    kw = {"device": args.device}
    if args.dtype:
        kw["dtype"] = _dtype(args.dtype)
    if args.max_new_tokens:
        kw["max_new_tokens"] = args.max_new_tokens
    t0 = time.perf_counter()
    with E.blame("--model", args.model, CheckpointError):
        engine = Engine.from_pretrained(model, **kw)
    print(f"vita-engine serve: model {args.model!r} on {args.device} loaded in {time.perf_counter() - t0:.1f} s; "
          f"http://{args.host}:{args.port}/  (WebSocket /ws, WebRTC POST /v1/realtime/calls, /healthz, /metrics)", file=sys.stderr)
    cfg = ServerConfig(token=token, max_sessions=args.max_sessions, **_server_options(args))
    from vita_engine.server.webrtc import INSTALL_HINT, missing

    if missing():
        print(f"vita-engine serve: WebRTC (POST /v1/realtime/calls) is off: {', '.join(missing())} not installed "
              f"({INSTALL_HINT})", file=sys.stderr)
    serve(create_app(engine, cfg), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _server_options(args) -> dict:
    return dict(max_frame_bytes=args.max_frame_bytes, max_session_s=args.max_session_s,
                idle_timeout_s=args.idle_timeout_s, send_queue_s=args.send_queue_s,
                audio_frame_ms=args.audio_frame_ms, audio_max_hold_ms=args.audio_frame_ms,
                ice_hosts=tuple(args.ice_host or ()), ice_servers=tuple(args.ice_server or ()),
                webrtc_connect_timeout_s=args.webrtc_connect_timeout_s, webrtc_media_timeout_s=args.webrtc_media_timeout_s)


RAY_FLAGS = ("replicas", "autoscale", "sessions_per_replica", "gpus_per_replica", "address", "drain_timeout_s")


def _ray_args(args):
    """`serve --ray`: the replica spec (vita_engine.serving.core.check_spec), checked before
    anything loads; None without --ray (then no Ray flag may be given)."""
    given = [f for f in RAY_FLAGS if getattr(args, f) is not None]
    if not args.ray:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError("needs --ray (replicas on Ray Serve)", flag, getattr(args, given[0]))
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise UsageError('needs Ray Serve, which is not installed: pip install "vita-engine[ray]"', "--ray")
    if args.replicas is not None and args.autoscale is not None:
        raise UsageError("give --replicas N or --autoscale MIN:MAX, not both", "--autoscale", args.autoscale)
    if "max_sessions" in getattr(args, "given", ()):
        raise UsageError("counts one server's sessions; with --ray give --sessions-per-replica", "--max-sessions",
                         args.max_sessions)
    gpus = args.gpus_per_replica
    if gpus is not None and args.device == "cpu" and gpus > 0:
        raise UsageError("a cpu replica takes no GPU (or give --device cuda)", "--gpus-per-replica", f"{gpus:g}")
    if gpus is not None and args.device != "cpu" and gpus == 0:
        raise UsageError("a cuda replica needs a GPU (> 0; 0.5 puts two replicas on one GPU)", "--gpus-per-replica",
                         f"{gpus:g}")
    spec = {"device": args.device, "dtype": args.dtype, "sessions_per_replica": args.sessions_per_replica or 16,
            "replicas": args.replicas if args.autoscale is None else None, "autoscale": args.autoscale,
            "gpus_per_replica": gpus, "server": _server_options(args),
            "engine_options": {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}}
    if args.drain_timeout_s is not None:
        spec["drain_timeout_s"] = args.drain_timeout_s
    if spec["replicas"] is None and spec["autoscale"] is None:
        spec["replicas"] = 1
    return spec


class _Given(argparse.Action):
    """store, and note in `namespace.given` that the option was on the command line"""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = set(getattr(namespace, "given", ())) | {self.dest}


def _autoscale(s: str) -> str:
    try:
        lo, hi = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s}: expected MIN:MAX replicas, e.g. 1:4") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"{s}: expected MIN:MAX with 1 <= MIN <= MAX (no scale-to-zero)")
    return s


def _gpus(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s}: not a number") from None
    if not (v >= 0) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s}: must be a number >= 0")
    return v


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="real-time WebSocket server + browser page (docs/protocol.md)")
    s.add_argument("--model", default="tiny", help='checkpoint folder, or "tiny" (default)')
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    s.add_argument("--port", type=E.port, default=8000)
    s.add_argument("--token", type=E.nonempty, default=None, help="require this bearer token (or env VITA_TOKEN)")
    s.add_argument("--max-sessions", type=E.int_at_least(1), default=16, action=_Given,
                   help="concurrent sessions; beyond: refused with 1013")
    s.add_argument("--device", type=E.device, default="cuda" if _has_cuda() else "cpu")
    s.add_argument("--dtype", default=None, choices=DTYPES, help="default: the engine's")
    s.add_argument("--max-new-tokens", type=E.int_at_least(1), default=None, help="answer length limit (default: the engine's)")
    s.add_argument("--max-frame-bytes", type=E.int_at_least(1024), default=2 << 20)
    s.add_argument("--max-session-s", type=E.positive_float, default=3600.0)
    s.add_argument("--idle-timeout-s", type=E.positive_float, default=120.0)
    s.add_argument("--send-queue-s", type=E.positive_float, default=4.0,
                   help="seconds of queued output audio after which a client that does not read is closed (4002)")
    s.add_argument("--audio-frame-ms", type=E.positive_float, default=20.0, help="outgoing audio is coalesced into frames of this length")
    s.add_argument("--ice-host", action="append", type=_ice_host, metavar="ADDR",
                   help="WebRTC: gather ICE host candidates on this address (repeatable; default: every "
                        "non-loopback interface; 127.0.0.1 for same-machine clients)")
    s.add_argument("--ice-server", action="append", type=_ice_server, metavar="URL",
                   help="WebRTC: a STUN/TURN server (stun:host:port, turn:user:pass@host:port; repeatable; default none)")
    s.add_argument("--webrtc-connect-timeout-s", type=E.positive_float, default=15.0,
                   help="WebRTC: a call whose ICE/DTLS does not complete within this is closed")
    s.add_argument("--webrtc-media-timeout-s", type=E.positive_float, default=10.0,
                   help="WebRTC: a call that sends no audio (RTP) for this long is closed")
    s.add_argument("--log-level", default="info", type=str.lower, choices=["critical", "error", "warning", "info", "debug", "trace"])
    r = s.add_argument_group("replicas on Ray Serve (docs/ray-serve.md; needs vita-engine[ray])")
    r.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve, each with its own engine")
    r.add_argument("--replicas", type=E.int_at_least(1), default=None, help="replica count (default 1)")
    r.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                   help="autoscale between MIN and MAX replicas on ongoing sessions")
    r.add_argument("--sessions-per-replica", type=E.int_at_least(1), default=None,
                   help="sessions one replica admits (default 16); beyond: refused with 1013")
    r.add_argument("--gpus-per-replica", type=_gpus, default=None, help="default 1 with --device cuda, 0 on cpu")
    r.add_argument("--address", type=E.nonempty, default=None,
                   help='join this Ray cluster ("auto": the one this node belongs to); default: start one here')
    r.add_argument("--drain-timeout-s", type=E.positive_float, default=None,
                   help="on scale-down: seconds open turns get to finish before 1012 (default 30)")
    s.set_defaults(fn=lambda a: _serve(a))


def _ice_host(s: str) -> str:
    from vita_engine.server.webrtc.ice import check_host

    try:
        return check_host(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ice_server(s: str) -> str:
    from vita_engine.server.webrtc.ice import check_ice_server

    try:
        return check_ice_server(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _has_cuda() -> bool:
    try:
        import vita_engine

        return vita_engine.cuda_available()
    except Exception:  # noqa: BLE001
        return False
def _dtype(name):
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def _write_wav(path, pcm, sr):
    import wave

    import numpy as np

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sr))
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def _model_arg(path):
    """`--model`: "tiny" or a checkpoint folder, checked before anything is loaded."""
    return path if path == "tiny" else str(E.checkpoint_dir("--model", path))


def _check_listen(host, port):
    """Fail in one line, before the model loads, when `--host`/`--port` cannot be listened on."""
    import socket

    try:
        fam, typ, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve this address ({e.strerror})", "--host", host) from None
    with socket.socket(fam, typ, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(f"cannot listen there ({e.strerror or e})", "--host/--port", f"{host}:{port}") from None


def _demo(args) -> int:
    # every argument is checked before the (slow) model load
    E.require_torch("vita-engine demo")
    model = _model_arg(args.model)
    E.check_device("--device", args.device)
    x, sr = E.read_wav("--audio", args.audio) if args.audio else (None, None)
    image = E.read_image("--image", args.image) if args.image else None
    if args.out:
        E.output_file("--out", args.out)
    import torch

    from vita_engine.model.loading import CheckpointError
    from vita_engine.runtime import Engine
    from vita_engine.runtime import _compat
    from vita_engine.runtime.session import feed_audio, summarize_turn

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    opts = dict(max_new_tokens=args.max_new_tokens)
    if args.model == "tiny":
        opts["tts_max_tokens"] = 64  # spec §10: the tiny TTS decodes at most 64 tokens per segment
    if args.device == "cpu":
        opts["cpu_threads"] = args.threads
    with E.blame("--model", args.model, CheckpointError):
        eng = Engine.from_pretrained(model, device=args.device, dtype=_dtype(args.dtype), **opts)
    try:
        s = eng.session()
        if x is None:
            x, sr = _compat.load_sample("question.wav")
        if image is not None:
            with E.blame("--image", args.image, ValueError):  # e.g. a checkpoint without a vision tower
                s.push_image(image)
        feed_audio(s, x, sr, chunk_ms=args.chunk_ms, realtime=not args.fast)
        res = summarize_turn(s.collect(timeout=args.timeout))
        s.close()
    finally:
        eng.close()
    stages = {k: round(v, 2) for k, v in res.metrics.items() if k.endswith("_ms") and k not in ("ttfa_ms", "response_ms")}
    report = {
        "model": str(eng.path), "device": args.device, "dtype": args.dtype,
        "ttfa_ms": round(res.metrics.get("ttfa_ms", float("nan")), 2),
        "response_ms": round(res.metrics.get("response_ms", float("nan")), 2),
        "stages": stages,
        "audio_in_seconds": round(len(x) / sr, 3),
        "audio_out_seconds": round(res.audio.size / res.sample_rate, 3),
        "text": res.text,
        "interrupted": res.interrupted,
    }
    if args.out:
        _write_wav(args.out, res.audio, res.sample_rate)
        report["out"] = str(args.out)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print(f"model            : {report['model']} ({args.device}, {args.dtype})")
        print(f"input            : {report['audio_in_seconds']} s of audio ({'as fast as possible' if args.fast else 'real-time paced'})")
        print(f"answer text      : {res.text!r}")
        print(f"answer audio     : {report['audio_out_seconds']} s at {res.sample_rate} Hz" + (f" -> {args.out}" if args.out else ""))
        print(f"ttfa_ms          : {report['ttfa_ms']}   (end-of-turn decision -> first output sample)")
        print(f"response_ms      : {report['response_ms']}   (last voiced input sample -> first output sample)")
        for k, v in stages.items():
            print(f"  {k:<22}: {v}")
    return 0


def _bench(args) -> int:
    E.require_torch("vita-engine bench")
    if args.model:
        args.model = _model_arg(args.model)
    E.check_device("--device", args.device)
    if args.dims == "full" and not args.model and not args.device.startswith("cuda"):
        raise UsageError("builds 8B random weights: run it on a GPU (--device cuda)", "--dims", "full")
    if args.plot:
        import importlib.util

        E.output_file("--plot", args.plot)
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("needs matplotlib, which is not installed: pip install matplotlib", "--plot", args.plot)
    args.image_data = E.read_image("--image", args.image) if args.image else None
    from vita_engine.model.loading import CheckpointError
    from vita_engine.runtime.bench import run_bench

    with E.blame("--model", args.model, CheckpointError):
        return run_bench(args)


def _session_counts(s: str) -> str:
    """`bench --sessions`: one count or a comma-separated sweep, each >= 1 (checked before any model loads)."""
    parts = [p.strip() for p in s.split(",")]
    if not s.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a session count or a comma-separated list of counts (e.g. 16 or 1,4,16)")
    for p in parts:
        E.int_at_least(1)(p)
    return s


def main(argv=None) -> int:
    p = E.Parser(prog="vita-engine", description="vita-engine: real-time VITA-1.5 inference engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="run every kernel once against its torch reference and print the backends")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_check)
    _add_serve_parser(sub)

    d = sub.add_parser("demo", help="run one spoken turn end to end and print the latency report")
    d.add_argument("--model", default="tiny", help='checkpoint folder, or "tiny" (default: the bundled tiny random model)')
    d.add_argument("--audio", help="16-bit PCM WAV to speak (default: the bundled question sample)")
    d.add_argument("--image", help="image to show with the question")
    d.add_argument("--out", help="write the spoken answer to this WAV file")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--device", type=E.device, default="cpu")
    d.add_argument("--dtype", default="float32", choices=DTYPES)
    d.add_argument("--fast", action="store_true", help="feed the audio as fast as possible instead of in real time")
    d.add_argument("--chunk-ms", type=E.positive_float, default=40.0, help="input chunk size")
    d.add_argument("--max-new-tokens", type=E.int_at_least(1), default=48)
    d.add_argument("--threads", type=E.int_at_least(1), default=1, help="CPU threads (torch intra-op)")
    d.add_argument("--timeout", type=E.positive_float, default=300.0, help="seconds to wait for the answer")
    d.set_defaults(fn=_demo)

    b = sub.add_parser("bench", help="N concurrent sessions with real-time-paced audio: latency distributions")
    b.add_argument("--sessions", type=_session_counts, default="1",
                   help="concurrent sessions, or a comma-separated sweep run one after the other (1,4,16)")
    b.add_argument("--turns", type=E.int_at_least(1), default=3)
    b.add_argument("--dims", default="tiny", choices=["tiny", "mini", "full"],
                   help="tiny checkpoint; random weights at the real VITA-1.5 dimensions (full, GPU); or a small random model (mini)")
    b.add_argument("--model", default=None, help="checkpoint folder (overrides --dims)")
    b.add_argument("--device", type=E.device, default="cpu")
    b.add_argument("--dtype", default=None, choices=DTYPES, help="default float32 on CPU, bfloat16 on CUDA")
    b.add_argument("--max-new-tokens", type=E.int_at_least(1), default=32)
    b.add_argument("--fast", action="store_true", help="feed audio as fast as possible")
    b.add_argument("--threads", type=E.int_at_least(1), default=1)
    b.add_argument("--tts-max-tokens", type=E.int_at_least(1), default=None, help="codec tokens per TTS segment (default 64 tiny, 120 full)")
    b.add_argument("--use-reference", action="store_true", help="run every op on its pure-torch reference")
    b.add_argument("--scheduling", default=None, choices=["critical_path", "lockstep"],
                   help="scheduling policy (default: the engine's, critical_path; lockstep = before issue 12)")
    b.add_argument("--cuda-graphs", action="store_true",
                   help="engine option cuda_graphs: LLM decode, TTS AR step and steady codec windows on static buffers, captured on CUDA (not yet verified on a GPU)")
    b.add_argument("--image", help="image every session pushes before each spoken turn (its tokens are prefilled while the user speaks)")
    b.add_argument("--no-prefix-prefill", action="store_true",
                   help="engine option prefix_prefill=False: image tokens are prefilled with the turn (to compare)")
    b.add_argument("--plot", help="save a per-stage breakdown plot (needs matplotlib)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=_bench)
    from .benchmarks.cli import add_parser as _add_bench_kernels  # kernel microbenchmarks (no torch import here)

    _add_bench_kernels(sub)
    args = p.parse_args(argv)
    return E.run_command(args.fn, args, f"vita-engine {args.cmd}")


if __name__ == "__main__":
    sys.exit(main())

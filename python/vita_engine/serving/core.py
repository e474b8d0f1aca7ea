"""The Ray-free half of the Ray Serve replicas (vita_engine.serving.ray, docs/ray-serve.md): what
one replica is (one Engine, the `vita-engine serve` app, its health check and drain), where a new
session goes (`rank_replicas`), and the middleware the Serve proxy runs (session ids from the query
string, a clear close when a replica is lost). Importing this module never imports Ray.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import parse_qs

log = logging.getLogger("vita_engine.serving")

# the header Serve routes sessions by (Serve's RAY_SERVE_SESSION_ID_HEADER_KEY, default x-session-id)
SESSION_HEADER = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id").lower()
SESSION_QUERY_KEYS = ("session", "session_id")  # ?session=ID: browsers cannot set WebSocket headers
CLOSE_REPLICA_LOST = 1012  # "service restart": the OpenAI SDK and our docs say reconnect

# what `app(args)` / `vita-engine serve --ray` accept (docs/ray-serve.md has the table)
REPLICA_KEYS = {
    "model": "tiny",  # checkpoint folder (on every node) or "tiny"
    "device": "cpu",  # cpu | cuda (each replica sees only its own GPU(s))
    "dtype": None,  # float32 | bfloat16 | float16 (default: the engine's)
    "engine_options": {},  # Engine.from_pretrained options (max_new_tokens, session_max_tokens, ...)
    "sessions_per_replica": 16,  # K: sessions one replica admits; the (K+1)th gets close 1013
    "token": None,  # bearer token (default: env VITA_TOKEN on the replica)
    "server": {},  # further ServerConfig fields (max_session_s, idle_timeout_s, ...)
    "drain_timeout_s": 30.0,  # on scale-down/redeploy: open turns get this long to finish
}
DEPLOYMENT_KEYS = {
    "replicas": None,  # fixed replica count ...
    "autoscale": None,  # ... or "MIN:MAX" (autoscaling on ongoing sessions)
    "gpus_per_replica": None,  # default 1 for cuda, 0 for cpu
    "cpus_per_replica": 1.0,
    "admission_slack": None,  # Serve slots above K for refusals and /healthz (default max(2, K/4))
}


def check_spec(args: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The application's args with defaults filled in; ValueError naming a bad key or value."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(REPLICA_KEYS) - set(DEPLOYMENT_KEYS))
    if unknown:
        raise ValueError(f"vita_engine.serving.ray app: unknown args {unknown}; known: "
                         f"{sorted(set(REPLICA_KEYS) | set(DEPLOYMENT_KEYS))}")
    spec = {**REPLICA_KEYS, **DEPLOYMENT_KEYS, **args}
    spec["engine_options"] = dict(spec["engine_options"] or {})
    spec["server"] = dict(spec["server"] or {})

    def bad(key, want):
        raise ValueError(f"vita_engine.serving.ray app: {key}={spec[key]!r}: expected {want}")

    k = spec["sessions_per_replica"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        bad("sessions_per_replica", "an integer >= 1")
    if spec["device"] not in ("cpu", "cuda") and not str(spec["device"]).startswith("cuda:"):
        bad("device", '"cpu" or "cuda"')
    if spec["replicas"] is not None and spec["autoscale"] is not None:
        raise ValueError("vita_engine.serving.ray app: give replicas or autoscale, not both")
    if spec["replicas"] is not None and (isinstance(spec["replicas"], bool) or not isinstance(spec["replicas"], int)
                                         or spec["replicas"] < 1):
        bad("replicas", "an integer >= 1")
    if spec["autoscale"] is not None:
        spec["autoscale"] = parse_autoscale(spec["autoscale"])
    g = spec["gpus_per_replica"]
    if g is None:
        spec["gpus_per_replica"] = 0 if spec["device"] == "cpu" else 1
    elif isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0 or not math.isfinite(g):
        bad("gpus_per_replica", "a number >= 0")
    elif spec["device"] == "cpu" and g > 0:
        bad("gpus_per_replica", "0 with device cpu")
    elif spec["device"] != "cpu" and g == 0:
        bad("gpus_per_replica", "> 0 with device cuda (a replica without a GPU sees none)")
    if spec["admission_slack"] is None:
        spec["admission_slack"] = max(2, -(-k // 4))
    if not isinstance(spec["drain_timeout_s"], (int, float)) or spec["drain_timeout_s"] < 0:
        bad("drain_timeout_s", "a number of seconds >= 0")
    return spec


def parse_autoscale(v) -> tuple:
    """ "MIN:MAX" (or a 2-list) -> (min, max); 1 <= MIN <= MAX (no scale-to-zero: a session's
    handshake would wait for a replica to start)."""
    try:
        lo, hi = (str(v).split(":") if isinstance(v, str) else list(v))
        lo, hi = int(lo), int(hi)
    except (TypeError, ValueError):
        raise ValueError(f"autoscale {v!r}: expected MIN:MAX, e.g. 1:4") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"autoscale {v!r}: expected 1 <= MIN <= MAX")
    return lo, hi


# ---- one replica ----------------------------------------------------------------------------------
class ReplicaCore:
    """One replica: its Engine (one weight copy), the `vita-engine serve` Starlette app around it
    (whatever create_app serves: /ws, /v1/realtime, the page, /healthz, /metrics) with
    `ServerConfig.replica` set, its health check and its drain."""

    def __init__(self, spec: Dict[str, Any], replica_id: str, engine=None):
        from vita_engine.server import ServerConfig, create_app

        self.spec, self.replica_id = spec, replica_id
        self.t0 = time.time()
        t = time.perf_counter()
        self.engine = engine if engine is not None else self._load_engine(spec)
        self.load_s = time.perf_counter() - t
        token = spec["token"] or os.environ.get("VITA_TOKEN") or None
        cfg = ServerConfig(**{**spec["server"], "token": token, "max_sessions": spec["sessions_per_replica"],
                              "replica": replica_id})
        self.app = create_app(self.engine, cfg)
        self.server = self.app.state.vita
        self.health_error: Optional[str] = None

    @staticmethod
    def _load_engine(spec):
        from vita_engine.runtime import Engine

        opts = dict(spec["engine_options"])
        # the KV pool is sized for the sessions this replica admits (Engine: max_sessions x session_max_tokens)
        opts.setdefault("max_sessions", spec["sessions_per_replica"])
        if spec["dtype"]:
            from vita_engine.cli import _dtype

            opts["dtype"] = _dtype(spec["dtype"])
        return Engine.from_pretrained(spec["model"], device=spec["device"], **opts)

    def check_health(self) -> None:
        """Raises (the replica is then restarted by Serve) when the engine's scheduler thread is
        dead or a one-kernel self-test on the engine's device fails (a sticky CUDA error fails
        every later kernel)."""
        try:
            sch = getattr(self.engine, "_scheduler", None)
            if sch is not None and not sch.alive:
                raise RuntimeError("the engine's scheduler thread is dead")
            dev = getattr(self.engine, "device", None)
            if dev is not None:
                self_test(dev)
        except Exception as e:
            self.health_error = f"{type(e).__name__}: {e}"
            raise
        self.health_error = None

    def info(self) -> Dict[str, Any]:
        srv = self.server
        return {"replica": self.replica_id, "pid": os.getpid(), "sessions_active": srv.active,
                "max_sessions": srv.config.max_sessions, "draining": srv.draining,
                "healthy": self.health_error is None, "health_error": self.health_error,
                "device": str(getattr(self.engine, "device", "")), "load_s": round(self.load_s, 2),
                "uptime_s": round(time.time() - self.t0, 1)}

    def metrics_text(self) -> str:
        return self.server.metrics.render().decode()

    async def drain(self, grace_s: Optional[float] = None) -> None:
        await self.server.drain(self.spec["drain_timeout_s"] if grace_s is None else grace_s)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()


def self_test(device) -> None:
    """One small rms_norm on `device` against its torch reference."""
    import torch

    from vita_engine import ops
    from vita_engine.ops import reference as ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=g).to(device)
    w = torch.randn(64, generator=g).to(device)
    got, want = ops.rms_norm(x, w), ref.rms_norm(x, w)
    err = (got.float() - want.float()).abs().max().item()
    if not math.isfinite(err) or err > 1e-3:
        raise RuntimeError(f"self-test: rms_norm on {device} differs from its reference by {err:.3g}")


# ---- placement ------------------------------------------------------------------------------------
def _affinity(session_id: str, replica: str) -> int:
    """Rendezvous (highest-random-weight) hash: the replica with the highest score owns the
    session; removing a replica moves only its own sessions."""
    return int.from_bytes(hashlib.blake2b(f"{session_id}\0{replica}".encode(), digest_size=8).digest(), "big")


def owner(session_id: str, replicas: Sequence[str]) -> Optional[str]:
    return max(replicas, key=lambda r: _affinity(session_id, r)) if replicas else None


def rank_replicas(replicas: Sequence[str], loads: Dict[str, Optional[int]], session_id: str, k: int) -> List[List[str]]:
    """Preference ranks for a new connection, each least loaded first: a session id's owner while it
    has room for a session (load < K), then every replica with room, then the full ones, which
    refuse the session at once (close 1013) instead of letting the handshake queue. `loads`:
    ongoing requests per replica (None: unknown, taken as 0)."""
    def load(r):
        return loads.get(r) or 0

    room = sorted((r for r in replicas if load(r) < k), key=lambda r: (load(r), r))
    full = sorted((r for r in replicas if load(r) >= k), key=lambda r: (load(r), r))
    ranks: List[List[str]] = []
    own = owner(session_id, replicas) if session_id else None
    if own is not None and own in room:
        ranks.append([own])
        room = [r for r in room if r != own]
    return [r for r in (*ranks, room, full) if r]


# ---- the Serve proxy's middleware -----------------------------------------------------------------
class SessionProxyMiddleware:
    """ASGI middleware in the Serve proxy (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, docs/ray-serve.md):
    - `?session=ID` on a WebSocket URL becomes the session header Serve routes by (browsers cannot
      set headers), unless the header is there;
    - a WebSocket whose replica dies after the handshake would end without a close frame (Serve
      just drops it: clients see 1006); it gets an `error` event (code `replica_lost`) and close
      1012 ("service restart": reconnect) instead."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "websocket":
            return await self.app(scope, receive, send)
        scope = with_session_header(scope)
        st = {"accepted": False, "closed": False, "gone": False}

        async def recv():
            m = await receive()
            if m.get("type") == "websocket.disconnect":
                st["gone"] = True
            return m

        async def snd(m):
            t = m.get("type")
            if t == "websocket.accept":
                st["accepted"] = True
            elif t == "websocket.close":
                st["closed"] = True
            await send(m)

        try:
            await self.app(scope, recv, snd)
        finally:
            if st["accepted"] and not st["closed"] and not st["gone"]:
                await _close_lost(scope, send)


async def _close_lost(scope, send) -> None:
    import json

    msg = "the replica serving this session was lost; reconnect (a new session starts)"
    if scope.get("path", "").rstrip("/").endswith("/v1/realtime"):
        ev = {"type": "error", "error": {"type": "server_error", "code": "replica_lost", "message": msg}}
    else:
        ev = {"type": "error", "code": "replica_lost", "message": msg, "fatal": True}
    try:
        await send({"type": "websocket.send", "text": json.dumps(ev)})
        await send({"type": "websocket.close", "code": CLOSE_REPLICA_LOST, "reason": "replica lost"})
    except Exception:  # noqa: BLE001  (the client went away meanwhile)
        pass


def with_session_header(scope):
    headers = list(scope.get("headers") or [])
    if any(k.decode("latin-1").lower() == SESSION_HEADER for k, _ in headers):
        return scope
    q = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    for key in SESSION_QUERY_KEYS:
        if q.get(key) and q[key][0]:
            return {**scope, "headers": headers + [(SESSION_HEADER.encode(), q[key][0].encode("latin-1"))]}
    return scope


def proxy_middlewares() -> list:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=vita_engine.serving.core:proxy_middlewares"""
    from starlette.middleware import Middleware

    return [Middleware(SessionProxyMiddleware)]


PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "vita_engine.serving.core:proxy_middlewares"


# ---- the cluster view -----------------------------------------------------------------------------
def relabel_metrics(texts: Dict[str, str]) -> str:
    """Several replicas' Prometheus texts as one, every sample labelled replica="ID" (HELP/TYPE
    lines once per family)."""
    seen, out = set(), []
    for rid, text in sorted(texts.items()):
        lab = 'replica="' + rid.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in seen:
                    seen.add(line)
                    out.append(line)
                continue
            i = line.find("{")
            j = line.find(" ")
            if i != -1 and (j == -1 or i < j):
                rest = line[i + 1:]
                out.append(f"{line[:i]}{{{lab}{'' if rest.startswith('}') else ','}{rest}")
            elif j != -1:
                out.append(f"{line[:j]}{{{lab}}}{line[j:]}")
    return "\n".join(out) + "\n"

"""`vita-engine serve` as replicas on Ray Serve (docs/ray-serve.md).

    vita-engine serve --ray --replicas 2 --sessions-per-replica 8          # one machine or `--address auto`
    serve run vita_engine.serving.ray:app model=tiny replicas=2            # the Serve application builder
    serve deploy deploy/ray-serve.yaml                                     # a multi-node (KubeRay) cluster

Each replica (one Ray actor, one GPU when the device is cuda) loads one Engine and serves the same
Starlette app as `vita-engine serve` (`create_app`: /ws, /v1/realtime when present, the page,
/healthz, /metrics) plus /cluster and /cluster/metrics (every replica's sessions and metrics).
Admission never queues a handshake: Serve's `max_ongoing_requests` is K + a small slack, the
replica itself admits K sessions and refuses the next ones at once (close 1013), and
`SessionRouter` sends a new connection to its session id's replica while that one has room, else
to the least-loaded replica with room, else to a full one (which refuses). Only this package
imports Ray.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .core import (PROXY_CALLBACK, PROXY_CALLBACK_ENV, ReplicaCore, check_spec, proxy_middlewares,  # noqa: F401
                   rank_replicas, relabel_metrics)

log = logging.getLogger("vita_engine.serving")

APP_NAME = "vita"
DEPLOYMENT = "VitaReplica"
REGISTRY_NAMESPACE = "vita_engine"
REPORT_PERIOD_S = 1.0


# ---- placement ------------------------------------------------------------------------------------
class SessionRouter(RequestRouter):
    """Serve request router (one per proxy): the order of `core.rank_replicas`, one replica per
    rank. A replica's load is the larger of Serve's cached ongoing-request count (refreshed by
    every replica answer, so it sees other proxies' sessions) and this router's own exact count:
    the sessions it placed that are still open, plus the placements of the last seconds not yet
    accepted. Without the latter, a burst of handshakes routed on one stale count would all pick
    the same replica and be refused there while another had room."""

    RESERVATION_S = 5.0

    def initialize_state(self, sessions_per_replica: int = 16, **kwargs) -> None:
        self.k = int(sessions_per_replica)

    def _book(self):
        if not hasattr(self, "_open"):
            self._open: Dict[str, Any] = {}  # internal request id -> replica id (accepted, not completed)
            self._held: Dict[Any, List[float]] = {}  # replica id -> times of placements not yet accepted
        now = time.monotonic()
        for rid, ts in list(self._held.items()):
            self._held[rid] = [t for t in ts if now - t < self.RESERVATION_S]
        return now

    def _load(self, rid) -> int:
        own = sum(1 for r in self._open.values() if r == rid) + len(self._held.get(rid, ()))
        return max(self.replica_queue_len_cache.get(rid) or 0, own)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = self._book()
        sid = pending_request.metadata.session_id if pending_request is not None else ""
        by = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {u: self._load(r.replica_id) for u, r in by.items()}
        order = [by[u] for rank in rank_replicas(list(by), loads, sid, getattr(self, "k", 16)) for u in rank]
        if pending_request is not None:
            self._held.setdefault(order[0].replica_id, []).append(now)
        return [[r] for r in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self._book()
        held = self._held.get(replica_id)
        if held:
            held.pop(0)
        self._open[pending_request.metadata.internal_request_id] = replica_id

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._book()
        self._open.pop(internal_request_id, None)


# ---- the cluster view -----------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_restarts=-1)
class ClusterRegistry:
    """Each replica's last report (info + Prometheus text), kept a minute."""

    def __init__(self):
        self.d: Dict[str, tuple] = {}

    def report(self, rid: str, info: dict, metrics: str) -> None:
        self.d[rid] = (time.time(), info, metrics)

    def drop(self, rid: str) -> None:
        self.d.pop(rid, None)

    def view(self, max_age_s: float = 5.0, with_metrics: bool = False) -> Dict[str, dict]:
        now = time.time()
        self.d = {k: v for k, v in self.d.items() if now - v[0] < 60.0}
        return {rid: {**info, "report_age_s": round(now - t, 2), **({"metrics": m} if with_metrics else {})}
                for rid, (t, info, m) in self.d.items() if now - t <= max_age_s}


def registry(app_name: str = APP_NAME):
    """The app's registry actor (detached: it outlives any one replica)."""
    return ClusterRegistry.options(name=f"cluster-{app_name}", namespace=REGISTRY_NAMESPACE, lifetime="detached",
                                   get_if_exists=True).remote()


def cluster_view(app_name: str = APP_NAME, timeout: float = 10.0) -> dict:
    """{"replicas": [info per live replica], "sessions_active": n, "capacity": sum K} (any process
    connected to the cluster: `vita-engine serve --ray` prints it, /cluster returns it)."""
    reps = ray.get(registry(app_name).view.remote(), timeout=timeout)
    rows = sorted(reps.values(), key=lambda r: r["replica"])
    return {"replicas": rows, "sessions_active": sum(r["sessions_active"] for r in rows),
            "capacity": sum(r["max_sessions"] for r in rows if not r["draining"])}


class _Reporter(threading.Thread):
    def __init__(self, core: ReplicaCore, app_name: str):
        super().__init__(name="vita-cluster-report", daemon=True)
        self.core, self.app_name, self.stop = core, app_name, threading.Event()

    def run(self) -> None:
        reg = None
        while not self.stop.is_set():
            try:
                reg = reg or registry(self.app_name)
                reg.report.remote(self.core.replica_id, self.core.info(), self.core.metrics_text())
            except Exception as e:  # noqa: BLE001  (the view is best effort; serving goes on)
                log.debug("cluster report failed: %s", e)
                reg = None
            self.stop.wait(REPORT_PERIOD_S)
        try:
            (reg or registry(self.app_name)).drop.remote(self.core.replica_id)
        except Exception:  # noqa: BLE001
            pass


# ---- drain on scale-down / redeploy ---------------------------------------------------------------
_DRAIN: Dict[str, Any] = {}


def _install_drain_hook(replica: "VitaReplica") -> bool:
    """Serve drains a stopping replica by waiting for its ongoing requests (a WebSocket session
    never ends by itself) and kills it after graceful_shutdown_timeout_s; it has no hook for the
    replica's code. So this process (one replica per actor process) wraps Serve's
    Replica.perform_graceful_shutdown: first our drain (refuse new sessions, let open turns end,
    close with 1012), then Serve's. Without that private method (another Ray), sessions end when
    Serve kills the replica, and the proxy middleware closes them with 1012."""
    _DRAIN["target"] = replica
    try:
        from ray.serve._private import replica as impl

        cls = impl.Replica
        orig = cls.perform_graceful_shutdown
    except (ImportError, AttributeError) as e:
        log.warning("no drain hook on this Ray version (%s): sessions are cut at shutdown", e)
        return False
    if getattr(orig, "_vita_drain", False):
        return True

    async def perform_graceful_shutdown(self, *a, **kw):
        target = _DRAIN.get("target")
        if target is not None:
            try:
                await target._drain_from_serve()
            except Exception:  # noqa: BLE001  (Serve's own shutdown must still run)
                log.exception("drain failed")
        return await orig(self, *a, **kw)

    perform_graceful_shutdown._vita_drain = True  # type: ignore[attr-defined]
    cls.perform_graceful_shutdown = perform_graceful_shutdown
    return True


# ---- the deployment -------------------------------------------------------------------------------
@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class VitaReplica:
    """One replica: one Engine and the server app (core.ReplicaCore)."""

    def __init__(self, spec: Dict[str, Any]):
        ctx = serve.get_replica_context()
        spec = check_spec(spec)
        self.core = ReplicaCore(spec, ctx.replica_tag)
        self.app_name = ctx.app_name
        self._loop = asyncio.get_running_loop()  # the loop the app (user code) runs on
        self.core.app.router.routes[:0] = self._cluster_routes()
        self.hooked = _install_drain_hook(self)
        self._reporter = _Reporter(self.core, self.app_name)
        self._reporter.start()
        log.info("replica %s: engine %s on %s loaded in %.1f s", self.core.replica_id, spec["model"], spec["device"],
                 self.core.load_s)

    def __serve_build_asgi_app__(self):
        return self.core.app

    async def check_health(self) -> None:
        await asyncio.to_thread(self.core.check_health)

    async def _drain_from_serve(self) -> None:
        """Called on Serve's loop; the sessions live on the user-code loop."""
        grace = float(self.core.spec["drain_timeout_s"])
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            await asyncio.wait_for(self.core.drain(), grace + 15.0)
        else:
            fut = asyncio.run_coroutine_threadsafe(self.core.drain(), self._loop)
            await asyncio.wait_for(asyncio.wrap_future(fut), grace + 15.0)

    def _cluster_routes(self):
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        async def cluster(request):
            return JSONResponse(await asyncio.to_thread(cluster_view, self.app_name))

        async def cluster_metrics(request):
            reps = await asyncio.to_thread(lambda: ray.get(registry(self.app_name).view.remote(with_metrics=True),
                                                            timeout=10))
            return Response(relabel_metrics({k: v["metrics"] for k, v in reps.items()}),
                            media_type="text/plain; version=0.0.4; charset=utf-8")

        return [Route("/cluster", cluster), Route("/cluster/metrics", cluster_metrics)]

    async def __del__(self):
        reporter, core = getattr(self, "_reporter", None), getattr(self, "core", None)
        if reporter is not None:
            reporter.stop.set()
        if core is not None:
            if core.server.conns:  # Serve's drain ran without ours: close what is left
                await core.drain(0.0)
            core.close()


def deployment_options(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Serve options of the replica deployment for a checked spec (docs/ray-serve.md explains each)."""
    k = spec["sessions_per_replica"]
    opts: Dict[str, Any] = dict(
        # K sessions + slack for refusals and /healthz: a (K+1)th session reaches a replica and is
        # refused (1013) instead of waiting in Serve's queue for a slot that a session may hold for hours
        max_ongoing_requests=k + spec["admission_slack"],
        # only reached when every replica's slack is taken at once: fail the handshake, never queue long
        max_queued_requests=max(8, 2 * k),
        ray_actor_options={"num_cpus": spec["cpus_per_replica"], "num_gpus": spec["gpus_per_replica"]},
        request_router_config=RequestRouterConfig(
            request_router_class="vita_engine.serving.ray:SessionRouter",
            request_router_kwargs={"sessions_per_replica": k}),
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=float(spec["drain_timeout_s"]) + 10.0,
    )
    if spec["autoscale"] is not None:
        lo, hi = spec["autoscale"]
        opts["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
            # scale up before replicas are full: a new replica takes a model load to start
            "target_ongoing_requests": max(1.0, round(0.7 * k, 1)),
            "upscale_delay_s": 5.0, "downscale_delay_s": 300.0,
        }
    else:
        opts["num_replicas"] = spec["replicas"] or 1
    return opts


def build(spec: Dict[str, Any]):
    """A checked spec -> the bound Serve application."""
    spec = check_spec(spec)
    rep = {k: spec[k] for k in ("model", "device", "dtype", "engine_options", "sessions_per_replica", "token", "server",
                                "drain_timeout_s", "gpus_per_replica")}
    opts = deployment_options(spec)
    try:
        # a version pinned to the replica args (as `serve deploy` derives one from its config):
        # `serve.run` of the same replicas with another count is then a light update that adds or
        # drains replicas, not a rolling restart of all of them (Serve's Python API picks a random
        # version per call, and keeps this argument to itself)
        dep = VitaReplica.options(version=_version(rep), _internal=True, **opts)
    except (TypeError, ValueError):
        dep = VitaReplica.options(**opts)
    return dep.bind(rep)


def _version(rep: Dict[str, Any]) -> str:
    import hashlib
    import json

    import vita_engine

    return f"{vita_engine.__version__}-" + hashlib.sha256(json.dumps(rep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def app(args: Dict[str, Any]):
    """The Serve application builder: `serve run vita_engine.serving.ray:app model=tiny replicas=2`,
    or `import_path: vita_engine.serving.ray:app` with `args:` in a `serve deploy` YAML."""
    return build(_coerce(dict(args or {})))


def _coerce(args: Dict[str, Any]) -> Dict[str, Any]:
    """`serve run ... key=value` passes strings: numbers become numbers."""
    for key in ("sessions_per_replica", "replicas"):
        if isinstance(args.get(key), str) and args[key].isdigit():
            args[key] = int(args[key])
    for key in ("gpus_per_replica", "cpus_per_replica", "drain_timeout_s"):
        if isinstance(args.get(key), str):
            try:
                args[key] = float(args[key])
            except ValueError:
                pass
    return args


# ---- `vita-engine serve --ray` --------------------------------------------------------------------
def replica_actors(app_name: str = APP_NAME) -> Dict[str, Any]:
    """{replica unique id: actor handle} of the app's running replicas (tests, tools)."""
    out = {}
    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT}#"
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            try:
                out[a["name"][len(prefix):]] = ray.get_actor(a["name"], namespace=a["namespace"])
            except ValueError:
                pass
    return out


def start(spec: Dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
          num_cpus: Optional[int] = None, quiet: bool = False) -> float:
    """Start (or join, with `address`) a Ray cluster, Serve on host:port with the proxy middleware,
    and the app; returns the seconds until every replica was up."""
    t0 = time.perf_counter()
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # the proxies of a cluster started here get it
    if not ray.is_initialized():
        kw: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet}
        if address:
            kw["address"] = address
        elif num_cpus is not None:
            kw["num_cpus"] = num_cpus
        ray.init(**kw)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(spec), name=APP_NAME, route_prefix="/")
    return time.perf_counter() - t0


def serve_forever(spec: Dict[str, Any], host: str, port: int, address: Optional[str]) -> int:
    """The CLI: start, print the URL, then the sessions per replica whenever they change."""
    dt = start(spec, host, port, address)
    n = spec["replicas"] or (spec["autoscale"] or (1,))[0]
    print(f"vita-engine serve --ray: {n} replica(s) of {spec['model']!r} on {spec['device']} up in {dt:.1f} s, "
          f"{spec['sessions_per_replica']} sessions each; http://{host}:{port}/  (WebSocket /ws, /healthz, /metrics, "
          f"/cluster)", file=sys.stderr)
    last = None
    try:
        while True:
            time.sleep(2.0)
            try:
                v = cluster_view()
            except Exception:  # noqa: BLE001
                continue
            line = "  ".join(f"{r['replica']}: {r['sessions_active']}/{r['max_sessions']}"
                             + (" draining" if r["draining"] else "") for r in v["replicas"])
            if line != last:
                print(f"sessions per replica: {line or '(no replica reporting)'}", file=sys.stderr)
                last = line
    except KeyboardInterrupt:
        print("vita-engine serve --ray: shutting down", file=sys.stderr)
        serve.delete(APP_NAME)
        return 0

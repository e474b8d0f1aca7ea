"""`Engine`: one copy of the weights, one paged KV pool, one scheduler thread, many sessions."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from . import _compat
from .chat import ChatFormat
from .batch_llm import LLMDecodeGraphs
from .events import CapacityError
from .graphs import DEFAULT_BUCKETS, check_buckets
from .kv_pool import KVPool
from .metrics import MetricsStore
from .scheduler import Scheduler
from .session import Session
from .state import SessionState

__all__ = ["Engine", "DEFAULT_OPTIONS", "tiny_checkpoint"]

DEFAULT_OPTIONS: Dict[str, Any] = dict(
    max_sessions=16,            # session slots
    session_max_tokens=4096,    # per-session KV budget (history trimmed to stay inside)
    kv_blocks=None,             # pool pages; default max_sessions * session_max_tokens / block_size
    block_size=16,
    prefill_chunk_tokens=512,   # prefill tokens per scheduler tick (over all sessions)
    max_new_tokens=256,
    temperature=0.0,            # greedy by default (deterministic)
    top_k=0,
    seed=0,
    vad=None,                   # VADConfig or dict of its fields (reference thresholds by default)
    speculative=True,           # prefill at the VAD's speculative pause
    barge_in=True,              # new speech while answering interrupts the answer
    preroll_ms=300,             # audio kept before the detected speech start
    max_video_frames=4,
    max_push_seconds=60.0,
    tts_max_streams=64,
    tts_max_tokens=None,        # per TTS segment (default: the decoder config's 1000)
    tts_capacity_wait_s=10.0,   # a TTS segment waits this long for a free stream slot/pages, then is
                                # dropped with an Error event (at once when no stream could free any)
    # scheduling policy (policy.py, docs/architecture.md §4): "critical_path" or "lockstep" (before issue 12)
    scheduling="critical_path",
    llm_first_segment_steps=8,  # LLM decode steps per tick for a turn whose first TTS segment is not out
    llm_text_lead_tokens=16,    # afterwards, decode while the unspoken answer text is below this
    tts_first_window_tokens=1,  # first codec window: the look-ahead + this many tokens of final audio
    tts_burst_steps=32,         # AR steps per tick for a stream before its turn's first window
    tts_catchup_steps=1,        # extra AR steps per tick while the audio lead is below audio_lead_ms
    audio_lead_ms=200.0,
    codec_window_ms=40.0,       # later codec windows: at least this much audio (at most a look-ahead)
    codec_lead_ms=120.0,        # ... and only once the client holds less decoded audio than this
    codec_budget_ms=10.0,       # time per tick for later windows while a first audio is being made
    audio_interval_ms=16.0,     # input audio batched across sessions over this interval (VAD + fbank)
    speculative_defer_ms=100.0, # speculative encode/prefill waits up to this while a first audio is due
    vision_tiles_per_tick=8,    # image/frame tiles encoded ahead of their turn per tick (0: at turn start)
    prefix_prefill=True,        # prefill the next turn's image tokens (and what precedes them) ahead of it
    cpu_threads=None,           # torch intra-op threads for the scheduler (CPU)
    nvtx=None,                  # NVTX ranges per stage (default: on when CUDA and nvtx are available)
    use_reference=False,        # run every op on its pure-torch reference
    # CUDA graphs (runtime/graphs.py, docs/architecture.md §4): opt-in, capture NOT yet verified on a GPU.
    # On CUDA the LLM decode step, the TTS AR step and the steady codec window (per bucket x window
    # size, model/codec_graphs.py) are captured at engine start and replayed with padded rows; on CPU
    # the same static-buffer paths run eagerly (same tokens, same audio).
    cuda_graphs=False,
    cuda_graph_buckets=DEFAULT_BUCKETS,  # batch sizes captured; larger batches run eagerly
    # the steady codec windows on the static-buffer steps (model/codec_graphs.py; the same samples as
    # the slab push, with less Python per window). None: on with cuda_graphs, and on CPU (where they
    # run eagerly: codec time per window 0.64-0.93x the slab push's, bench/RESULTS.md)
    codec_static_windows=None,
)


def _cache_root() -> Path:
    env = os.environ.get("VITA_ENGINE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vita_engine"


def tiny_checkpoint(seed: int = 0) -> Path:
    """The tiny random checkpoint in a cache folder, written once (atomically).

    The folder name carries a digest of the generator's source, so a changed tiny model (sizes,
    weight shaping) is never served from a cache written by an older version."""
    import hashlib

    from .. import testing
    from ..testing import make_tiny_checkpoint

    digest = hashlib.sha256(Path(testing.__file__).read_bytes()).hexdigest()[:12]
    d = _cache_root() / f"tiny-seed{seed}-{digest}"
    if (d / "config.json").is_file() and (d / "vita_tts_ckpt" / "codec" / "final.pt").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=d.parent))
    make_tiny_checkpoint(tmp / "ckpt", seed=seed)
    try:
        os.replace(tmp / "ckpt", d)
    except OSError:  # another process won the race
        pass
    return d


class Engine:
    """See docs/architecture.md §5. Create with `Engine.from_pretrained(path_or_"tiny", device=..., dtype=...)`."""

    def __init__(self, model, path, options: Dict[str, Any]):
        o = self.options = dict(DEFAULT_OPTIONS)
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise TypeError(f"Engine: unknown options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
        o.update(options)
        if o["nvtx"] is None:
            o["nvtx"] = model.llm.device.type == "cuda"
        self.model, self.path = model, Path(path)
        self.device = model.llm.device
        if model.audio is None:
            warnings.warn("this checkpoint has no audio encoder: push_audio turns are unavailable", stacklevel=3)
        eos = []
        gc = self.path / "generation_config.json"
        if gc.is_file():
            import json

            v = json.loads(gc.read_text()).get("eos_token_id")
            eos = [v] if isinstance(v, int) else list(v or [])
        self.chat = ChatFormat(self.path, eos)
        v = o["vad"]
        self.vad_config = v if v is not None and not isinstance(v, dict) else _compat.VADConfig(**(v or {}))
        graphs = o["cuda_graphs"]
        if not isinstance(graphs, bool):
            raise TypeError(f"Engine: cuda_graphs must be True or False, got {graphs!r}")
        buckets = o["cuda_graph_buckets"] = check_buckets(o["cuda_graph_buckets"])
        bs = int(o["block_size"])
        nblocks = o["kv_blocks"] or int(o["max_sessions"]) * -(-int(o["session_max_tokens"]) // bs)
        # with graphs: one more page, the scratch page of the padded rows (never a session's)
        self.kv = KVPool.for_llm(model.llm, int(nblocks) + graphs, bs)
        self.tts = None
        if model.tts is not None:
            self.tts = _compat.TTSBatchDecoder(model.tts, max_streams=int(o["tts_max_streams"]), block_size=bs,
                                               max_tokens=o["tts_max_tokens"], graph_buckets=buckets if graphs else None)
        llm_graphs = None
        if graphs:
            llm_graphs = LLMDecodeGraphs(model.llm, self.kv, buckets, self.kv.blocks_for(int(o["session_max_tokens"])))
            llm_graphs.capture()  # CUDA only (else the buckets run eagerly): before the scheduler thread exists
            if self.tts is not None:
                self.tts.capture_graphs()
        self.codec = model.codec if model.codec is not None else _compat.load_codec_fallback(self.path)
        self.metrics = MetricsStore()
        self._lock = threading.Lock()
        self._sessions: Dict[int, Session] = {}
        self._next_sid = 0
        self._closed = False
        self.codec_graphs = None
        static = o["codec_static_windows"]
        if static is not None and not isinstance(static, bool):
            raise TypeError(f"Engine: codec_static_windows must be True, False or None (auto), got {static!r}")
        if static is None:
            static = graphs or self.device.type == "cpu"
        if static and self.codec is not None:
            # captured (CUDA + cuda_graphs) before the scheduler thread exists
            self.codec_graphs = self._codec_graphs(buckets, capture=graphs)
        self._scheduler = Scheduler(self)
        self._scheduler.llm.graphs = llm_graphs

    def _codec_graphs(self, buckets, capture: bool = True):
        """The steady codec window on static buffers (model/codec_graphs.py): one step per bucket and
        per window size the policy pushes in steady state, captured on CUDA. The codec's slab gets a
        fixed capacity of two rows per session (a barge-in's dropped stream frees its row when it is
        collected); a steady stream that finds it full stays on its own buffers (exact, eager)."""
        from ..model.codec import Codec
        from ..model.codec_graphs import CodecSlabGraphs
        from .policy import make_policy

        if not isinstance(self.codec, Codec):
            return None
        windows = make_policy(self.options, codec=self.codec, has_tts=self.tts is not None).codec_steady_windows()
        cg = CodecSlabGraphs(self.codec, buckets, windows, rows=2 * int(self.options["max_sessions"]))
        if capture:
            cg.capture()  # CUDA only (else the steps run eagerly on the same buffers)
        return cg

    @classmethod
    def from_pretrained(cls, path="tiny", device="cpu", dtype=torch.float32, **options) -> "Engine":
        """`path`: a VITA-1.5 checkpoint folder, or "tiny" (the tiny random model, cached on disk)."""
        from ..model import VitaModel

        if str(path) == "tiny":
            path = tiny_checkpoint()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = VitaModel.from_pretrained(path, device=device, dtype=dtype,
                                              use_reference=bool(options.get("use_reference", False)))
        return cls(model, path, options)

    # ---- sessions ----------------------------------------------------------------------------------
    def session(self, system_prompt: Optional[str] = None, *, seed: Optional[int] = None,
                temperature: Optional[float] = None, top_k: Optional[int] = None,
                max_new_tokens: Optional[int] = None) -> Session:
        """A new conversation. Raises CapacityError when the engine is full (session slots or KV
        pages); existing sessions are never slowed down or evicted to make room."""
        o = self.options
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"session: system_prompt must be str or None, got {type(system_prompt).__name__}")
        with self._lock:
            if self._closed:
                raise RuntimeError("Engine is closed")
            if len(self._sessions) >= int(o["max_sessions"]):
                raise CapacityError(f"engine full: {len(self._sessions)} of max_sessions={o['max_sessions']} sessions "
                                    f"open; close one or raise max_sessions")
            blocks = self.kv.reserve(int(o["session_max_tokens"]))
            sid = self._next_sid
            self._next_sid += 1
            s = Session(self, sid, system_prompt, o["seed"] if seed is None else seed,
                        o["temperature"] if temperature is None else temperature,
                        o["top_k"] if top_k is None else top_k,
                        o["max_new_tokens"] if max_new_tokens is None else max_new_tokens)
            self._sessions[sid] = s
        vad = _compat.StreamingVAD(dataclasses.replace(self.vad_config) if dataclasses.is_dataclass(self.vad_config) else self.vad_config)
        fe = _compat.IncrementalAudioFrontend(self.model.audio) if self.model.audio is not None else None
        st = SessionState(s, self.kv.new_sequence(), blocks, vad, fe, int(o["preroll_ms"]) * 16)
        s._state = st
        self._scheduler.add(st)
        return s

    def _session_closed(self, s: Session) -> None:
        with self._lock:
            self._sessions.pop(s.id, None)

    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ---- inputs ------------------------------------------------------------------------------------
    def _preprocess_image(self, img, max_tiles):
        v = self.model.vision
        if v is None:
            raise ValueError("this checkpoint has no vision tower: images are not supported")
        if isinstance(img, torch.Tensor) and img.dim() == 4:
            return img.to(v.device if hasattr(v, "device") else self.device)
        try:
            return v.preprocess(img, max_tiles=max_tiles)
        except (TypeError, ValueError):
            raise
        except Exception as e:
            raise ValueError(f"push_image: cannot preprocess {type(img).__name__}: {e}") from e

    # ---- metrics / lifecycle -----------------------------------------------------------------------
    def metrics_summary(self) -> Dict[str, Dict[str, float]]:
        """p50/p90/p99 (and n, mean, max) of every §7 key across all finished turns and sessions."""
        return self.metrics.summary()

    def scheduler_stats(self, reset: bool = False) -> Dict[str, Any]:
        """The scheduler's per-tick figures over the ticks since the engine started (or the last reset):
        `tick_ms`, `host_ms` (CPU time of the scheduler thread) and the wall time of each stage
        (`turns_ms`, `llm_ms`, `tts_ms`, `codec_ms`) as {n, mean, p50, p90, p99, max}; the mean work per
        tick (`sessions_per_tick`, `llm_forwards_per_tick`, `llm_rows_per_tick`, `tts_steps_per_tick`,
        `codec_pushes_per_tick`); `ticks` (ticks that did work), `idle_waits`; and `policy` (the
        scheduling policy and its codec window sizes). `reset=True` starts a new window after reading."""
        sch = self._scheduler
        out = sch.tick_stats.summary()
        out["policy"] = sch.policy.describe()
        if reset:
            sch.tick_stats.reset()
        return out

    @property
    def stats(self) -> dict:
        """Counters and memory figures (read-only, any thread; the server's /metrics exports them)."""
        kv = self.kv.usage()
        out = {"sessions": self.num_sessions, "kv_blocks": kv["blocks"], "kv_free_blocks": kv["free"],
               "kv_reserved_blocks": kv["reserved"], "kv_block_size": kv["block_size"],
               "kv_session_blocks": kv["sequence_blocks"], "ticks": self._scheduler.ticks,
               "llm_forwards": self._scheduler.llm.forwards, "llm_rows": self._scheduler.llm.rows,
               "llm_graph_forwards": self._scheduler.llm.graph_forwards, "cuda_graphs_captured": self._graphs_captured(),
               "codec_graph_pushes": int(getattr(self.codec, "push_stats", {}).get("graph_pushes", 0)),
               "tick_errors": self._scheduler.tick_errors}
        tts = self.tts
        if tts is not None:
            for _ in range(3):  # active() copies a dict the scheduler thread may be resizing
                try:
                    out["tts_streams_active"] = len(tts.active())
                    break
                except RuntimeError:
                    continue
            out.update(tts_streams_max=tts.max_streams, tts_blocks=tts.num_blocks, tts_free_blocks=tts.free_blocks)
        return out

    def _graphs_captured(self) -> int:
        """CUDA graphs captured (LLM + TTS buckets, codec steps): 0 without cuda_graphs, and on CPU (static buffers, eager)."""
        n = 0
        g = self._scheduler.llm.graphs
        if g is not None:
            n += len(g.runner.graphs)
        tg = getattr(self.tts, "_graphs", None)
        if tg is not None:
            n += len(tg.graphs)
        if self.codec_graphs is not None:
            n += len(self.codec_graphs.graphs)
        return n

    @property
    def tick_histograms(self):
        """Cumulative histograms of busy scheduler ticks (metrics.TickHistograms: tick_ms and host
        overhead outside the model stages), for /metrics; `scheduler_stats()` has the percentiles."""
        return self._scheduler.tick_hist

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.values())
        for s in sessions:
            s.close()
        self._scheduler.stop()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

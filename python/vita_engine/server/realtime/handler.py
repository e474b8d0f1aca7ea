"""`RealtimeHandler`: one OpenAI-Realtime conversation on one engine Session, independent of the
transport. The WebSocket route (ws.py) and the WebRTC transport feed it decoded client events
(`handle`) and media-track audio (`push_input_audio`); it answers through `send_event(dict)` (an
async callable returning False once the transport is gone) and, for WebRTC, writes the answer audio
to an `audio_out` object instead of sending `response.output_audio.delta` events:

    audio_out.write(pcm24k: np.ndarray float32, item_id: str) -> None
    audio_out.clear() -> float      # ms of the current item played; the rest is dropped
    audio_out.played_ms() -> float  # ms of the current item played so far

With `audio_out` the handler emits `output_audio_buffer.started/stopped/cleared` and, on barge-in,
truncates the history itself to what was played (as OpenAI does over WebRTC)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import math
import time
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional

import numpy as np

from . import audio as A
from .config import SessionConfig
from .events import ClientError, error_event, new_id, out_event, validate

log = logging.getLogger("vita_engine.server.realtime")

try:  # the runtime's class when available (the transports tell a refusal by it, or by its name)
    from vita_engine.runtime import CapacityError  # type: ignore
except Exception:  # noqa: BLE001
    class CapacityError(RuntimeError):  # type: ignore[no-redef]
        pass

MIN_COMMIT_MS = 100  # the spec's smallest committable input buffer
OUT_SR = 24000


class _Response:
    """One response (one engine turn) as the client sees it."""

    def __init__(self, rid: str, params: dict, cfg: SessionConfig):
        self.id = rid
        self.item_id = new_id("item")
        self.modalities = params.get("output_modalities") or list(cfg.output_modalities)
        self.max_tokens = params.get("max_output_tokens", cfg.max_output_tokens)
        self.metadata = params.get("metadata")
        self.turn: Optional[int] = None
        self.text = ""
        self.samples = 0  # answer audio produced (24 kHz)
        self.status = "in_progress"
        self.reason: Optional[str] = None
        self.error: Optional[dict] = None
        self.cancel_requested = False
        self.metrics: dict = {}
        self.audio_started = False  # output_audio_buffer.started sent (audio_out)
        self.truncate_ms: Optional[float] = None  # played audio to trim the history to once the turn ends
        self.cleared = False  # audio_out: its unplayed audio was dropped (no output_audio_buffer.stopped)

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def audio_ms(self) -> float:
        return self.samples * 1000.0 / OUT_SR


class RealtimeHandler:
    def __init__(self, server, send_event: Callable[[dict], Awaitable[bool]], *, beta: bool = False,
                 audio_out=None, initial_session: Optional[dict] = None, model: str = "vita-1.5"):
        self.srv, self._send, self.beta, self.audio_out = server, send_event, bool(beta), audio_out
        self.engine = server.engine
        self.scfg = getattr(server, "config", None)
        self.cfg = SessionConfig(self.engine, model=model, session_id=new_id("sess"),
                                 replica=getattr(self.scfg, "replica", None))
        self.initial_session = initial_session
        self.session = None
        self.closed = False
        self._slot = False
        self._pump: Optional[asyncio.Task] = None
        self._stopped_task: Optional[asyncio.Task] = None
        # conversation: item id -> item (GA shape); order of ids (previous_item_id)
        self.items: Dict[str, dict] = {}
        self.order: List[str] = []
        # input: manual mode keeps the uncommitted buffer (16 kHz float32) in the handler
        self._resampler = None
        self.buf: List[np.ndarray] = []
        self.buf_samples = 0  # 16 kHz samples in `buf`
        self.in_samples = 0  # 16 kHz input samples since the start (audio_start_ms in manual mode)
        self.pending_audio: List[np.ndarray] = []  # committed / created user audio not yet answered (16 kHz)
        self.pending_text: List[str] = []
        self.speech_item: Optional[str] = None  # the user item of the utterance the VAD is hearing
        self.held_items = 0  # VAD utterances held in the engine (create_response false)
        # output: turns expected from the engine, in order: ("vad", None) or ("create", params)
        self.expected: Deque[tuple] = collections.deque()
        self.resp: Optional[_Response] = None  # the response in progress
        self.creating = 0  # response.create sent to the engine whose turn did not start yet
        self.last_assistant: Optional[str] = None
        self.responses: Dict[str, _Response] = {}  # by item id (truncate)

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the engine session (CapacityError when the server or the engine is full) and send
        `session.created` (then an `error` per unsupported field of `initial_session`)."""
        cfg = self.scfg
        if cfg is not None and hasattr(self.srv, "active") and self.srv.active >= cfg.max_sessions:
            raise CapacityError(f"server busy: {self.srv.active}/{cfg.max_sessions} sessions in use, try again later")
        errs: List[ClientError] = []
        if self.initial_session:
            errs = self.cfg.apply(self.initial_session)  # ClientError propagates: a bad initial config
        self.session = self.engine.session(system_prompt=self.cfg.instructions)
        if hasattr(self.srv, "active"):
            self.srv.active += 1
            self._slot = True
            m = getattr(self.srv, "metrics", None)
            if m is not None:
                m.sessions_active.inc()
                m.sessions_total.inc()
        self._engine_opts = self.cfg.engine_options()
        self.session.configure(**self._engine_opts)
        self._pump = asyncio.create_task(self._pump_events(), name=f"realtime-pump-{self.cfg.id}")
        await self.emit({"type": "session.created", "session": self.cfg.render(self.beta)})
        for e in errs:
            await self._error(e, None)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in (self._pump, self._stopped_task):
            if t is not None:
                t.cancel()
        s = self.session
        if s is not None:
            try:
                await asyncio.to_thread(s.close)
            except Exception:  # noqa: BLE001
                log.exception("realtime session %s: close failed", self.cfg.id)
        if self._slot:
            self._slot = False
            self.srv.active -= 1
            m = getattr(self.srv, "metrics", None)
            if m is not None:
                m.sessions_active.dec()

    # ---- sending -----------------------------------------------------------------------------------
    async def emit(self, ev: dict) -> bool:
        ev.setdefault("event_id", new_id("event"))
        ev = out_event(ev, self.beta)
        if ev is None or self.closed:
            return not self.closed
        return await self._send(ev)

    async def _error(self, e: ClientError, event_id: Optional[str]) -> None:
        m = getattr(self.srv, "metrics", None)
        if m is not None:
            m.errors.labels(e.code or "error").inc()
        await self._send(error_event(e.message, e.code, e.param, event_id, e.type))

    # ---- client events -----------------------------------------------------------------------------
    async def handle(self, event: Any) -> None:
        """One client event (decoded JSON). Every problem becomes an `error` event; never raises for
        bad input."""
        eid = event.get("event_id") if isinstance(event, dict) and isinstance(event.get("event_id"), str) else None
        try:
            ev = validate(event)
            await getattr(self, "_on_" + ev["type"].replace(".", "_"))(ev)
        except ClientError as e:
            await self._error(e, eid)
        except (ValueError, TypeError) as e:  # the runtime rejected an input (its message says why)
            await self._error(ClientError(f"{type(e).__name__}: {e}"[:400], "invalid_value"), eid)
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ == "SessionClosedError":
                raise
            log.exception("realtime session %s: error handling %r", self.cfg.id, event.get("type"))
            await self._error(ClientError(f"internal error: {type(e).__name__}: {e}"[:400], "internal_error",
                                          type="server_error"), eid)

    async def _on_session_update(self, ev: dict) -> None:
        was_manual = self.cfg.manual
        errs = self.cfg.apply(ev["session"])
        new = self.cfg.engine_options()
        # only what changed: a new VAD config restarts the detector (an utterance in progress is lost)
        opts = {k: v for k, v in new.items() if self._engine_opts.get(k) != v}
        self._engine_opts = new
        if "instructions" in ev["session"]:
            opts["system_prompt"] = self.cfg.instructions
        if opts:
            self.session.configure(**opts)
        if was_manual != self.cfg.manual:  # the input buffer belongs to one mode
            self.buf, self.buf_samples, self.speech_item = [], 0, None
        await self.emit({"type": "session.updated", "session": self.cfg.render(self.beta)})
        for e in errs:
            await self._error(e, ev.get("event_id"))

    async def _on_transcription_session_update(self, ev: dict) -> None:
        raise ClientError("transcription sessions are not supported by this server", "unsupported_value", "type")

    # input audio
    def _decode_audio(self, data: str, param: str):
        pcm, sr = A.decode(data, self.cfg.input_format, param)
        return pcm, sr

    async def _on_input_audio_buffer_append(self, ev: dict) -> None:
        pcm, sr = self._decode_audio(ev["audio"], "audio")
        if pcm.size:
            self._input(pcm, sr)

    def push_input_audio(self, pcm16k: np.ndarray) -> None:
        """Audio from a media track (float32 16 kHz): the same path as input_audio_buffer.append."""
        x = np.asarray(pcm16k, dtype=np.float32).reshape(-1)
        if x.size and not self.closed:
            self._input(x, 16000)

    def _input(self, pcm: np.ndarray, sr: int) -> None:
        if self.cfg.manual:
            x = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm
            if sr != 16000:
                if self._resampler is None or self._resampler[0] != sr:
                    from vita_engine.runtime.audio_in import Resampler

                    self._resampler = (sr, Resampler(sr, 16000))
                x = self._resampler[1].process(x)
            self.buf.append(np.asarray(x, dtype=np.float32))
            self.buf_samples += x.size
            self.in_samples += x.size
        else:
            self.session.push_audio(pcm, sr)
            self.in_samples += int(round(pcm.size * 16000 / sr))

    async def _on_input_audio_buffer_commit(self, ev: dict) -> None:
        if not self.cfg.manual:
            raise ClientError("with server_vad turn detection the VAD commits the input audio buffer; set "
                              "turn_detection to null to commit it yourself", "invalid_value", "type")
        ms = self.buf_samples / 16.0
        if ms < MIN_COMMIT_MS:
            raise ClientError(f"Error committing input audio buffer: buffer too small. Expected at least "
                              f"{MIN_COMMIT_MS}ms of audio, but buffer only has {ms:.2f}ms of audio.",
                              "input_audio_buffer_commit_empty")
        x = np.concatenate(self.buf)
        self.buf, self.buf_samples = [], 0
        item_id = new_id("item")
        prev = self.order[-1] if self.order else None
        self.pending_audio.append(x)
        await self.emit({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": prev})
        await self._add_item(self._user_item(item_id, [{"type": "input_audio", "transcript": None}]), prev)

    async def _on_input_audio_buffer_clear(self, ev: dict) -> None:
        self.buf, self.buf_samples = [], 0
        if not self.cfg.manual:
            self.session.clear_held()
            self.held_items = 0
        await self.emit({"type": "input_audio_buffer.cleared"})

    async def _on_input_image_buffer_append(self, ev: dict) -> None:
        """Extension (camera frames): base64 JPEG/PNG -> Session.push_video_frame at the input time."""
        raw = A.b64decode(ev["image"], "image")
        ts = self.in_samples / 16000.0
        await asyncio.to_thread(lambda: self.session.push_video_frame(self._image(raw, "image"), ts))

    def _image(self, raw: bytes, param: str):
        from ..app import _decode_image
        from .. import protocol as P

        lim = getattr(self.scfg, "max_image_pixels", 4096 * 4096)
        try:
            return _decode_image(raw, lim)
        except P.ProtocolError as e:
            raise ClientError(str(e), "invalid_image", param) from None

    # conversation
    def _user_item(self, item_id: str, content: list) -> dict:
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": content}

    async def _add_item(self, item: dict, prev: Optional[str]) -> None:
        self.items[item["id"]] = item
        self.order.append(item["id"])
        await self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.emit({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    async def _on_conversation_item_create(self, ev: dict) -> None:
        item = ev["item"]
        typ, role = item.get("type", "message"), item.get("role")
        if typ != "message":
            raise ClientError(f"item type {typ!r} is not supported (only 'message' items)", "unsupported_value",
                              "item.type")
        if role != "user":
            raise ClientError(f"only user messages can be created (the model's own history comes from its "
                              f"answers), got role {role!r}", "unsupported_value", "item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ClientError("item.content must be a non-empty list", "invalid_value", "item.content")
        texts, audios, images, shown = [], [], [], []
        for i, part in enumerate(content):
            p = f"item.content[{i}]"
            if not isinstance(part, dict):
                raise ClientError(f"{p} must be an object", "invalid_type", p)
            t = part.get("type")
            if t in ("input_text", "text"):
                s = part.get("text")
                if not isinstance(s, str) or not s.strip():
                    raise ClientError(f"{p}.text must be a non-empty string", "invalid_value", f"{p}.text")
                lim = getattr(self.scfg, "max_text_chars", 8000)
                if len(s) > lim:
                    raise ClientError(f"{p}.text is longer than {lim} characters", "invalid_value", f"{p}.text")
                texts.append(s)
                shown.append({"type": "input_text", "text": s})
            elif t == "input_audio":
                data = part.get("audio")
                if not isinstance(data, str):
                    raise ClientError(f"{p}.audio must be a base64 string", "invalid_type", f"{p}.audio")
                pcm, sr = self._decode_audio(data, f"{p}.audio")
                if pcm.size * 1000 / sr < MIN_COMMIT_MS:
                    raise ClientError(f"{p}.audio is shorter than {MIN_COMMIT_MS} ms", "invalid_value", f"{p}.audio")
                from vita_engine.runtime.audio_in import Resampler

                x = pcm.astype(np.float32) / 32768.0
                audios.append(Resampler(sr, 16000).process(x) if sr != 16000 else x)
                shown.append({"type": "input_audio", "transcript": part.get("transcript")})
            elif t == "input_image":
                url = part.get("image_url")
                images.append(self._image(_data_url(url, f"{p}.image_url"), f"{p}.image_url"))
                shown.append({"type": "input_image", "image_url": None, "detail": part.get("detail", "auto")})
            else:
                raise ClientError(f"{p}.type {t!r} is not supported (input_text, input_audio, input_image)",
                                  "unsupported_value", f"{p}.type")
        for im in images:  # attached to the next turn (VAD or response.create)
            await asyncio.to_thread(self.session.push_image, im)
        self.pending_text += texts
        self.pending_audio += audios
        item_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] not in self.items else new_id("item")
        prev = ev.get("previous_item_id") or (self.order[-1] if self.order else None)
        await self._add_item(self._user_item(item_id, shown), prev)

    async def _on_conversation_item_retrieve(self, ev: dict) -> None:
        item = self.items.get(ev["item_id"])
        if item is None:
            raise ClientError(f"Item with item_id not found: {ev['item_id']}", "item_not_found", "item_id")
        await self.emit({"type": "conversation.item.retrieved", "item": item})

    async def _on_conversation_item_delete(self, ev: dict) -> None:
        if ev["item_id"] not in self.items:
            raise ClientError(f"Item with item_id not found: {ev['item_id']}", "item_not_found", "item_id")
        raise ClientError("deleting conversation items is not supported by this server (the model's KV cache holds "
                          "the history; truncate the last answer instead)", "unsupported_value", "item_id")

    async def _on_conversation_item_truncate(self, ev: dict) -> None:
        iid, ms = ev["item_id"], int(ev["audio_end_ms"])
        item = self.items.get(iid)
        if item is None:
            raise ClientError(f"Item with item_id not found: {iid}", "item_not_found", "item_id")
        if item.get("role") != "assistant":
            raise ClientError("Only assistant messages can be truncated.", "invalid_value", "item_id")
        if ev["content_index"] != 0:
            raise ClientError(f"Invalid content_index {ev['content_index']}: the item has one content part (0).",
                              "invalid_value", "content_index")
        r = self.responses.get(iid)
        if r is None or not r.audio:
            raise ClientError("Only items with audio content can be truncated.", "invalid_value", "item_id")
        if ms > r.audio_ms + 1e-6:
            raise ClientError(f"Audio content of {r.audio_ms:.0f}ms is already shorter than {ms}ms",
                              "invalid_value", "audio_end_ms")
        if r is self.resp:  # still answering (as the handler knows): stop, and trim once the turn ended
            self._stop_at(r, ms, "client_cancelled")
        else:
            if iid != self.last_assistant:
                raise ClientError("only the latest assistant item can be truncated by this server",
                                  "unsupported_value", "item_id")
            self.session.truncate_answer(r.turn, ms / 1000.0)
        await self.emit({"type": "conversation.item.truncated", "item_id": iid, "content_index": 0,
                         "audio_end_ms": ms})

    # responses
    async def _on_response_create(self, ev: dict) -> None:
        if self.resp is not None or self.creating:
            rid = self.resp.id if self.resp is not None else "pending"
            raise ClientError(f"Conversation already has an active response in progress: {rid}. Wait until the "
                              "response is finished before creating a new one.",
                              "conversation_already_has_active_response")
        spec = ev.get("response") or {}
        params: Dict[str, Any] = {}
        errs = []
        for k, v in spec.items():
            p = f"response.{k}"
            if k in ("output_modalities", "modalities"):
                from .config import _modalities

                params["output_modalities"] = _modalities(v, p)
            elif k in ("max_output_tokens", "max_response_output_tokens"):
                from .config import _max_tokens

                params["max_output_tokens"] = _max_tokens(v, p)
            elif k == "metadata":
                params["metadata"] = v
            elif k == "conversation":
                if v not in (None, "auto"):
                    raise ClientError("out-of-band responses (conversation 'none') are not supported",
                                      "unsupported_value", p)
            elif k in ("voice", "audio"):
                pass  # one voice, pcm 24 kHz: nothing to choose
            elif v not in (None, [], "auto"):
                errs.append(ClientError(f"'{k}' is not supported per response by this server; ignored.",
                                        "unsupported_parameter", p))
        mods = params.get("output_modalities") or self.cfg.output_modalities
        audio = np.concatenate(self.pending_audio) if self.pending_audio else None
        text = "\n".join(self.pending_text) or None
        if audio is None and text is None and not self.held_items:
            raise ClientError("nothing to respond to: commit input audio or create a user item first",
                              "invalid_value", "response")
        self.pending_audio, self.pending_text, self.held_items = [], [], 0
        self.session.respond(audio, 16000, text=text, speak="audio" in mods,
                             max_new_tokens=self.cfg.max_tokens(params.get("max_output_tokens")))
        self.expected.append(("create", params))
        self.creating += 1
        for e in errs:
            await self._error(e, ev.get("event_id"))

    async def _on_response_cancel(self, ev: dict) -> None:
        rid = ev.get("response_id")
        r = self.resp
        if r is None and not self.creating:
            raise ClientError("Cancellation failed: no active response found", "response_cancel_not_active")
        if rid is not None and r is not None and rid != r.id:
            raise ClientError(f"Cancellation failed: response {rid} is not active", "response_cancel_not_active",
                              "response_id")
        if r is None:  # not started in the engine yet: cancelled at its start
            for i, (src, p) in enumerate(self.expected):
                if src == "create":
                    self.expected[i] = (src, dict(p, _cancel=True))
                    break
            return
        r.cancel_requested = True
        r.reason = r.reason or "client_cancelled"
        self.session.interrupt()

    async def _on_output_audio_buffer_clear(self, ev: dict) -> None:
        if self.audio_out is None:
            raise ClientError("output_audio_buffer.clear is for WebRTC sessions (audio over the media track)",
                              "invalid_value", "type")
        await self._clear_output("client_cancelled")

    async def _clear_output(self, reason: str) -> None:
        """WebRTC: drop the unplayed audio, stop the answer, keep in the history what was played."""
        r = self.resp or (self.responses.get(self.last_assistant) if self.last_assistant else None)
        played = float(self.audio_out.clear())
        if r is None or not r.audio_started or (r is not self.resp and (r.cleared or played >= r.audio_ms - 1.0)):
            return  # nothing of an answer was still playing
        r.cleared = True
        await self.emit({"type": "output_audio_buffer.cleared", "response_id": r.id})
        if played < r.audio_ms:  # the server truncates the history itself: say where (as `truncate` would)
            await self.emit({"type": "conversation.item.truncated", "item_id": r.item_id, "content_index": 0,
                             "audio_end_ms": int(played)})
        if r is self.resp:
            self._stop_at(r, played, reason)
        elif r.item_id == self.last_assistant and r.turn is not None:
            # the engine had finished this answer, the peer was still playing it
            self.session.truncate_answer(r.turn, played / 1000.0)

    def _stop_at(self, r: _Response, played_ms: float, reason: str) -> None:
        """Stop the answer in flight and keep `played_ms` of it in the history. The engine may have
        ended the turn already (its own barge-in, or the end of the answer racing this): the trim is
        then applied after the turn, at its TurnEnd (Session.truncate_answer)."""
        r.truncate_ms = played_ms if r.truncate_ms is None else min(r.truncate_ms, played_ms)
        r.cancel_requested = True
        r.reason = r.reason or reason
        self.session.interrupt()  # (no playback_position: it would race the engine's own barge-in)

    # ---- engine events -----------------------------------------------------------------------------
    async def _pump_events(self) -> None:
        try:
            async for ev in self.session.events():
                if self.closed:
                    return
                h = getattr(self, "_ev_" + type(ev).__name__, None)
                if h is not None:
                    await h(ev)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.exception("realtime session %s: event stream failed", self.cfg.id)
            await self._send(error_event(f"engine error: {type(e).__name__}: {e}"[:400], "internal_error",
                                         type="server_error"))

    async def _ev_SpeechStarted(self, ev) -> None:
        self.speech_item = new_id("item")
        if self.audio_out is not None and self.cfg.turn_detection and self.cfg.turn_detection["interrupt_response"]:
            await self._clear_output("turn_detected")
        elif self.resp is not None and self.cfg.turn_detection and self.cfg.turn_detection["interrupt_response"]:
            self.resp.reason = self.resp.reason or "turn_detected"
        await self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(ev.audio_start_ms),
                         "item_id": self.speech_item})

    async def _ev_SpeechStopped(self, ev) -> None:
        iid = self.speech_item or new_id("item")
        self.speech_item = None
        await self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(ev.audio_end_ms),
                         "item_id": iid})
        if ev.status == "discarded":  # shorter than the VAD's min_speech_ms: no user item
            return
        prev = self.order[-1] if self.order else None
        await self.emit({"type": "input_audio_buffer.committed", "item_id": iid, "previous_item_id": prev})
        await self._add_item(self._user_item(iid, [{"type": "input_audio", "transcript": None}]), prev)
        if ev.status == "turn":
            self.expected.append(("vad", {}))
        else:
            self.held_items += 1

    async def _ev_TurnStarted(self, ev) -> None:
        src, params = self.expected.popleft() if self.expected else ("vad", {})
        if src == "create":
            self.creating = max(0, self.creating - 1)
        r = _Response(new_id("resp"), params, self.cfg)
        r.turn = int(ev.turn)
        self.resp = r
        self.responses[r.item_id] = r
        await self.emit({"type": "response.created", "response": self._response_obj(r, [])})
        item = {"id": r.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self.items[r.item_id] = item
        prev = self.order[-1] if self.order else None
        self.order.append(r.item_id)
        await self.emit({"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item})
        await self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        part = {"type": "audio", "transcript": ""} if r.audio else {"type": "text", "text": ""}
        await self.emit({"type": "response.content_part.added", "response_id": r.id, "item_id": r.item_id,
                         "output_index": 0, "content_index": 0, "part": part})
        if params.get("_cancel"):
            r.cancel_requested, r.reason = True, "client_cancelled"
            self.session.interrupt()

    def _ids(self, r: _Response) -> dict:
        return {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}

    async def _ev_TextDelta(self, ev) -> None:
        r = self.resp
        if r is None or not ev.text:
            return
        r.text += ev.text
        t = "response.output_audio_transcript.delta" if r.audio else "response.output_text.delta"
        await self.emit({"type": t, **self._ids(r), "delta": ev.text})

    async def _ev_AudioChunk(self, ev) -> None:
        r = self.resp
        if r is None:
            return
        pcm = A.to_24k(ev.pcm, int(getattr(ev, "sample_rate", OUT_SR)))
        if pcm.size == 0:
            return
        r.samples += pcm.size
        if self.audio_out is not None:
            if not r.audio_started:
                r.audio_started = True
                await self.emit({"type": "output_audio_buffer.started", "response_id": r.id})
            self.audio_out.write(pcm, r.item_id)
            return
        await self.emit({"type": "response.output_audio.delta", **self._ids(r), "delta": A.encode_pcm16(pcm)})

    async def _ev_Interrupted(self, ev) -> None:
        r = self.resp
        if r is not None:
            r.status = "cancelled"
            r.reason = r.reason or "turn_detected"
            m = getattr(self.srv, "metrics", None)
            if m is not None:
                m.interrupted.inc()

    async def _ev_Error(self, ev) -> None:
        r = self.resp
        if r is not None:
            r.status = "failed"
            r.error = {"type": "server_error", "code": "turn_failed", "message": str(ev.message)}
        else:
            await self._send(error_event(str(ev.message), "turn_failed", type="server_error"))

    async def _ev_Metrics(self, ev) -> None:
        if self.resp is not None:
            self.resp.metrics = dict(ev.values)
        m = getattr(self.srv, "metrics", None)
        if m is not None:
            for key, hist in (("ttfa_ms", m.ttfa), ("response_ms", m.response)):
                v = ev.values.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0:
                    hist.observe(float(v) / 1e3)

    async def _ev_TurnEnd(self, ev) -> None:
        r = self.resp
        if r is None:
            return
        self.resp = None
        m = getattr(self.srv, "metrics", None)
        if m is not None:
            m.turns.inc()
        if r.status == "in_progress":
            answered = int(r.metrics.get("answer_tokens", 0))
            if r.max_tokens != "inf" and answered >= int(r.max_tokens):
                r.status, r.reason = "incomplete", "max_output_tokens"
            else:  # (a cancel that came after the engine had finished: the answer is whole)
                r.status, r.reason = "completed", None
        ids = self._ids(r)
        if r.audio:
            content = {"type": "output_audio", "transcript": r.text}
            if self.audio_out is None:
                await self.emit({"type": "response.output_audio.done", **ids})
            await self.emit({"type": "response.output_audio_transcript.done", **ids, "transcript": r.text})
            part = {"type": "audio", "transcript": r.text}
        else:
            content = {"type": "output_text", "text": r.text}
            await self.emit({"type": "response.output_text.done", **ids, "text": r.text})
            part = {"type": "text", "text": r.text}
        await self.emit({"type": "response.content_part.done", **ids, "part": part})
        item = self.items[r.item_id]
        item.update(status="completed" if r.status == "completed" else "incomplete", content=[content])
        await self.emit({"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": item})
        prev = self.order[self.order.index(r.item_id) - 1] if self.order.index(r.item_id) else None
        await self.emit({"type": "conversation.item.done", "previous_item_id": prev, "item": item})
        self.last_assistant = r.item_id
        if r.truncate_ms is not None and r.audio and r.truncate_ms < r.audio_ms:
            self.session.truncate_answer(r.turn, r.truncate_ms / 1000.0)
        await self.emit({"type": "response.done", "response": self._response_obj(r, [item])})
        if self.audio_out is not None and r.audio_started and not r.cleared:
            self._stopped_task = asyncio.create_task(self._stopped_when_played(r))
        await self.emit({"type": "vita.metrics", "response_id": r.id, "item_id": r.item_id, "turn": r.turn,
                         "values": {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
                                    for k, v in r.metrics.items()}})

    async def _stopped_when_played(self, r: _Response) -> None:
        """WebRTC: output_audio_buffer.stopped once the transport has played the whole answer."""
        t_end = time.monotonic() + r.audio_ms / 1000.0 + 5.0
        while time.monotonic() < t_end and self.resp is None and not r.cleared:
            if float(self.audio_out.played_ms()) >= r.audio_ms - 1.0:
                break
            await asyncio.sleep(0.02)
        if not r.cleared:
            await self.emit({"type": "output_audio_buffer.stopped", "response_id": r.id})

    def _response_obj(self, r: _Response, output: list) -> dict:
        status_details = None
        if r.status in ("cancelled", "incomplete"):
            status_details = {"type": r.status, "reason": r.reason}
        elif r.status == "failed":
            status_details = {"type": "failed", "error": r.error}
        usage = None
        if r.status != "in_progress":
            mt = r.metrics
            cached, prompt = int(mt.get("cached_tokens", 0)), int(mt.get("prompt_tokens", 0))
            text_out, audio_out = int(mt.get("answer_tokens", 0)), int(mt.get("codec_tokens", 0))
            usage = {"total_tokens": cached + prompt + text_out + audio_out, "input_tokens": cached + prompt,
                     "output_tokens": text_out + audio_out,
                     "input_token_details": {"cached_tokens": cached, "text_tokens": cached + prompt,
                                             "audio_tokens": 0, "image_tokens": 0},
                     "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}
        return {"id": r.id, "object": "realtime.response", "status": r.status, "status_details": status_details,
                "output": output, "conversation_id": None, "output_modalities": list(r.modalities),
                "max_output_tokens": r.max_tokens, "metadata": r.metadata,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": OUT_SR}, "voice": "vita"}},
                "usage": usage}


def _data_url(url: Any, param: str) -> bytes:
    """`data:image/png;base64,...` (or jpeg) -> the file's bytes."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ClientError(f"{param} must be a data URL (data:image/jpeg;base64,... or data:image/png;base64,...); "
                          "remote URLs are not fetched", "invalid_value", param)
    head, _, data = url.partition(",")
    mime = head[5:].split(";")[0].lower()
    if mime not in ("image/png", "image/jpeg", "image/jpg") or ";base64" not in head:
        raise ClientError(f"{param}: expected a base64 PNG or JPEG data URL, got {head[:40]!r}", "invalid_value", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{param} is not valid base64", "invalid_value", param) from None

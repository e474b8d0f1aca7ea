"""The Realtime session config: defaults from the engine, `session.update` merging (GA shape
`audio.input.turn_detection`, or the beta flat shape `turn_detection`, `input_audio_format`, ...),
the mapping of `server_vad` onto the engine's VAD, and the full effective config for
`session.created` / `session.updated` in the client's spelling.

Unsupported fields are never silently ignored: `apply()` returns one `ClientError`
(`invalid_request_error` with `param`) per field it could not honour, and the session lives on
with the rest applied."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from .events import ClientError

VOICE = "vita"  # the one voice the model has
INPUT_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
BETA_FORMATS = {v: k for k, v in INPUT_FORMATS.items()}
MAX_TOKENS_CAP = 4096


class SessionConfig:
    def __init__(self, engine, model: str = "vita-1.5", session_id: str = "", replica: Optional[str] = None):
        o = getattr(engine, "options", {}) or {}
        vad = getattr(engine, "vad_config", None)
        self.id, self.model, self.replica = session_id, model, replica
        self.engine_max_tokens = int(o.get("max_new_tokens", 256))
        self.instructions: Optional[str] = None  # None: the model's own default system prompt
        self.output_modalities: List[str] = ["audio"]
        self.max_output_tokens: Any = "inf"
        self.input_format = "audio/pcm"
        self.default_td: Dict[str, Any] = {
            "type": "server_vad",
            "threshold": float(getattr(vad, "threshold", 0.7)),
            "prefix_padding_ms": int(o.get("preroll_ms", 300)),
            "silence_duration_ms": int(getattr(vad, "min_silence_ms", 500)),
            "create_response": True,
            "interrupt_response": bool(o.get("barge_in", True)),
            "idle_timeout_ms": None,
        }
        self.turn_detection: Optional[Dict[str, Any]] = dict(self.default_td)

    # ---- what the engine gets ----------------------------------------------------------------------
    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    @property
    def speak(self) -> bool:
        return "audio" in self.output_modalities

    def max_tokens(self, v: Any = None) -> int:
        v = self.max_output_tokens if v is None else v
        return self.engine_max_tokens if v == "inf" else int(v)

    def engine_options(self) -> dict:
        """Session.configure() keyword arguments for this config."""
        td = self.turn_detection
        out = {"manual": td is None, "input_events": True, "speak": self.speak,
               "max_new_tokens": self.max_tokens()}
        if td is not None:
            silence = int(td["silence_duration_ms"])
            out["vad"] = {"threshold": float(td["threshold"]), "min_silence_ms": silence,
                          "speculative_silence_ms": min(200, silence)}
            out["preroll_ms"] = int(td["prefix_padding_ms"])
            out["auto_respond"] = bool(td["create_response"])
            out["barge_in"] = bool(td["interrupt_response"])
        return out

    # ---- session.update ----------------------------------------------------------------------------
    def apply(self, upd: dict) -> List[ClientError]:
        """Merge a `session.update` session object (GA or beta shape) into this config; bad values raise
        ClientError before anything changes; unsupported fields come back as errors (the rest applies)."""
        if not isinstance(upd, dict):
            raise ClientError("session must be an object", "invalid_type", "session")
        new = copy.deepcopy(self)
        errs: List[ClientError] = []
        u = dict(upd)
        audio = u.pop("audio", None) or {}
        if not isinstance(audio, dict):
            raise ClientError("session.audio must be an object", "invalid_type", "session.audio")
        ain, aout = audio.get("input") or {}, audio.get("output") or {}
        for k in set(audio) - {"input", "output"}:
            errs.append(_unknown(f"session.audio.{k}"))
        for name, val in u.items():
            p = f"session.{name}"
            if name in ("type", "object", "id", "expires_at", "client_secret"):
                if name == "type" and val not in ("realtime", None):
                    errs.append(ClientError(f"Only 'realtime' sessions are supported, got {val!r}.", "unsupported_value", p))
            elif name == "model":
                if not isinstance(val, str):
                    raise ClientError("session.model must be a string", "invalid_type", p)
                new.model = val
            elif name == "instructions":
                if val is not None and not isinstance(val, str):
                    raise ClientError("session.instructions must be a string", "invalid_type", p)
                new.instructions = val or None
            elif name in ("output_modalities", "modalities"):
                new.output_modalities = _modalities(val, p)
            elif name in ("max_output_tokens", "max_response_output_tokens"):
                new.max_output_tokens = _max_tokens(val, p)
            elif name == "input_audio_format":  # beta
                if val not in BETA_FORMATS:
                    raise ClientError(f"Invalid value: {val!r}. Supported values are: 'pcm16', 'g711_ulaw', 'g711_alaw'.",
                                      "invalid_value", p)
                new.input_format = BETA_FORMATS[val]
            elif name == "output_audio_format":  # beta
                if val != "pcm16":
                    errs.append(ClientError("Only 'pcm16' (24 kHz) audio output is supported.", "unsupported_value", p))
            elif name == "turn_detection":  # beta
                new._turn_detection(val, p)
            elif name == "voice":  # beta
                errs += _voice(val, p)
            elif name in ("tools", "tool_choice", "temperature", "input_audio_transcription", "transcription",
                          "input_audio_noise_reduction", "tracing", "prompt", "include", "reasoning", "truncation",
                          "parallel_tool_calls", "speed"):
                if not _is_default(name, val):
                    errs.append(_unsupported(name, p))
            else:
                errs.append(_unknown(p))
        if ain:
            if not isinstance(ain, dict):
                raise ClientError("session.audio.input must be an object", "invalid_type", "session.audio.input")
            for name, val in ain.items():
                p = f"session.audio.input.{name}"
                if name == "format":
                    new.input_format = _format(val, p)
                elif name == "turn_detection":
                    new._turn_detection(val, p)
                elif name in ("transcription", "noise_reduction"):
                    if val is not None:
                        errs.append(_unsupported(name, p))
                else:
                    errs.append(_unknown(p))
        if aout:
            if not isinstance(aout, dict):
                raise ClientError("session.audio.output must be an object", "invalid_type", "session.audio.output")
            for name, val in aout.items():
                p = f"session.audio.output.{name}"
                if name == "format":
                    if _format(val, p) != "audio/pcm":
                        errs.append(ClientError("Only audio/pcm at 24 kHz output is supported.", "unsupported_value", p))
                elif name == "voice":
                    errs += _voice(val, p)
                elif name == "speed":
                    if val not in (None, 1, 1.0):
                        errs.append(ClientError("'speed' is not supported (the model speaks at its own pace).",
                                                "unsupported_parameter", p))
                else:
                    errs.append(_unknown(p))
        self.__dict__.update(new.__dict__)
        return errs

    def _turn_detection(self, val: Any, p: str) -> None:
        if val is None:
            self.turn_detection = None
            return
        if not isinstance(val, dict):
            raise ClientError(f"{p} must be an object or null", "invalid_type", p)
        typ = val.get("type", "server_vad")
        if typ != "server_vad":
            raise ClientError(f"Invalid value: {typ!r}. Only 'server_vad' turn detection (or null) is supported.",
                              "unsupported_value", f"{p}.type")
        td = dict(self.turn_detection or self.default_td)
        for k, v in val.items():
            q = f"{p}.{k}"
            if k == "type":
                continue
            if v is None and k != "idle_timeout_ms":
                continue  # null = keep
            if k == "threshold":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                    raise ClientError(f"{q} must be a number in (0, 1), got {v!r}", "invalid_value", q)
                td[k] = float(v)
            elif k in ("prefix_padding_ms", "silence_duration_ms"):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10000:
                    raise ClientError(f"{q} must be an integer in [0, 10000], got {v!r}", "invalid_value", q)
                td[k] = v
            elif k in ("create_response", "interrupt_response"):
                if not isinstance(v, bool):
                    raise ClientError(f"{q} must be a boolean, got {v!r}", "invalid_type", q)
                td[k] = v
            elif k == "idle_timeout_ms":
                if v is not None:
                    raise ClientError("idle_timeout_ms is not supported by this server (vita-engine): leave it null.",
                                      "unsupported_value", q)
            else:
                raise ClientError(f"Unknown parameter: '{q}'.", "unknown_parameter", q)
        self.turn_detection = td

    # ---- session.created / session.updated ---------------------------------------------------------
    def render(self, beta: bool) -> dict:
        td = copy.deepcopy(self.turn_detection)
        if beta:
            out = {"id": self.id, "object": "realtime.session", "model": self.model,
                   "modalities": ["text"] if self.output_modalities == ["text"] else ["text", "audio"],
                   "instructions": self.instructions or "", "voice": VOICE,
                   "input_audio_format": INPUT_FORMATS[self.input_format], "output_audio_format": "pcm16",
                   "input_audio_transcription": None, "input_audio_noise_reduction": None,
                   "turn_detection": td, "tools": [], "tool_choice": "auto",
                   "max_response_output_tokens": self.max_output_tokens, "speed": 1.0, "tracing": None}
            if td is not None:
                td.pop("idle_timeout_ms", None)
        else:
            fmt = {"type": self.input_format, "rate": 24000} if self.input_format == "audio/pcm" else {"type": self.input_format}
            out = {"type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
                   "output_modalities": list(self.output_modalities), "instructions": self.instructions or "",
                   "max_output_tokens": self.max_output_tokens, "tools": [], "tool_choice": "auto",
                   "tracing": None, "truncation": "auto", "prompt": None, "include": None,
                   "audio": {"input": {"format": fmt, "transcription": None, "noise_reduction": None,
                                       "turn_detection": td},
                             "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": VOICE, "speed": 1.0}}}
        if self.replica is not None:
            out["replica"] = self.replica
        return out


def _unsupported(name: str, p: str) -> ClientError:
    return ClientError(f"'{name}' is not supported by this server (vita-engine); the setting is ignored and the "
                       "session goes on.", "unsupported_parameter", p)


def _unknown(p: str) -> ClientError:
    return ClientError(f"Unknown parameter: '{p}'.", "unknown_parameter", p)


def _modalities(val: Any, p: str) -> List[str]:
    if not isinstance(val, list) or not val or not all(isinstance(m, str) for m in val) or set(val) - {"text", "audio"}:
        raise ClientError(f"{p} must be ['audio'] or ['text'] (beta: ['text', 'audio'] or ['text']), got {val!r}",
                          "invalid_value", p)
    return ["audio"] if "audio" in val else ["text"]


def _max_tokens(val: Any, p: str) -> Any:
    if val == "inf":
        return "inf"
    if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= MAX_TOKENS_CAP:
        raise ClientError(f"{p} must be an integer in [1, {MAX_TOKENS_CAP}] or 'inf', got {val!r}", "invalid_value", p)
    return val


def _format(val: Any, p: str) -> str:
    if isinstance(val, str):  # a beta-style string given in the GA place
        val = {"type": BETA_FORMATS.get(val, val)}
    if not isinstance(val, dict) or val.get("type") not in INPUT_FORMATS:
        raise ClientError(f"{p} must be {{'type': 'audio/pcm', 'rate': 24000}}, {{'type': 'audio/pcmu'}} or "
                          f"{{'type': 'audio/pcma'}}, got {val!r}", "invalid_value", p)
    if val["type"] == "audio/pcm" and val.get("rate", 24000) != 24000:
        raise ClientError(f"{p}.rate must be 24000, got {val.get('rate')!r}", "invalid_value", f"{p}.rate")
    return val["type"]


def _voice(val: Any, p: str) -> List[ClientError]:
    if val in (None, VOICE):
        return []
    return [ClientError(f"voice {val!r} is not available: the model has one voice ({VOICE!r}), which is used.",
                        "unsupported_value", p)]


def _is_default(name: str, val: Any) -> bool:
    return val in (None, [], "auto", "none") or (name == "speed" and val in (1, 1.0)) or (
        name == "truncation" and val == "auto") or (name == "parallel_tool_calls" and val is False)

"""Event names and shapes of the OpenAI Realtime API: the GA spelling (the `openai` SDK's
`types/realtime`) and the beta one (`types/beta/realtime`, header `OpenAI-Beta: realtime=v1`).
Clients may send either spelling; the server answers in the client's (`out_type`)."""
from __future__ import annotations

import uuid
from typing import Any, Dict, Optional

# GA server event -> beta spelling (only the names that differ)
GA_TO_BETA = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
BETA_TO_GA = {v: k for k, v in GA_TO_BETA.items()}
# GA events the beta protocol does not have: not sent to beta clients
GA_ONLY = {"conversation.item.done"}
# assistant content part types: GA -> beta
CONTENT_GA_TO_BETA = {"output_audio": "audio", "output_text": "text"}

# client events -> the fields they require (name: accepted Python types)
CLIENT_EVENTS: Dict[str, Dict[str, tuple]] = {
    "session.update": {"session": (dict,)},
    "input_audio_buffer.append": {"audio": (str,)},
    "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {},
    "input_image_buffer.append": {"image": (str,)},  # extension (Qwen-Omni realtime precedent)
    "conversation.item.create": {"item": (dict,)},
    "conversation.item.truncate": {"item_id": (str,), "content_index": (int,), "audio_end_ms": (int,)},
    "conversation.item.delete": {"item_id": (str,)},
    "conversation.item.retrieve": {"item_id": (str,)},
    "response.create": {},
    "response.cancel": {},
    "output_audio_buffer.clear": {},
    "transcription_session.update": {},
}

def new_id(prefix: str) -> str:
    """OpenAI-style ids: `event_...`, `item_...`, `resp_...`, `sess_...`."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ClientError(Exception):
    """A client event the server cannot honour: becomes an `error` event; the session goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type


def error_event(message: str, code: Optional[str] = None, param: Optional[str] = None,
                event_id: Optional[str] = None, type: str = "invalid_request_error") -> dict:
    """`error {type, code, message, param, event_id}` (RealtimeErrorEvent); `event_id` inside the
    error is the client event that caused it."""
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": type, "code": code, "message": message, "param": param, "event_id": event_id}}


def validate(ev: Any) -> dict:
    """A decoded client event -> itself with the GA name in `type`; ClientError when it is not an
    object with a known `type` and the required fields of the right types."""
    if not isinstance(ev, dict):
        raise ClientError("an event must be a JSON object", "invalid_json")
    t = ev.get("type")
    if not isinstance(t, str) or not t:
        raise ClientError("the event has no string 'type'", "missing_required_parameter", "type")
    eid = ev.get("event_id")
    if eid is not None and not isinstance(eid, str):
        raise ClientError("event_id must be a string", "invalid_type", "event_id")
    t = BETA_TO_GA.get(t, t)
    req = CLIENT_EVENTS.get(t)
    if req is None:
        raise ClientError(f"Invalid value: '{ev.get('type')}'. Supported values are: "
                          + ", ".join(f"'{k}'" for k in CLIENT_EVENTS) + ".", "invalid_value", "type")
    for name, types in req.items():
        v = ev.get(name)
        if v is None:
            raise ClientError(f"Missing required parameter: '{name}'.", "missing_required_parameter", name)
        if not isinstance(v, types) or (int in types and isinstance(v, bool)):
            raise ClientError(f"Invalid type for '{name}': expected {' or '.join(x.__name__ for x in types)}, "
                              f"got {type(v).__name__}.", "invalid_type", name)
    if t == "conversation.item.truncate":
        if ev["audio_end_ms"] < 0:
            raise ClientError("audio_end_ms must be >= 0", "invalid_value", "audio_end_ms")
        if ev["content_index"] < 0:
            raise ClientError("content_index must be >= 0", "invalid_value", "content_index")
    if t == "response.create" and ev.get("response") is not None and not isinstance(ev["response"], dict):
        raise ClientError("response must be an object", "invalid_type", "response")
    return {**ev, "type": t}


def out_event(ev: dict, beta: bool) -> Optional[dict]:
    """A server event (GA spelling) in the client's spelling; None: not sent to this client."""
    if not beta:
        return ev
    t = ev["type"]
    if t in GA_ONLY:
        return None
    ev = dict(ev, type=GA_TO_BETA.get(t, t))
    item = ev.get("item")
    if isinstance(item, dict) and item.get("content"):
        ev["item"] = beta_item(item)
    resp = ev.get("response")
    if isinstance(resp, dict):
        ev["response"] = beta_response(resp)
    return ev


def beta_item(item: dict) -> dict:
    c = [dict(p, type=CONTENT_GA_TO_BETA.get(p.get("type"), p.get("type"))) for p in item.get("content") or []]
    return dict(item, content=c)


def beta_response(r: dict) -> dict:
    r = dict(r)
    mods = r.pop("output_modalities", None)
    if mods is not None:
        r["modalities"] = ["text"] if mods == ["text"] else ["text", "audio"]
    r.pop("audio", None)
    r["output_audio_format"] = "pcm16"
    if "output" in r:
        r["output"] = [beta_item(i) for i in r["output"]]
    return r

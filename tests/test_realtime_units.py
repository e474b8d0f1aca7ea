"""The pieces of `/v1/realtime` without a socket: G.711 decoding, the session config (GA and beta
shapes, the VAD mapping, unsupported fields), the event aliases, the runtime options the endpoint
needs (manual turns, respond(), text-only turns, truncate_answer, system prompt changes), and the
RealtimeHandler with an `audio_out` (the WebRTC contract: no audio deltas, output_audio_buffer
events, the handler truncates the history to what was played)."""
from __future__ import annotations

import asyncio
import math
import time
import types

import numpy as np
import pytest

from _server_helpers import load_engine, run, speech_sample, speechlike

pytest.importorskip("starlette")

from vita_engine.server.realtime import audio as A  # noqa: E402
from vita_engine.server.realtime import events as E  # noqa: E402
from vita_engine.server.realtime.config import SessionConfig  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    eng, real = load_engine()
    if not real:
        pytest.skip("needs the real runtime")
    yield eng
    eng.close()


def _speech16() -> np.ndarray:
    x = speech_sample("question")
    return (x if x is not None else speechlike(2.5)).astype(np.float32) / 32768.0


# ---- audio -----------------------------------------------------------------------------------------
def test_g711_tables_match_the_standard_decoder():
    audioop = pytest.importorskip("audioop")  # the stdlib reference (Python < 3.13)
    b = bytes(range(256))
    assert np.array_equal(A._ULAW, np.frombuffer(audioop.ulaw2lin(b, 2), "<i2"))
    assert np.array_equal(A._ALAW, np.frombuffer(audioop.alaw2lin(b, 2), "<i2"))


def test_audio_decode_errors_and_pcm_roundtrip():
    x = (np.sin(np.arange(2400) / 7) * 0.5).astype(np.float32)
    pcm, sr = A.decode(A.encode_pcm16(x), "audio/pcm")
    assert sr == 24000 and np.abs(pcm / 32767 - x).max() < 1e-4
    with pytest.raises(E.ClientError) as ei:
        A.decode("AAE=" + "", "audio/pcm")  # 2 bytes: fine
        A.decode("AAEC", "audio/pcm")  # 3 bytes: odd
    assert ei.value.param == "audio"
    with pytest.raises(E.ClientError):
        A.decode("@@@", "audio/pcmu")
    pcm, sr = A.decode("/wA=", "audio/pcmu")
    assert sr == 8000 and pcm.tolist() == [0, int(A._ULAW[0])]


# ---- config and events -----------------------------------------------------------------------------
def _cfg(replica=None):
    eng = types.SimpleNamespace(options={"max_new_tokens": 64, "preroll_ms": 300, "barge_in": True},
                                vad_config=types.SimpleNamespace(threshold=0.7, min_silence_ms=500))
    return SessionConfig(eng, session_id="sess_x", replica=replica)


def test_session_update_maps_server_vad_onto_the_engine():
    c = _cfg()
    errs = c.apply({"type": "realtime", "instructions": "Be brief.", "max_output_tokens": 50,
                    "audio": {"input": {"format": {"type": "audio/pcmu"},
                                        "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                                           "prefix_padding_ms": 200, "silence_duration_ms": 150,
                                                           "interrupt_response": False}}}})
    assert errs == []
    o = c.engine_options()
    assert o["vad"] == {"threshold": 0.5, "min_silence_ms": 150, "speculative_silence_ms": 150}
    assert o["preroll_ms"] == 200 and o["barge_in"] is False and o["max_new_tokens"] == 50 and not o["manual"]
    r = c.render(beta=False)
    assert r["audio"]["input"]["format"] == {"type": "audio/pcmu"} and r["instructions"] == "Be brief."
    assert r["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 150 and "replica" not in r
    b = c.render(beta=True)
    assert b["input_audio_format"] == "g711_ulaw" and b["turn_detection"]["threshold"] == 0.5
    assert b["max_response_output_tokens"] == 50 and b["modalities"] == ["text", "audio"]
    assert c.apply({"audio": {"input": {"turn_detection": None}}}) == [] and c.engine_options()["manual"]
    assert _cfg(replica="r2").render(beta=False)["replica"] == "r2"


def test_unsupported_fields_are_reported_and_bad_values_change_nothing():
    c = _cfg()
    errs = c.apply({"voice": "alloy", "tools": [{"type": "function", "name": "f"}], "modalities": ["text"],
                    "temperature": 0.8, "frobnicate": 1, "turn_detection": {"type": "server_vad", "threshold": 0.6}})
    got = {(e.code, e.param) for e in errs}
    assert got == {("unsupported_value", "session.voice"), ("unsupported_parameter", "session.tools"),
                   ("unsupported_parameter", "session.temperature"), ("unknown_parameter", "session.frobnicate")}
    assert c.output_modalities == ["text"] and c.turn_detection["threshold"] == 0.6  # the rest applied
    before = c.render(beta=False)
    for bad, param in (({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}},
                        "session.audio.input.turn_detection.threshold"),
                       ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
                        "session.audio.input.turn_detection.type"),
                       ({"instructions": "x", "max_output_tokens": 0}, "session.max_output_tokens"),
                       ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
                        "session.audio.input.format.rate")):
        with pytest.raises(E.ClientError) as ei:
            c.apply(bad)
        assert ei.value.param == param
    assert c.render(beta=False) == before


def test_event_aliases_both_ways():
    assert E.validate({"type": "response.create"})["type"] == "response.create"
    with pytest.raises(E.ClientError) as ei:
        E.validate({"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": True})
    assert ei.value.param == "audio_end_ms" and ei.value.code == "invalid_type"
    ev = {"type": "response.output_audio.delta", "delta": "AA=="}
    assert E.out_event(ev, beta=False) is ev and E.out_event(ev, beta=True)["type"] == "response.audio.delta"
    assert E.out_event({"type": "conversation.item.done"}, beta=True) is None
    item = {"type": "message", "role": "assistant", "content": [{"type": "output_audio", "transcript": "hi"}]}
    beta = E.out_event({"type": "conversation.item.added", "item": item}, beta=True)
    assert beta["type"] == "conversation.item.created" and beta["item"]["content"][0]["type"] == "audio"
    r = E.out_event({"type": "response.done", "response": {"output_modalities": ["text"], "output": []}}, beta=True)
    assert r["response"]["modalities"] == ["text"] and "output_modalities" not in r["response"]
    err = E.error_event("m", "c", "p", "evt_1")
    assert err["type"] == "error" and err["error"] == {"type": "invalid_request_error", "code": "c", "message": "m",
                                                       "param": "p", "event_id": "evt_1"}


# ---- runtime options -------------------------------------------------------------------------------
def _names(evs):
    return [type(e).__name__ for e in evs]


def test_manual_turns_text_only_and_max_tokens(engine):
    x = _speech16()
    s = engine.session()
    try:
        s.configure(manual=True, input_events=True)
        s.push_audio(x, 16000)
        s.push_audio(np.zeros(16000 * 2, np.float32), 16000)
        with pytest.raises(TimeoutError):  # manual: the VAD ends no turn
            s.next_event(timeout=1.5)
        s.respond(x, 16000, speak=False, max_new_tokens=3)
        evs = s.collect(60)
        n = _names(evs)
        assert n[0] == "TurnStarted" and "AudioChunk" not in n and "SpeechStarted" not in n
        met = next(e.values for e in evs if type(e).__name__ == "Metrics")
        assert met["answer_tokens"] <= 3 and met["codec_tokens"] == 0 and met["audio_encoder_ms"] > 0
        assert engine.stats.get("tts_streams_active", 0) == 0
        s.respond(text="And now speak.", speak=True)
        n = _names(s.collect(60))
        assert "AudioChunk" in n
    finally:
        s.close()


def test_truncate_answer_and_system_prompt_change(engine):
    s = engine.session()
    try:
        s.configure(manual=True, max_new_tokens=24)
        s.respond(text="Tell me something.")
        evs = s.collect(60)
        st = s._state
        turn = next(e.turn for e in evs if type(e).__name__ == "TurnEnd")
        kv0, toks0 = s.kv_length, list(st.records[-1].answer_ids)
        s.truncate_answer(turn + 5, 0.1)  # not the latest turn: refused, nothing changes
        s.truncate_answer(turn, 0.1)
        deadline = time.monotonic() + 5
        while s.kv_length == kv0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert st.stats.get("truncate_refused") == 1 and st.stats.get("truncations") == 1
        toks1 = list(st.records[-1].answer_ids)
        assert s.kv_length < kv0 and len(toks1) < len(toks0) and toks1 == toks0[:len(toks1)]
        s.configure(system_prompt="You are a pirate.")
        s.respond(text="Again.", speak=False)
        met = next(e.values for e in s.collect(60) if type(e).__name__ == "Metrics")
        # the KV restarted: new system prompt + the (trimmed) history replayed + this turn
        assert met["cached_tokens"] == 0 and met["prompt_tokens"] > s.kv_length - met["answer_tokens"] - 1 > 0
        assert s.system_prompt == "You are a pirate." and len(st.records) == 2
    finally:
        s.close()


# ---- the handler with an audio_out (WebRTC) --------------------------------------------------------
class _Out:
    def __init__(self):
        self.written = 0  # samples
        self.items = set()
        self.cleared = 0
        self.limit_ms = math.inf

    def write(self, pcm, item_id):
        assert pcm.dtype == np.float32
        self.written += pcm.size
        self.items.add(item_id)

    def played_ms(self):
        return min(self.limit_ms, self.written / 24.0)

    def clear(self):
        self.cleared += 1
        played = self.played_ms()
        self.written = 0
        return played


def test_handler_with_audio_out_barge_in_truncates_to_played(engine):
    from vita_engine.server import ServerConfig
    from vita_engine.server.realtime import RealtimeHandler

    x = _speech16()

    async def go():
        sent = []
        got = asyncio.Event()

        async def send(ev):
            sent.append(ev)
            got.set()
            return True

        async def wait_for(pred, timeout=30):
            end = time.monotonic() + timeout
            while not pred():
                got.clear()
                await asyncio.wait_for(got.wait(), max(0.01, end - time.monotonic()))

        srv = types.SimpleNamespace(engine=engine, config=ServerConfig(), active=0)
        out = _Out()
        h = RealtimeHandler(srv, send, audio_out=out, initial_session={"max_output_tokens": 1000})
        await h.start()
        assert srv.active == 1 and sent[0]["type"] == "session.created"
        h.push_input_audio(x)
        h.push_input_audio(np.zeros(16000, np.float32))
        await wait_for(lambda: out.written >= 1.5 * 24000)
        out.limit_ms = 1.0  # the peer has played (almost) nothing when it starts speaking again
        h.push_input_audio(x)
        await wait_for(lambda: any(e["type"] == "vita.metrics" for e in sent))
        st = h.session._state
        deadline = time.monotonic() + 5
        while not st.stats.get("truncations") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        kept = len(st.records[-1].answer_ids)
        # the second utterance's answer plays out whole: output_audio_buffer.stopped
        out.limit_ms = math.inf
        await h.handle({"type": "session.update", "session": {"max_output_tokens": 24}})
        h.push_input_audio(np.zeros(16000 * 2, np.float32))
        await wait_for(lambda: any(e["type"] == "output_audio_buffer.stopped" for e in sent))
        await h.close()
        return sent, out, srv, kept

    sent, out, srv, kept = run(go(), 90)
    t = [e["type"] for e in sent]
    assert "response.output_audio.delta" not in t and "output_audio_buffer.started" in t
    assert t.index("output_audio_buffer.cleared") < t.index("response.done") and out.cleared >= 1
    done = next(e for e in sent if e["type"] == "response.done")["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    met = next(e for e in sent if e["type"] == "vita.metrics")["values"]
    # the engine's barge-in kept the text of all the audio it had delivered; the handler then cut the
    # history to what the peer played: nothing
    assert met["answer_tokens"] >= 1 and kept == 0
    assert srv.active == 0
    dones = [e["response"] for e in sent if e["type"] == "response.done"]
    assert len(dones) == 2 and dones[1]["status"] in ("completed", "incomplete")
    stopped = next(e for e in sent if e["type"] == "output_audio_buffer.stopped")
    assert stopped["response_id"] == dones[1]["id"] and t.count("output_audio_buffer.started") == 1 + (
        [e["type"] for e in sent].count("output_audio_buffer.started") - 1)

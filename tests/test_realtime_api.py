"""`/v1/realtime` (docs/realtime-api.md) driven by the official `openai` SDK against the tiny model on
127.0.0.1: server-VAD turns from the bundled speech, barge-in + truncate (and the trimmed history),
manual commit, text, image + audio, text-only output, the beta client, bad events, bad tokens."""
from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
openai = pytest.importorskip("openai")

from _server_helpers import load_engine, png_bytes, run, running_server, speech_sample, speechlike  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def engine():
    eng, real = load_engine()
    if not real:
        pytest.skip("needs the real runtime (Session.configure / respond)")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def srv(engine):
    # the tiny engine makes audio several times faster than real time and these clients read it on a
    # shared 2-core machine: a generous send queue keeps slow-client closes out of these tests
    with running_server(engine, token=TOKEN, send_queue_s=120.0) as s:
        yield s


def _speech24() -> np.ndarray:
    """The bundled question (or a speech-like signal), int16 at 24 kHz."""
    from vita_engine.client import _resample_int16

    x = speech_sample("question")
    if x is None:
        x = speechlike(2.5)
    return _resample_int16(x, 16000, 24000)


def _b64(pcm: np.ndarray) -> str:
    return base64.b64encode(np.asarray(pcm, dtype="<i2").tobytes()).decode()


async def _append(conn, pcm: np.ndarray, chunk: int = 4800) -> None:
    for i in range(0, len(pcm), chunk):
        await conn.input_audio_buffer.append(audio=_b64(pcm[i:i + chunk]))


async def _until(conn, stop: str, timeout: float = 30.0, out=None) -> list:
    """Events up to and including the first of type `stop`. A client reads all the time (as real
    clients do: the server closes one that lets more than send_queue_s of audio pile up), so the
    events are read by a background task into a queue, and this takes them from there."""
    evs = [] if out is None else out
    q = getattr(conn, "_test_q", None)
    if q is None:
        q = conn._test_q = asyncio.Queue()

        async def reader():
            try:
                while True:
                    q.put_nowait(await conn.recv())
            except Exception as e:  # noqa: BLE001  (closed: the waiting _until sees it)
                q.put_nowait(e)

        conn._test_reader = asyncio.get_running_loop().create_task(reader())

    async def go():
        while True:
            ev = await q.get()
            if isinstance(ev, Exception):
                raise ev
            evs.append(ev)
            if ev.type == stop:
                return

    await asyncio.wait_for(go(), timeout)
    return evs


def _client(srv, key=TOKEN):
    # websocket_base_url: the beta interface builds wss:// from base_url otherwise (the GA one follows
    # the scheme of base_url)
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0,
                              websocket_base_url=srv.url.replace("http://", "ws://") + "/v1")


def _types(evs) -> list:
    return [e.type for e in evs]


def _session_state(srv):
    """The engine session of the connection just opened (the newest: an earlier test's may still be
    closing)."""
    s = max(srv.vita.engine._sessions.values(), key=lambda x: x.id)
    return s, s._state


def test_spoken_turn_server_vad(srv):
    """speech_started -> speech_stopped -> committed -> response.created ... audio deltas interleaved
    with transcript deltas ... response.done (usage) -> vita.metrics; the audio is PCM16 24 kHz."""
    x = _speech24()

    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            created = (await _until(conn, "session.created"))[-1]
            await _append(conn, x)
            await _append(conn, np.zeros(24000 * 2, np.int16))
            evs = await _until(conn, "response.done")
            evs = await _until(conn, "vita.metrics", out=evs)
            return created, evs

    created, evs = run(go(), 60)
    assert created.type == "session.created"
    s = created.session
    assert s.audio.input.format.type == "audio/pcm" and s.audio.input.format.rate == 24000
    assert s.audio.output.format.rate == 24000 and s.output_modalities == ["audio"]
    td = s.audio.input.turn_detection
    assert td.type == "server_vad" and td.silence_duration_ms == 500 and td.create_response is True
    t = _types(evs)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "response.created", "response.output_item.added", "response.content_part.added",
             "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done",
             "response.content_part.done", "response.output_item.done", "response.done", "vita.metrics"]
    idx = [t.index(n) for n in order]
    assert idx == sorted(idx), t
    started, stopped, committed = (evs[t.index(n)] for n in order[:3])
    assert started.item_id == stopped.item_id == committed.item_id
    assert 0 <= started.audio_start_ms < stopped.audio_end_ms <= len(x) / 24 + 100
    done = evs[t.index("response.done")].response
    assert done.status == "completed" and done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    deltas = [e for e in evs if e.type == "response.output_audio.delta"]
    pcm = np.concatenate([np.frombuffer(base64.b64decode(e.delta), "<i2") for e in deltas])
    met = evs[-1].values
    assert abs(pcm.size / 24000 - met["audio_out_s"]) < 1e-3 and np.abs(pcm).max() > 0
    assert done.usage.output_token_details.text_tokens == int(met["answer_tokens"])
    transcript = "".join(e.delta for e in evs if e.type == "response.output_audio_transcript.delta")
    assert evs[t.index("response.output_audio_transcript.done")].transcript == transcript
    item = done.output[0]
    assert item.role == "assistant" and item.id == deltas[0].item_id and item.content[0].transcript == transcript
    assert all(e.response_id == done.id for e in deltas)


def test_barge_in_then_truncate_trims_the_history(srv):
    """New speech during an answer cancels it (turn_detected); the client truncates the item to what
    it played; the engine's history (KV + record) then keeps only the text spoken by then, and the
    next turn's prompt starts from that shorter history."""
    x = _speech24()

    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 1000})
            await _until(conn, "session.updated")
            await _append(conn, x)
            await _append(conn, np.zeros(24000, np.int16))
            evs = []
            while sum(len(e.delta) * 3 // 8 for e in evs if e.type == "response.output_audio.delta") < 1.5 * 24000:
                evs = await _until(conn, "response.output_audio.delta", out=evs)  # 1.5 s of answer audio
            await _append(conn, x)  # the user speaks again: barge-in
            evs = await _until(conn, "response.done", out=evs)
            done = evs[-1].response
            s, st = _session_state(srv)
            kv_full, tokens_full = s.kv_length, list(st.records[-1].answer_ids)
            audio_ms = sum(len(base64.b64decode(e.delta)) // 2 for e in evs
                           if e.type == "response.output_audio.delta" and e.item_id == done.output[0].id) / 24
            cut = int(min(40, audio_ms))  # the client played 40 ms before the user spoke
            await conn.conversation.item.truncate(item_id=done.output[0].id, content_index=0, audio_end_ms=cut)
            ev = await _until(conn, "conversation.item.truncated")
            deadline = time.monotonic() + 5
            while s.kv_length >= kv_full and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            kv_cut, tokens_cut = s.kv_length, list(st.records[-1].answer_ids)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 24})
            await _append(conn, np.zeros(24000 * 2, np.int16))  # ends the second utterance: its answer
            evs2 = await _until(conn, "response.done")
            return done, ev, kv_full, tokens_full, kv_cut, tokens_cut, evs2

    done, ev, kv_full, tokens_full, kv_cut, tokens_cut, evs2 = run(go(), 90)
    assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
    assert ev[-1].item_id == done.output[0].id and ev[-1].audio_end_ms >= 0
    assert kv_cut < kv_full and len(tokens_cut) < len(tokens_full) and tokens_cut == tokens_full[:len(tokens_cut)]
    nxt = evs2[-1].response
    assert nxt.status in ("completed", "incomplete")
    # the next turn's prompt = the trimmed history (cached in the KV) + its own block, which carries
    # the trimmed answer's kept-but-unfed tokens: nothing of the unheard part
    assert nxt.usage.input_token_details.cached_tokens == kv_cut


def test_manual_commit_and_response_create(srv):
    """turn_detection null: no VAD events; commit -> committed + item; response.create answers it;
    an empty commit is the spec's error."""
    x = _speech24()

    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            upd = (await _until(conn, "session.updated"))[-1]
            await conn.input_audio_buffer.commit()
            err = (await _until(conn, "error"))[-1]
            await _append(conn, x)
            await _append(conn, np.zeros(24000 * 2, np.int16))
            await conn.input_audio_buffer.commit()
            evs = await _until(conn, "conversation.item.done")
            await asyncio.sleep(0.5)  # no answer without response.create
            await conn.response.create()
            evs = await _until(conn, "response.done", out=evs)
            return upd, err, evs

    upd, err, evs = run(go(), 60)
    assert upd.session.audio.input.turn_detection is None
    assert err.error.code == "input_audio_buffer_commit_empty" and err.error.type == "invalid_request_error"
    t = _types(evs)
    assert "input_audio_buffer.speech_started" not in t and t[0] == "input_audio_buffer.committed"
    assert t.index("conversation.item.done") < t.index("response.created")
    assert evs[-1].response.status == "completed" and "response.output_audio.delta" in t


def test_text_turn_and_image_plus_audio_turn(srv):
    """conversation.item.create input_text -> response.create -> audio + transcript; then an item with
    an input_image (data URL PNG) and input_audio answered in one turn (the image reaches the vision
    tower)."""
    x = _speech24()
    url = "data:image/png;base64," + base64.b64encode(png_bytes(64, 48)).decode()

    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello there"}]})
            a = await _until(conn, "conversation.item.done")
            await conn.response.create()
            a = await _until(conn, "vita.metrics", out=a)
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": url}, {"type": "input_audio", "audio": _b64(x)}]})
            await conn.response.create()
            b = await _until(conn, "vita.metrics")
            return a, b

    a, b = run(go(), 60)
    ta = _types(a)
    assert a[0].type == "conversation.item.added" and a[0].item.content[0].text == "Hello there"
    assert "response.output_audio.delta" in ta and "response.output_audio_transcript.delta" in ta
    assert a[ta.index("response.done")].response.status == "completed"
    tb = _types(b)
    assert b[tb.index("response.done")].response.status == "completed"
    # every work stage is reported, 0 ms where there was none (the image of b is in its prompt)
    assert a[-1].values["vision_ms"] == 0.0 and b[-1].values["vision_ms"] >= 0.0
    assert all(k in a[-1].values and k in b[-1].values for k in ("fbank_ms", "audio_encoder_ms", "tts_nar_ms"))
    assert b[-1].values.get("audio_encoder_ms", 0) > 0


def test_text_only_output(srv):
    """output_modalities ["text"]: output_text deltas, no audio at all (no TTS work)."""
    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "instructions": "Answer briefly."})
            upd = (await _until(conn, "session.updated"))[-1]
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hi"}]})
            await conn.response.create(response={"max_output_tokens": 5})
            return upd, await _until(conn, "vita.metrics")

    upd, evs = run(go(), 60)
    assert upd.session.output_modalities == ["text"] and upd.session.instructions == "Answer briefly."
    t = _types(evs)
    assert "response.output_text.delta" in t and "response.output_text.done" in t
    assert not any("audio" in x for x in t), t
    done = evs[t.index("response.done")].response
    assert done.usage.output_token_details.audio_tokens == 0 and done.usage.output_token_details.text_tokens <= 5
    assert done.output[0].content[0].type == "output_text"
    assert done.status in ("completed", "incomplete")
    if done.usage.output_token_details.text_tokens == 5:
        assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"
    assert evs[-1].values["codec_tokens"] == 0 and evs[-1].values["audio_out_s"] == 0


def test_beta_client(srv):
    """client.beta.realtime (OpenAI-Beta: realtime=v1): the beta session shape and event names; an
    unsupported voice is reported with its param and the session goes on; mu-law input decodes."""
    async def go():
        async with _client(srv).beta.realtime.connect(model="vita-1.5") as conn:
            created = (await _until(conn, "session.created"))[-1]
            await conn.session.update(session={"modalities": ["text", "audio"], "voice": "alloy",
                                               "input_audio_format": "g711_ulaw",
                                               "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}})
            evs = await _until(conn, "error")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await conn.response.create()
            evs = await _until(conn, "response.done", out=evs)
            return created, evs

    created, evs = run(go(), 60)
    s = created.session
    assert s.input_audio_format == "pcm16" and s.turn_detection.type == "server_vad" and s.modalities == ["text", "audio"]
    t = _types(evs)
    upd = evs[t.index("session.updated")].session
    assert upd.input_audio_format == "g711_ulaw" and upd.turn_detection.silence_duration_ms == 400
    err = evs[t.index("error")].error
    assert err.type == "invalid_request_error" and err.param == "session.voice"
    assert "response.audio.delta" in t and "response.audio_transcript.delta" in t and "conversation.item.created" in t
    assert not any(x.startswith(("response.output_audio", "response.output_text")) for x in t), t
    assert evs[-1].response.status == "completed"


def test_bad_events_get_errors_and_the_session_lives_on(srv):
    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            raw = conn._connection
            errs = []
            for msg in ("not json", '{"no": "type"}', '{"type": "response.frobnicate", "event_id": "e1"}',
                        '{"type": "input_audio_buffer.append"}', '{"type": "input_audio_buffer.append", "audio": "@@@"}',
                        '{"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 0}',
                        '{"type": "response.cancel"}', '{"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}}',
                        '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "http://example.com/x.png"}]}}'):
                await raw.send(msg)
                errs += [e for e in await _until(conn, "error")]
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Still there?"}]})
            user = (await _until(conn, "conversation.item.done"))[-1].item
            await conn.response.create()
            await conn.response.create()  # a second one while the first is active
            evs = await _until(conn, "response.done")
            assistant = evs[-1].response.output[0]
            for ev in ({"type": "conversation.item.truncate", "item_id": user.id, "content_index": 0, "audio_end_ms": 0},
                       {"type": "conversation.item.truncate", "item_id": assistant.id, "content_index": 0,
                        "audio_end_ms": 10 ** 7}):
                await raw.send(__import__("json").dumps(ev))
                evs += await _until(conn, "error")
            return errs, evs

    errs, evs = run(go(), 60)
    got = [(e.error.code, e.error.param) for e in errs if e.type == "error"]
    assert got[0][0] == "invalid_json" and got[1][1] == "type"
    assert got[2] == ("invalid_value", "type") and [e for e in errs if e.type == "error"][2].error.event_id == "e1"
    assert got[3] == ("missing_required_parameter", "audio") and got[4] == ("invalid_value", "audio")
    assert got[5][0] == "item_not_found" and got[6][0] == "response_cancel_not_active"
    assert got[7] == ("unsupported_parameter", "session.tools")
    assert got[8][1] == "item.content[0].image_url"
    later = [(e.error.code, e.error.message) for e in evs if e.type == "error"]
    assert later[0][0] == "conversation_already_has_active_response"
    assert "assistant" in later[1][1] and "shorter than" in later[2][1]
    assert any(e.type == "response.done" and e.response.status == "completed" for e in evs)


def test_bad_token_and_browser_subprotocols(srv):
    """A wrong key is refused at the handshake (HTTP 401); the browser form (key as a subprotocol)
    works and gets `realtime` selected."""
    async def bad():
        async with _client(srv, key="wrong").realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")

    with pytest.raises(Exception) as ei:
        run(bad(), 20)
    assert "401" in str(ei.value) or "401" in repr(ei.value.__dict__)

    async def browser():
        from websockets.asyncio.client import connect

        url = srv.url.replace("http", "ws") + "/v1/realtime?model=vita-1.5"
        async with connect(url, subprotocols=["realtime", "openai-insecure-api-key." + TOKEN,
                                              "openai-beta.realtime-v1"]) as ws:
            first = __import__("json").loads(await ws.recv())
            return ws.subprotocol, first

    sub, first = run(browser(), 20)
    assert sub == "realtime" and first["type"] == "session.created"
    assert "input_audio_format" in first["session"]  # the beta subprotocol: beta shape


def test_capacity_closes_with_1013(engine):
    async def go(url):
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        async with connect(url) as a:
            assert __import__("json").loads(await a.recv())["type"] == "session.created"
            async with connect(url) as b:
                msg = __import__("json").loads(await b.recv())
                try:
                    await b.recv()
                except ConnectionClosed as e:
                    return msg, e.rcvd.code

    with running_server(engine, max_sessions=1, replica="replica-7") as s:
        msg, code = run(go(s.url.replace("http", "ws") + "/v1/realtime"), 20)
        deadline = time.monotonic() + 10
        while s.vita.active and time.monotonic() < deadline:  # the closed sessions free their slot
            time.sleep(0.02)
        first = run(_first_event(s.url.replace("http", "ws") + "/v1/realtime"), 20)
    assert msg["type"] == "error" and msg["error"]["code"] == "capacity" and code == 1013
    assert first["session"]["replica"] == "replica-7"  # where the session lives (serve --ray)


async def _first_event(url):
    from websockets.asyncio.client import connect

    async with connect(url) as ws:
        return __import__("json").loads(await ws.recv())


def test_camera_frames_extension_and_frame_limit(srv):
    """input_image_buffer.append {image: base64 JPEG} (extension) -> the next turn sees the frame; a
    bad image and an event over the size limit are errors, the session goes on."""
    from _server_helpers import jpeg_bytes

    big = "x" * (srv.vita.config.max_frame_bytes * 2)

    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            raw = conn._connection
            await raw.send(__import__("json").dumps({"type": "input_image_buffer.append",
                                                     "image": base64.b64encode(b"not an image").decode()}))
            errs = await _until(conn, "error")
            await raw.send(__import__("json").dumps({"type": "input_audio_buffer.append", "audio": big}))
            errs = await _until(conn, "error", out=errs)
            for _ in range(2):
                await raw.send(__import__("json").dumps({"type": "input_image_buffer.append",
                                                         "image": base64.b64encode(jpeg_bytes()).decode()}))
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "What do you see?"}]})
            await conn.response.create(response={"output_modalities": ["text"]})
            return errs, await _until(conn, "vita.metrics")

    errs, evs = run(go(), 60)
    assert errs[0].error.param == "image" and errs[1].error.code == "too_big"
    assert "vision_ms" in evs[-1].values  # the turn had visuals (the frames)


def test_shutdown_closes_sessions_with_1012(engine):
    from vita_engine.server import BackgroundServer, ServerConfig, create_app

    srv = BackgroundServer(create_app(engine, ServerConfig())).start()

    async def go():
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        async with connect(srv.url.replace("http", "ws") + "/v1/realtime") as ws:
            assert __import__("json").loads(await ws.recv())["type"] == "session.created"
            stop = asyncio.get_running_loop().run_in_executor(None, srv.stop)
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else None
            await stop
            return code

    try:
        assert run(go(), 30) == 1012
    finally:
        srv.stop()
    deadline = time.monotonic() + 5
    while engine.num_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_sessions == 0  # the session was closed with the connection


def test_response_cancel_mid_answer(srv):
    """response.cancel during an answer: response.done cancelled / client_cancelled, and a cancel of a
    response.create whose turn has not started yet cancels it as it starts."""
    async def go():
        async with _client(srv).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 1000})
            await _until(conn, "session.updated")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Talk a lot."}]})
            await conn.response.create()
            evs = await _until(conn, "response.output_audio.delta")
            await conn.response.cancel(response_id=evs[-1].response_id)
            a = (await _until(conn, "response.done"))[-1].response
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Again."}]})
            await conn.response.create()
            await conn.response.cancel()  # before the engine started it
            b = (await _until(conn, "response.done"))[-1].response
            return a, b

    a, b = run(go(), 60)
    for r in (a, b):
        assert r.status == "cancelled" and r.status_details.reason == "client_cancelled", r
    assert a.usage.output_token_details.text_tokens < 1000


def test_drain_closes_realtime_sessions_between_turns(engine):
    """VitaServer.drain() (a replica being stopped): an answer in progress finishes, then 1012; new
    sessions are refused with 1012."""
    async def go(s):
        from websockets.exceptions import ConnectionClosed

        async with _client(s).realtime.connect(model="vita-1.5") as conn:
            await _until(conn, "session.created")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await conn.response.create()
            evs = await _until(conn, "response.created")
            conn_obj = next(iter(s.vita.conns))
            drain = asyncio.run_coroutine_threadsafe(s.vita.drain(grace_s=20.0), conn_obj._recv.get_loop())
            code = None
            try:
                await _until(conn, "never", timeout=30, out=evs)
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else None
            await asyncio.wrap_future(drain)
        from websockets.asyncio.client import connect

        async with connect(s.url.replace("http", "ws") + "/v1/realtime") as ws:
            first = __import__("json").loads(await ws.recv())
            try:
                await ws.recv()
            except ConnectionClosed as e:
                late = e.rcvd.code if e.rcvd is not None else None
        return evs, code, first, late

    with running_server(engine) as s:
        evs, code, first, late = run(go(s), 60)
    t = _types(evs)
    assert "response.done" in t and t[-1] == "error" and evs[-1].error.code == "draining", t
    assert code == 1012 and first["error"]["code"] == "draining" and late == 1012

"""Real-browser test of the page over WebRTC (its default transport): Debian's headless Chromium
with a WAV as its fake microphone, loopback ICE (`--allow-loopback-in-peer-connection`, no mDNS
host names, the server's ICE host 127.0.0.1). A turn must complete (transcript + latency row from
the oai-events data channel) and the answer must play through the <audio> element (energy in the
received Opus stream, the element's clock running). Screenshot: the test's tmp dir."""
from __future__ import annotations

import warnings

import pytest

pytest.importorskip("starlette")
pytest.importorskip("aiortc")

from test_server_browser import run_browser_turn  # noqa: E402

CHROMIUM_WEBRTC = ["--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"]
DONE = ("window.vitaStats.transport === 'webrtc' && window.vitaStats.turns >= 1 && window.vitaStats.metrics.length >= 1 "
        "&& (window.vitaStats.events['output_audio_buffer.stopped'] || 0) >= 1 && window.vitaStats.audioEnergy > 0 "
        "&& window.vitaStats.audioPlayedS > 0.5 && window.vitaStats.samplesPlayed > 0")


def test_browser_turn_over_webrtc(tmp_path):
    from _server_helpers import load_engine

    eng, real = load_engine()
    if not real:
        pytest.skip("vita_engine.runtime is not available (the realtime handler needs the engine)")
    try:
        r = run_browser_turn(eng, tmp_path, timeout_s=40, query="bargein=0", done_js=DONE, extra_args=CHROMIUM_WEBRTC,
                             shot="browser_webrtc_turn.png", shot_dir=tmp_path, ice_hosts=("127.0.0.1",))
    finally:
        eng.close()
    st, ui = r["stats"], r["ui"]
    print("\nbrowser over WebRTC:", {k: st[k] for k in ("framesSent", "bytesSent", "framesReceived", "lost", "turns",
                                                      "textEvents", "audioEnergy", "audioPlayedS")},
          "events:", st["events"], "took %.1f s" % r["took_s"])
    ev = st["events"]
    for name in ("session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "response.created", "output_audio_buffer.started", "response.done", "vita.metrics"):
        assert ev.get(name, 0) >= 1, (name, ev)
    assert not ev.get("response.output_audio.delta")  # the audio rides on the track
    assert st["framesSent"] > 50 and st["lost"] == 0, st
    assert st["samplesPlayed"] >= 0.2 * 24000, st["samplesPlayed"]  # answer audio heard through the analyser
    assert st["textEvents"] >= 1 and ui["transcript"].strip() and ui["latency_rows"] >= 1
    assert "ttfa_ms" in st["metrics"][0]["values"]
    assert not st["errors"], st["errors"]
    assert r["shot"].stat().st_size > 1000
    if ev.get("error"):
        warnings.warn(f"error events: {st['errors']}")

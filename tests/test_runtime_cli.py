"""`vita-engine demo --json` runs end to end on the tiny model and prints the latency report."""
import json
import wave

from vita_engine import cli


def test_demo_json(tiny_ckpt, capsys, tmp_path):
    out = tmp_path / "reply.wav"
    rc = cli.main(["demo", "--model", str(tiny_ckpt), "--json", "--fast", "--max-new-tokens", "12", "--out", str(out)])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    for k in ("ttfa_ms", "response_ms", "stages", "audio_out_seconds", "text"):
        assert k in rep
    assert rep["ttfa_ms"] >= 0 and "prefill_ms" in rep["stages"] and "audio_encoder_ms" in rep["stages"]
    assert out.is_file()
    # seconds of speech from 12 text tokens (the tiny TTS speaks ~12 codec tokens of 25 ms per text
    # token), not a click
    assert rep["audio_out_seconds"] >= 1.0, rep
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and abs(w.getnframes() / 24000 - rep["audio_out_seconds"]) < 1e-3

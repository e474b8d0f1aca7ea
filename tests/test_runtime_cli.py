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


def test_bench_sweep_json(tiny_ckpt, capsys):
    """`bench --sessions 1,2` runs both counts in one process: one result each, every turn completed,
    ttfa percentiles and the scheduler's tick/host figures."""
    rc = cli.main(["bench", "--model", str(tiny_ckpt), "--sessions", "1,2", "--turns", "1", "--fast", "--json",
                   "--max-new-tokens", "8", "--tts-max-tokens", "16"])
    assert rc == 0
    runs = json.loads(capsys.readouterr().out)["sweep"]
    assert [r["sessions"] for r in runs] == [1, 2]
    for r in runs:
        assert r["turns_done"] == r["sessions"]
        assert r["metrics"]["ttfa_ms"]["n"] == r["sessions"]
        m = r["metrics"]["ttfa_ms"]
        assert 0 <= m["p50"] <= m["p90"] <= m["p99"]
        s = r["scheduler"]
        assert s["ticks"] > 0 and s["policy"]["scheduling"] == "critical_path"
        for k in ("tick_ms", "host_ms", "llm_ms", "tts_ms", "codec_ms", "turns_ms"):
            assert s[k]["n"] == s["ticks"] and 0 <= s[k]["p50"] <= s[k]["p99"], k


def test_bench_bad_sessions(capsys):
    # One line naming the option, exit 2, before any model is loaded.
    import pytest

    for bad in ("0", "1,x", "", "1,,4"):
        with pytest.raises(SystemExit) as ei:
            cli.main(["bench", "--sessions", bad])
        assert ei.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--sessions" in err[0], err


def test_bench_image_prefix(tiny_ckpt, capsys, tmp_path):
    """`bench --image` pushes the image before every spoken turn; with prefix prefill (the default) the
    image tokens are in the KV before the turn starts (cached), with --no-prefix-prefill the turn
    prefills them itself: the same prompt either way."""
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(img)
    got = {}
    for flag in ([], ["--no-prefix-prefill"]):
        rc = cli.main(["bench", "--model", str(tiny_ckpt), "--sessions", "1", "--turns", "1", "--fast", "--json",
                       "--max-new-tokens", "8", "--tts-max-tokens", "16", "--image", str(img)] + flag)
        assert rc == 0
        r = json.loads(capsys.readouterr().out)
        assert r["image"] and r["turns_done"] == 1
        m = r["metrics"]
        got[r["prefix_prefill"]] = (m["cached_tokens"]["p50"], m["prompt_tokens"]["p50"])
    (c_on, p_on), (c_off, p_off) = got[True], got[False]
    assert c_on + p_on == c_off + p_off and p_on < p_off, got


def test_bench_bad_image(capsys, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    assert cli.main(["bench", "--image", str(bad)]) == 2  # before any model is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image" in err[0], err

"""Real-browser test: Debian's headless Chromium (driven through Playwright's Python package, no
downloaded browser) opens the page with a fake microphone fed from a WAV file, and a turn must
complete end to end: transcript + latency figures on the page, answer audio played.
Screenshot: artifacts/browser_turn.png."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from _server_helpers import running_server, speechlike, write_wav  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("VITA_ARTIFACTS", ROOT / "artifacts"))
CHROMIUM = os.environ.get("VITA_CHROMIUM", "/usr/bin/chromium")


def _skip_loudly(why: str):
    msg = f"BROWSER TEST SKIPPED: {why}"
    warnings.warn(msg, pytest.PytestWarning)
    print("\n" + "!" * 100 + f"\n{msg}\n" + "!" * 100)
    pytest.skip(msg)


def tone_wav(path: Path, freq: float = 1000.0, sr: int = 48000) -> Path:
    t = np.arange(int(1.2 * sr)) / sr
    x = np.round(0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return write_wav(path, np.concatenate([np.zeros(sr // 5, np.int16), x, np.zeros(3 * sr, np.int16)]), sr)


def speech_wav(path: Path) -> Path:
    """The fake microphone's input (Chromium loops it): a speech sample from vita_engine.data when
    the package ships one, else a synthetic voiced signal; followed by silence so the endpointer
    fires once per loop."""
    sr, x = 16000, None
    try:
        from importlib import resources

        from vita_engine.client import read_wav

        f = resources.files("vita_engine") / "data" / "hello.wav"
        if f.is_file():
            with resources.as_file(f) as p:
                x, sr = read_wav(p)
    except Exception:  # noqa: BLE001
        x = None
    if x is None:
        x = speechlike(1.2, sr)
    x = np.concatenate([np.zeros(sr // 5, np.int16), x, np.zeros(int(3.0 * sr), np.int16)])
    return write_wav(path, x, sr)


def _launch(pw, wav: Path, profile: str):
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
]
    # a fresh --user-data-dir: Playwright passes `profile` as that flag (it refuses it in args)
    return pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args,
                                                 ignore_default_args=["--mute-audio"], timeout=30000)


def run_browser_turn(engine, tmp_path: Path, timeout_s: float = 40.0, wav: Path = None, **server_cfg) -> dict:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_loudly("the playwright Python package is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        _skip_loudly(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    wav = wav or speech_wav(tmp_path / "mic.wav")
    profile = tempfile.mkdtemp(prefix="vita-chromium-", dir=tmp_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console = []
    with running_server(engine, **server_cfg) as srv:
        with sync_playwright() as pw:
            try:
                ctx = _launch(pw, wav, profile)
            except Exception as e:  # noqa: BLE001
                _skip_loudly(f"Chromium could not start: {type(e).__name__}: {str(e)[:500]}")
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.goto(srv.url + "/?bargein=0", timeout=15000)
                page.click("#start")
                page.wait_for_function("window.vitaStats.ready === true", timeout=15000)
                t0 = time.monotonic()
                page.wait_for_function(
                    "window.vitaStats.turns >= 1 && window.vitaStats.metrics.length >= 1 "
                    "&& window.vitaStats.samplesPlayed > 0", timeout=timeout_s * 1000)
                took = time.monotonic() - t0
                stats = page.evaluate("JSON.parse(JSON.stringify(window.vitaStats))")
                ui = {"transcript": page.inner_text("#transcript"), "latency_rows": page.locator("#lat tbody tr").count(),
                      "status": page.inner_text("#status")}
                page.screenshot(path=str(ARTIFACTS / "browser_turn.png"), full_page=True)
            except Exception:
                try:
                    page.screenshot(path=str(ARTIFACTS / "browser_turn_failed.png"), full_page=True)
                except Exception:  # noqa: BLE001
                    pass
                print("\n".join(console[-40:]))
                raise
            finally:
                ctx.close()
    shutil.rmtree(profile, ignore_errors=True)
    return {"stats": stats, "ui": ui, "took_s": took, "console": console}


def test_browser_turn_fake_engine(tmp_path):
    from _fake_engine import FakeEngine

    eng = FakeEngine(n_text=4, n_chunks=8)
    # a 1 kHz tone recorded at 48 kHz: checks the worklet's resampling to 16 kHz
    r = run_browser_turn(eng, tmp_path, timeout_s=30, wav=tone_wav(tmp_path / "tone.wav"))
    st, ui = r["stats"], r["ui"]
    assert st["framesSent"] > 10 and st["lost"] == 0 and st["duplicates"] == 0, st
    assert st["samplesPlayed"] > 0 and st["turns"] >= 1
    assert "hello from the fake" in ui["transcript"] and ui["latency_rows"] >= 1
    s = eng.sessions[0]
    assert set(s.sample_rates) == {16000} and s.audio_samples > 16000 * 0.5
    x = np.concatenate(s.audio).astype(np.float32)
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    peak_hz = np.argmax(spec) * 16000 / x.size
    assert abs(peak_hz - 1000) < 15, peak_hz  # right pitch = right output rate
    assert (ARTIFACTS / "browser_turn.png").stat().st_size > 1000

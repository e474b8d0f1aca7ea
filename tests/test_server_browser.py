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


def mic_wav(path: Path, tone_hz: float = 1000.0, sr: int = 48000) -> Path:
    """The fake microphone's input (Chromium loops it), recorded at 48 kHz: a speech sample from
    vita_engine.data when the package ships one (else a synthetic voiced signal) with a steady
    1 kHz tone mixed in (to check the page's resampling to 16 kHz), then 3 s of silence so the
    endpointer fires once per loop."""
    x = None
    try:
        from importlib import resources

        from vita_engine.client import _resample_int16, read_wav

        f = resources.files("vita_engine") / "data" / "hello.wav"
        if f.is_file():
            with resources.as_file(f) as p:
                x, r = read_wav(p)
            x = _resample_int16(x, r, sr)
    except Exception:  # noqa: BLE001
        x = None
    if x is None:
        x = speechlike(1.2, sr)
    speech = x.astype(np.float32) / 32768 * (0.5 / max(1e-3, np.abs(x).max() / 32768))
    t = np.arange(speech.size) / sr
    y = np.clip(0.6 * speech + 0.25 * np.sin(2 * np.pi * tone_hz * t), -1, 1)
    y = np.round(y * 32767).astype(np.int16)
    return write_wav(path, np.concatenate([np.zeros(sr // 5, np.int16), y, np.zeros(3 * sr, np.int16)]), sr)


def _launch(pw, wav: Path, profile: str, extra_args=()):
    args = [*extra_args, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
]
    # a fresh --user-data-dir: Playwright passes `profile` as that flag (it refuses it in args)
    return pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args,
                                                 ignore_default_args=["--mute-audio"], timeout=30000)


WS_DONE = "window.vitaStats.turns >= 1 && window.vitaStats.metrics.length >= 1 && window.vitaStats.samplesPlayed > 0"


def run_browser_turn(engine, tmp_path: Path, timeout_s: float = 40.0, wav: Path = None, query: str = "bargein=0&transport=ws",
                     done_js: str = WS_DONE, extra_args=(), shot: str = "browser_turn.png", shot_dir: Path = None,
                     **server_cfg) -> dict:
    """Open the page (?query) with `wav` as the microphone, press Start, wait until `done_js` holds;
    screenshot to shot_dir/shot (default ARTIFACTS) -> {"stats": window.vitaStats, "ui", "took_s", "console", "shot"}."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_loudly("the playwright Python package is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        _skip_loudly(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    wav = wav or mic_wav(tmp_path / "mic.wav")
    profile = tempfile.mkdtemp(prefix="vita-chromium-", dir=tmp_path)
    shots = Path(shot_dir or ARTIFACTS)
    shots.mkdir(parents=True, exist_ok=True)
    console = []
    with running_server(engine, **server_cfg) as srv:
        with sync_playwright() as pw:
            try:
                ctx = _launch(pw, wav, profile, extra_args)
            except Exception as e:  # noqa: BLE001
                _skip_loudly(f"Chromium could not start: {type(e).__name__}: {str(e)[:500]}")
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.goto(srv.url + "/?" + query, timeout=15000)
                page.click("#start")
                page.wait_for_function("window.vitaStats.ready === true", timeout=15000)
                t0 = time.monotonic()
                page.wait_for_function(done_js, timeout=timeout_s * 1000)
                took = time.monotonic() - t0
                stats = page.evaluate("JSON.parse(JSON.stringify(window.vitaStats))")
                ui = {"transcript": page.inner_text("#transcript"), "latency_rows": page.locator("#lat tbody tr").count(),
                      "status": page.inner_text("#status")}
                page.screenshot(path=str(shots / shot), full_page=True)
            except Exception:
                try:
                    page.screenshot(path=str(shots / shot.replace(".png", "_failed.png")), full_page=True)
                except Exception:  # noqa: BLE001
                    pass
                print("\n".join(console[-40:]))
                raise
            finally:
                ctx.close()
        t_end = time.monotonic() + 10  # WebRTC calls end with the browser: let them close first
        while getattr(srv.vita, "webrtc_calls", None) and time.monotonic() < t_end:
            time.sleep(0.05)
    shutil.rmtree(profile, ignore_errors=True)
    return {"stats": stats, "ui": ui, "took_s": took, "console": console, "shot": shots / shot}


class _Recording:
    """Engine proxy whose sessions record every push_audio (to check the page's 16 kHz stream)."""

    def __init__(self, engine):
        self.engine, self.audio, self.rates = engine, [], set()

    def session(self, *a, **k):
        s, rec = self.engine.session(*a, **k), self

        class S:
            def __getattr__(self, name):
                return getattr(s, name)

            def push_audio(self, pcm, sample_rate):
                rec.audio.append(np.array(pcm, copy=True))
                rec.rates.add(int(sample_rate))
                return s.push_audio(pcm, sample_rate)

        return S()


def test_browser_turn(tmp_path):
    """The page, the tiny engine (fake if the runtime is unavailable), a looping speech sample
    (+ a 1 kHz tone) and silence as the microphone: a turn completes (transcript + latency row),
    the answer audio plays, and the audio that reached the engine is 16 kHz with the tone at
    1 kHz (the worklet's resampling is right)."""
    from _server_helpers import load_engine

    eng, real = load_engine()
    if not real:
        warnings.warn("vita_engine.runtime is not available: the browser test runs on the FAKE engine",
                      pytest.PytestWarning)
    rec = _Recording(eng)
    try:
        r = run_browser_turn(rec, tmp_path, timeout_s=40)
    finally:
        getattr(eng, "close", lambda: None)()
    st, ui = r["stats"], r["ui"]
    print("\nbrowser:", {k: st[k] for k in ("framesSent", "framesReceived", "samplesReceived", "samplesPlayed",
                                             "lost", "turns", "textEvents")}, "metrics:", st["metrics"][:1])
    assert st["framesSent"] > 10 and st["lost"] == 0 and st["duplicates"] == 0, st
    assert st["samplesPlayed"] > 0 and st["turns"] >= 1 and st["textEvents"] >= 1
    assert ui["transcript"].strip() and ui["latency_rows"] >= 1
    assert "ttfa_ms" in st["metrics"][0]["values"]
    assert rec.rates == {16000}
    x = np.concatenate(rec.audio).astype(np.float32)
    assert x.size > 16000 * 0.5
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    hz = np.arange(spec.size) * 16000 / x.size
    band = (hz > 200) & (hz < 4000)
    peak_hz = hz[band][np.argmax(spec[band])]
    assert abs(peak_hz - 1000) < 15, peak_hz  # right pitch = right output rate
    assert (ARTIFACTS / "browser_turn.png").stat().st_size > 1000

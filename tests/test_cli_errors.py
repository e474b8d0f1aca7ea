"""`vita-engine` answers user mistakes in one line and exit status 2 (before any model is loaded),
bugs in one line and exit status 1; `--debug` / VITA_DEBUG=1 add the traceback."""
import os
import socket
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

import vita_engine
from vita_engine import _errors, cli

from _no_torch import run_without_torch  # noqa: E402


def run(capsys, *argv):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse-level errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def user_error(capsys, *argv):
    """The one stderr line of a user mistake (exit status 2, nothing on stdout)."""
    rc, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and out == "", (rc, out, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("VITA_DEBUG", raising=False)


@pytest.fixture
def real_loader():
    """Requested by a test that lets the loader run."""


@pytest.fixture(autouse=True)
def _no_model_load(request, monkeypatch):
    """Every error below is detectable before loading: a load means a check is missing."""
    from vita_engine.runtime import Engine

    if "real_loader" in request.fixturenames:
        return

    def boom(*a, **k):
        raise AssertionError("the model was loaded although the arguments are wrong")

    monkeypatch.setattr(Engine, "from_pretrained", boom)


def write_wav(path, x, sr=16000, width=2, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(x.tobytes())
    return path


@pytest.fixture
def speech_wav(tmp_path):
    t = np.arange(8000) / 16000
    return write_wav(tmp_path / "ok.wav", (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2"))


# ---- demo: files ---------------------------------------------------------------------------------
def test_demo_audio_missing(capsys):
    assert user_error(capsys, "demo", "--audio", "/nonexistent.wav") == \
        "vita-engine demo: --audio /nonexistent.wav: no such file"


@pytest.mark.parametrize("kind, needle", [
    ("folder", "is a folder, not a file"),
    ("text", "not a 16-bit PCM WAV file"),
    ("8bit", "8-bit samples; only 16-bit PCM WAV is supported"),
    ("empty", "holds no audio samples"),
    ("silent", "is silent"),
    ("truncated", "not a 16-bit PCM WAV file"),
])
def test_demo_audio_bad(capsys, tmp_path, speech_wav, kind, needle):
    p = tmp_path / "x.wav"
    if kind == "folder":
        p.mkdir()
    elif kind == "text":
        p.write_text("hello, not audio\n")
    elif kind == "8bit":
        write_wav(p, np.full(800, 200, np.uint8), width=1)
    elif kind == "empty":
        write_wav(p, np.zeros(0, "<i2"))
    elif kind == "silent":
        write_wav(p, np.zeros(1600, "<i2"))
    else:
        p.write_bytes(speech_wav.read_bytes()[:30])  # cut inside the header
    line = user_error(capsys, "demo", "--audio", p)
    assert line.startswith(f"vita-engine demo: --audio {p}: ") and needle in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_demo_audio_unreadable(capsys, speech_wav):
    speech_wav.chmod(0)
    assert "permission denied" in user_error(capsys, "demo", "--audio", speech_wav)


def test_read_wav_accepts_stereo_and_any_rate(tmp_path):
    x = (np.arange(2 * 4410) % 200 - 100).astype("<i2")
    got, sr = _errors.read_wav("--audio", write_wav(tmp_path / "s.wav", x, sr=44100, channels=2))
    assert sr == 44100 and got.shape == (4410, 2) and np.array_equal(got.reshape(-1), x)


@pytest.mark.parametrize("kind, needle", [
    ("missing", "no such file"),
    ("text", "not an image file Pillow can read"),
    ("truncated", "cannot decode the image"),
])
def test_demo_image_bad(capsys, tmp_path, kind, needle):
    from PIL import Image

    p = tmp_path / "x.png"
    if kind == "text":
        p.write_text("not an image")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        p.write_bytes(p.read_bytes()[:300])
    line = user_error(capsys, "demo", "--image", p)
    assert line.startswith(f"vita-engine demo: --image {p}: ") and needle in line, line


def test_read_image_gives_rgb(tmp_path):
    from PIL import Image

    p = tmp_path / "g.png"
    Image.new("L", (5, 3), 7).save(p)
    im = _errors.read_image("--image", p)
    assert im.mode == "RGB" and im.size == (5, 3)


@pytest.mark.parametrize("cmd", ["demo", "bench", "serve"])
@pytest.mark.parametrize("kind, needle", [
    ("missing", "no such folder"),
    ("file", "not a folder"),
    ("empty", "not a VITA-1.5 checkpoint folder (no config.json)"),
])
def test_model_not_a_checkpoint(capsys, tmp_path, cmd, kind, needle):
    p = tmp_path / "ckpt"
    if kind == "file":
        p.write_text("x")
    elif kind == "empty":
        p.mkdir()
    line = user_error(capsys, cmd, "--model", p)
    assert line.startswith(f"vita-engine {cmd}: --model {p}: ") and needle in line, line


@pytest.mark.parametrize("config, needle", [("{", "not valid JSON"), ("{}", "missing Qwen2 field(s)")])
def test_model_bad_config_found_while_loading(capsys, real_loader, tmp_path, config, needle):
    """Past the folder check, the loader's CheckpointError is still one line naming --model (the
    real loader: it fails on config.json, before any weights)."""
    (tmp_path / "config.json").write_text(config)
    line = user_error(capsys, "demo", "--model", tmp_path)
    assert line.startswith(f"vita-engine demo: --model {tmp_path}: ") and needle in line, line


def test_demo_out_not_writable(capsys, tmp_path):
    line = user_error(capsys, "demo", "--out", tmp_path / "nope" / "a.wav")
    assert line == f"vita-engine demo: --out {tmp_path / 'nope' / 'a.wav'}: folder {tmp_path / 'nope'} does not exist"
    assert "is a folder" in user_error(capsys, "demo", "--out", tmp_path)


# ---- impossible option values (argparse level) ---------------------------------------------------
@pytest.mark.parametrize("argv, line", [
    (["demo", "--threads", "0"], "vita-engine demo: --threads 0: must be at least 1"),
    (["demo", "--max-new-tokens", "-3"], "vita-engine demo: --max-new-tokens -3: must be at least 1"),
    (["demo", "--chunk-ms", "-5"], "vita-engine demo: --chunk-ms -5: must be a number greater than 0"),
    (["demo", "--timeout", "nan"], "vita-engine demo: --timeout nan: must be a number greater than 0"),
    (["demo", "--chunk-ms", "abc"], "vita-engine demo: --chunk-ms abc: not a number"),
    (["demo", "--threads", "two"], "vita-engine demo: --threads two: not an integer"),
    (["demo", "--dtype", "float8"], "vita-engine demo: --dtype float8: not one of float32, bfloat16, float16, fp32, bf16, fp16"),
    (["demo", "--device", "tpu"], "vita-engine demo: --device tpu: not a device (cpu, cuda or cuda:N)"),
    (["demo", "--audio"], "vita-engine demo: --audio: expected one argument"),
    (["demo", "--foo"], "vita-engine demo: unrecognized argument(s): --foo (see vita-engine demo --help)"),
    (["bench", "--sessions", "0"], "vita-engine bench: --sessions 0: must be at least 1"),
    (["bench", "--turns", "-1"], "vita-engine bench: --turns -1: must be at least 1"),
    (["bench", "--tts-max-tokens", "0"], "vita-engine bench: --tts-max-tokens 0: must be at least 1"),
    (["bench", "--dims", "huge"], "vita-engine bench: --dims huge: not one of tiny, mini, full"),
    (["bench", "--dtype", "int8"], "vita-engine bench: --dtype int8: not one of float32, bfloat16, float16, fp32, bf16, fp16"),
    (["serve", "--port", "70000"], "vita-engine serve: --port 70000: not a TCP port (1 to 65535)"),
    (["serve", "--port", "0"], "vita-engine serve: --port 0: must be at least 1"),
    (["serve", "--max-sessions", "0"], "vita-engine serve: --max-sessions 0: must be at least 1"),
    (["serve", "--max-session-s", "-1"], "vita-engine serve: --max-session-s -1: must be a number greater than 0"),
    (["serve", "--idle-timeout-s", "0"], "vita-engine serve: --idle-timeout-s 0: must be a number greater than 0"),
    (["serve", "--send-queue-s", "inf"], "vita-engine serve: --send-queue-s inf: must be a number greater than 0"),
    (["serve", "--audio-frame-ms", "0"], "vita-engine serve: --audio-frame-ms 0: must be a number greater than 0"),
    (["serve", "--max-frame-bytes", "10"], "vita-engine serve: --max-frame-bytes 10: must be at least 1024"),
    (["serve", "--token", ""], "vita-engine serve: --token '': must not be empty"),
    (["serve", "--log-level", "loud"], "vita-engine serve: --log-level loud: not one of critical, error, warning, info, debug, trace"),
    (["check", "--fast"], "vita-engine check: unrecognized argument(s): --fast (see vita-engine check --help)"),
])
def test_impossible_values(capsys, argv, line):
    assert user_error(capsys, *argv) == line


@pytest.mark.parametrize("argv, start", [
    ([], "vita-engine: no command given: choose one of check, serve, demo, bench"),
    (["dmeo"], "vita-engine: unknown command 'dmeo': choose one of check, serve, demo, bench"),
])
def test_no_or_unknown_command(capsys, argv, start):
    line = user_error(capsys, *argv)  # commands added later lengthen the list
    assert line.startswith(start) and line.endswith("(see vita-engine --help)"), line


@pytest.mark.skipif(vita_engine.cuda_available(), reason="a usable GPU is present")
@pytest.mark.parametrize("cmd", ["demo", "bench", "serve"])
def test_cuda_device_without_gpu(capsys, cmd):
    line = user_error(capsys, cmd, "--device", "cuda")
    assert line.startswith(f"vita-engine {cmd}: --device cuda: ")
    assert "no CUDA kernels" in line or "no such GPU" in line


def test_bench_full_dims_on_cpu(capsys):
    assert user_error(capsys, "bench", "--dims", "full") == \
        "vita-engine bench: --dims full: builds 8B random weights: run it on a GPU (--device cuda)"


def test_bench_plot(capsys, monkeypatch, tmp_path):
    import importlib.util

    assert "does not exist" in user_error(capsys, "bench", "--plot", tmp_path / "no" / "p.png")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    assert user_error(capsys, "bench", "--plot", tmp_path / "p.png") == \
        f"vita-engine bench: --plot {tmp_path / 'p.png'}: needs matplotlib, which is not installed: pip install matplotlib"


@pytest.mark.parametrize("argv, line", [
    (["--replicas", "2"], "--replicas 2: needs --ray (replicas on Ray Serve)"),
    (["--sessions-per-replica", "4"], "--sessions-per-replica 4: needs --ray (replicas on Ray Serve)"),
    (["--address", "auto"], "--address auto: needs --ray (replicas on Ray Serve)"),
    (["--ray", "--replicas", "2", "--autoscale", "1:3"],
     "--autoscale 1:3: give --replicas N or --autoscale MIN:MAX, not both"),
    (["--ray", "--autoscale", "0:3"], "--autoscale 0:3: expected MIN:MAX with 1 <= MIN <= MAX (no scale-to-zero)"),
    (["--ray", "--autoscale", "3:1"], "--autoscale 3:1: expected MIN:MAX with 1 <= MIN <= MAX (no scale-to-zero)"),
    (["--ray", "--autoscale", "two"], "--autoscale two: expected MIN:MAX replicas, e.g. 1:4"),
    (["--ray", "--replicas", "0"], "--replicas 0: must be at least 1"),
    (["--ray", "--sessions-per-replica", "0"], "--sessions-per-replica 0: must be at least 1"),
    (["--ray", "--device", "cpu", "--gpus-per-replica", "1"],
     "--gpus-per-replica 1: a cpu replica takes no GPU (or give --device cuda)"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica -1: must be a number >= 0"),
    (["--ray", "--max-sessions", "4"],
     "--max-sessions 4: counts one server's sessions; with --ray give --sessions-per-replica"),
])
def test_serve_ray_flags(capsys, argv, line):
    pytest.importorskip("ray.serve")  # without Ray, --ray itself is the error (below)
    assert user_error(capsys, "serve", *argv) == "vita-engine serve: " + line


def test_serve_ray_without_ray_says_how_to_get_it(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.split(".")[0] == "ray" else real(n, *a))
    assert user_error(capsys, "serve", "--ray", "--replicas", "2") == \
        'vita-engine serve: --ray: needs Ray Serve, which is not installed: pip install "vita-engine[ray]"'


def test_serve_cannot_listen(capsys):
    with socket.socket() as s:  # a port that is taken
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = user_error(capsys, "serve", "--port", port, "--device", "cpu")
    assert line.startswith(f"vita-engine serve: --host/--port 127.0.0.1:{port}: cannot listen there"), line
    line = user_error(capsys, "serve", "--host", "192.0.2.1", "--device", "cpu")  # TEST-NET: not ours
    assert line.startswith("vita-engine serve: --host/--port 192.0.2.1:8000: cannot listen there"), line


# ---- --debug, VITA_DEBUG, internal errors ----------------------------------------------------------
@pytest.mark.parametrize("argv", [["--debug", "demo", "--audio", "/nonexistent.wav"],
                                  ["demo", "--audio", "/nonexistent.wav", "--debug"]])
def test_debug_flag_shows_traceback(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and "Traceback (most recent call last)" in err and "UsageError" in err
    assert err.strip().splitlines()[-1] == "vita-engine demo: --audio /nonexistent.wav: no such file"


def test_vita_debug_env(capsys, monkeypatch):
    monkeypatch.setenv("VITA_DEBUG", "1")
    rc, _, err = run(capsys, "demo", "--audio", "/nonexistent.wav")
    assert rc == 2 and "Traceback" in err


def test_internal_error_is_one_line_exit_1(capsys, monkeypatch):
    def bug(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "_demo", bug)
    rc, out, err = run(capsys, "demo")
    assert rc == 1 and err.strip().splitlines() == [
        "vita-engine demo: internal error: RuntimeError: boom; second line "
        "(this is a bug; run again with --debug or VITA_DEBUG=1 for the traceback)"]
    rc, out, err = run(capsys, "demo", "--debug")
    assert rc == 1 and "Traceback" in err and "RuntimeError: boom" in err


@pytest.mark.parametrize("exc, code, line", [
    (SystemExit("bench --plot needs matplotlib"), 2, "vita-engine bench: bench --plot needs matplotlib"),
    (KeyboardInterrupt(), 130, "vita-engine bench: interrupted"),
    (ModuleNotFoundError("No module named 'yaml'", name="yaml"), 1,
     "vita-engine bench: the installation is incomplete: no module named 'yaml' (pip install pyyaml, or reinstall vita-engine)"),
    (ModuleNotFoundError("No module named 'vita_engine.nope'", name="vita_engine.nope"), 1,
     "vita-engine bench: internal error: ModuleNotFoundError: No module named 'vita_engine.nope' "
     "(this is a bug; run again with --debug or VITA_DEBUG=1 for the traceback)"),
])
def test_other_exits(capsys, monkeypatch, exc, code, line):
    def fn(args):
        raise exc

    monkeypatch.setattr(cli, "_bench", fn)
    rc, _, err = run(capsys, "bench")
    assert rc == code and err.strip() == line


# ---- without torch -------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["check", "demo", "bench", "serve"])
def test_cli_without_torch(cmd):
    r = run_without_torch(f"from vita_engine import cli; sys.exit(cli.main([{cmd!r}]))")
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f'vita-engine {cmd}: needs PyTorch (torch>=2.4), which is not installed: pip install "vita-engine[torch]"']


def test_float_wav_refused(capsys, tmp_path):
    """A float WAV (format 3), which `wave` cannot read, is named as not 16-bit PCM."""
    data = np.ones(16, "<f4").tobytes()
    p = tmp_path / "f.wav"
    p.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
                  + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32) + b"data" + struct.pack("<I", len(data)) + data)
    assert "not a 16-bit PCM WAV file" in user_error(capsys, "demo", "--audio", p)

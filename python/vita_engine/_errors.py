"""How `vita-engine` and the torch-needing parts of the package report problems.

A user mistake (an impossible option value, a missing or unreadable file, a file that is not what
the option wants, a folder that is not a checkpoint) is ONE line on stderr naming the command, the
argument and the problem, and exit status 2. Anything else is a bug: one line, exit status 1.
`--debug` or `VITA_DEBUG=1` adds the traceback. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import traceback
from pathlib import Path

TORCH_INSTALL = 'pip install "vita-engine[torch]"'

# import name -> distribution name, for the "package missing" hint
_DISTS = {"yaml": "pyyaml", "PIL": "pillow", "silero_vad": "silero-vad", "prometheus_client": "prometheus-client"}


class UsageError(Exception):
    """A user mistake: `arg` (e.g. "--audio") and `value` (what was given) are named in the message."""

    def __init__(self, problem: str, arg: str | None = None, value=None):
        super().__init__(problem)
        self.problem, self.arg, self.value = problem, arg, value

    def __str__(self) -> str:
        if self.arg is None:
            return self.problem
        return f"{self.arg} {self.value}: {self.problem}" if self.value is not None else f"{self.arg}: {self.problem}"


# ---- torch is an optional import for `_C` users -------------------------------------------------
def torch_missing(what: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"{what} needs PyTorch (torch>=2.4), which is not installed: {TORCH_INSTALL}",
                               name="torch")


def require_torch(what: str) -> None:
    """Raise the clear torch-missing error (a ModuleNotFoundError) before a torch import would."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise torch_missing(what) from None


# ---- argparse: one-line errors and value checks -------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG: --opt VALUE: problem`, exit status 2) and a `--debug`
    flag accepted before or after the sub-command (added to every sub-command at parse time, so a
    sub-command added later gets it too)."""

    def parse_known_args(self, args=None, namespace=None):
        if "--debug" not in self._option_string_actions:  # the top-level parser, first call
            self._add_debug(default=False)
            for a in self._actions:
                if isinstance(a, argparse._SubParsersAction):
                    for sp in a.choices.values():
                        if "--debug" not in sp._option_string_actions:
                            sp._add_debug(default=argparse.SUPPRESS)  # keep the top-level value
        return super().parse_known_args(args, namespace)

    def _add_debug(self, default):
        self.add_argument("--debug", action="store_true", default=default,
                          help="show the traceback of an error (or set VITA_DEBUG=1)")

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:  # name the sub-command, not just "vita-engine"
            prog = f"{self.prog} {ns.cmd}" if getattr(ns, "cmd", None) else self.prog
            _fail(prog, f"unrecognized argument(s): {' '.join(extra)} (see {prog} --help)")
        return ns

    def error(self, message):
        cmds = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if cmds and message.startswith(("the following arguments are required", f"argument {cmds[0].dest}:")):
            names = ", ".join(cmds[0].choices)
            got = re.search(r"invalid choice: ('.*?')", message)
            what = f"unknown command {got.group(1)}" if got else "no command given"
            _fail(self.prog, f"{what}: choose one of {names} (see {self.prog} --help)")
        _fail(self.prog, _rephrase(message, self.prog))


def _fail(prog: str, line: str):
    print(f"{prog}: {one_line(line)}", file=sys.stderr)
    sys.exit(2)


def _rephrase(message: str, prog: str) -> str:
    m = re.match(r"argument ([^:]+): (.*)$", message, re.S)
    if not m:
        return f"{message} (see {prog} --help)"
    opt, rest = m.group(1).split("/")[-1], m.group(2)
    if c := re.match(r"invalid choice: (.*?) \(choose from (.*)\)$", rest):
        return f"{opt} {_unquote(c.group(1))}: not one of {', '.join(map(_unquote, c.group(2).split(', ')))}"
    if c := re.match(r"invalid (\w+) value: (.*)$", rest):
        kind = {"int": "an integer", "float": "a number"}.get(c.group(1), f"a valid {c.group(1)}")
        return f"{opt} {_unquote(c.group(2))}: not {kind}"
    if rest.startswith("expected "):
        return f"{opt}: {rest}"
    # our checkers' messages are "VALUE: problem"
    return f"{opt} {rest}" if ": " in rest else f"{opt}: {rest}"


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s


def int_at_least(lo: int):
    def check(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s}: not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{s}: must be at least {lo}")
        return v

    check.__name__ = f"integer >= {lo}"
    return check


def port(s: str) -> int:
    v = int_at_least(1)(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"{s}: not a TCP port (1 to 65535)")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s}: not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{s}: must be a number greater than 0")
    return v


def nonempty(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError(f"'{s}': must not be empty")
    return s


def device(s: str) -> str:
    """cpu | cuda | cuda:N (syntax only; `check_device` tells whether it can be used)."""
    if s == "cpu" or re.fullmatch(r"cuda(:\d+)?", s):
        return s
    raise argparse.ArgumentTypeError(f"{s}: not a device (cpu, cuda or cuda:N)")


# ---- checks on files, run by the commands before any model is loaded ----------------------------
def input_file(arg: str, path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError("no such file", arg, path)
    if p.is_dir():
        raise UsageError("is a folder, not a file", arg, path)
    if not os.access(p, os.R_OK):
        raise UsageError("not readable (permission denied)", arg, path)
    return p


def output_file(arg: str, path) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UsageError("is a folder, not a file", arg, path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"folder {parent} does not exist", arg, path)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError("not writable (permission denied)", arg, path)
    return p


def checkpoint_dir(arg: str, path) -> Path:
    """A VITA-1.5 checkpoint folder (holds config.json); "tiny" is passed through by the caller."""
    p = Path(path)
    if not p.exists():
        raise UsageError("no such folder", arg, path)
    if not p.is_dir():
        raise UsageError("not a folder (expected a VITA-1.5 checkpoint folder, or \"tiny\")", arg, path)
    if not (p / "config.json").is_file():
        raise UsageError("not a VITA-1.5 checkpoint folder (no config.json)", arg, path)
    if not os.access(p / "config.json", os.R_OK):
        raise UsageError("config.json is not readable (permission denied)", arg, path)
    return p


def read_wav(arg: str, path):
    """(int16 samples [n] or [n, channels], sample rate) of a 16-bit PCM WAV file."""
    import wave

    import numpy as np

    p = input_file(arg, path)
    try:
        with wave.open(str(p), "rb") as w:
            width, ch, sr, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            if width != 2:
                raise UsageError(f"{8 * width}-bit samples; only 16-bit PCM WAV is supported", arg, path)
            data = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise UsageError(f"not a 16-bit PCM WAV file ({e or 'truncated'})", arg, path) from None
    except OSError as e:
        raise UsageError(f"cannot read ({e.strerror or e})", arg, path) from None
    x = np.frombuffer(data[: len(data) - len(data) % (2 * ch)], dtype="<i2")
    if x.size == 0:
        raise UsageError("holds no audio samples", arg, path)
    if not np.any(x):
        raise UsageError("is silent (every sample is 0): there is no speech to answer", arg, path)
    return (x.reshape(-1, ch) if ch > 1 else x), sr


def read_image(arg: str, path):
    """The image as an RGB PIL image (decoded fully, so a truncated file fails here)."""
    from PIL import Image, UnidentifiedImageError

    p = input_file(arg, path)
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise UsageError("not an image file Pillow can read", arg, path) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise UsageError(f"cannot decode the image ({e})", arg, path) from None


def check_device(arg: str, dev: str) -> str:
    if dev.startswith("cuda"):
        import vita_engine

        if not vita_engine.built_with_cuda():
            raise UsageError("this build of vita-engine has no CUDA kernels (use --device cpu)", arg, dev)
        n = vita_engine._C.cuda_device_count()
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        if idx >= n:
            raise UsageError(f"no such GPU ({n} CUDA device(s) visible)", arg, dev)
    return dev


@contextlib.contextmanager
def blame(arg: str, value, *errors):
    """Report `errors` raised inside the block as a user mistake in `arg VALUE`."""
    try:
        yield
    except errors as e:
        raise UsageError(str(e), arg, value) from e


# ---- the wrapper around a sub-command -----------------------------------------------------------
def debug_enabled(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("VITA_DEBUG", "") not in ("", "0")


def one_line(msg: str) -> str:
    return "; ".join(s.strip() for s in str(msg).splitlines() if s.strip())


def run_command(fn, args, prog: str) -> int:
    """Run `fn(args)`; turn errors into one line (2: user mistake, 1: a bug), traceback if --debug."""
    debug = debug_enabled(args)

    def say(line, code):
        if debug:
            traceback.print_exc()
        print(f"{prog}: {one_line(line)}", file=sys.stderr)
        return code

    try:
        return int(fn(args) or 0)
    except UsageError as e:
        return say(str(e), 2)
    except ModuleNotFoundError as e:
        top = (e.name or "vita_engine").split(".")[0]
        if top == "torch":
            return say(f"needs PyTorch (torch>=2.4), which is not installed: {TORCH_INSTALL}", 2)
        if top != "vita_engine":  # a module of our own missing is a bug: below
            return say(f"the installation is incomplete: no module named {top!r} "
                       f"(pip install {_DISTS.get(top, top)}, or reinstall vita-engine)", 1)
        return say(_internal(e, debug), 1)
    except KeyboardInterrupt:
        return say("interrupted", 130)
    except SystemExit as e:  # `raise SystemExit("message")` is this code base's user-error idiom
        if isinstance(e.code, str):
            return say(e.code, 2)
        raise
    except Exception as e:  # noqa: BLE001  (a bug: say so in one line, keep the traceback for --debug)
        return say(_internal(e, debug), 1)


def _internal(e: BaseException, debug: bool) -> str:
    hint = "" if debug else " (this is a bug; run again with --debug or VITA_DEBUG=1 for the traceback)"
    return f"internal error: {type(e).__name__}: {e}{hint}"

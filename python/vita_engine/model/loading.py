"""Checkpoint reading: sharded safetensors (memory-mapped), torch `.pt` files, CMVN statistics,
weight-norm folding, and one clear error for everything that does not match.

Tensors are converted to the requested dtype/device one at a time, straight from the memory map,
so host memory peaks near one copy of the model (plus one tensor).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "load_tensors",
    "load_torch_file",
    "fold_weight_norm",
    "load_cmvn",
    "read_json",
    "load_codec",
    "check_device_dtype",
]

Shape = Tuple[Optional[int], ...]

#: above this many bytes a tqdm progress bar is shown while loading
PROGRESS_BYTES = 256 << 20


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used as it is; the message says what and where."""


def read_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _corrupt(path, e) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read safetensors file ({type(e).__name__}: {e}); it is probably truncated or "
        f"corrupt (size on disk {os.path.getsize(path) if os.path.exists(path) else 'n/a'} bytes) — re-download it"
    )


class SafetensorsCheckpoint:
    """All `*.safetensors` tensors of one folder, memory-mapped.

    With `model.safetensors.index.json` the index decides which file holds which key (and every
    listed file must exist); without it every `*.safetensors` file in the folder is read."""

    def __init__(self, path):
        from safetensors import safe_open

        self.dir = Path(path)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.dir}")
        index = self.dir / "model.safetensors.index.json"
        self.index_map: Optional[Dict[str, str]] = None
        if index.is_file():
            data = read_json(index)
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self.index_map = dict(wm)
            files = sorted(set(wm.values()))
            absent = [f for f in files if not (self.dir / f).is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shard file(s) that do not exist in {self.dir}: {', '.join(absent)}")
            self.files = [self.dir / f for f in files]
        else:
            self.files = sorted(self.dir.glob("*.safetensors"))
        if not self.files:
            raise CheckpointError(f"no *.safetensors files in {self.dir}")
        self._handles = {}
        self.key_file: Dict[str, Path] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.nbytes: Dict[str, int] = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
                for k in keys:
                    sl = h.get_slice(k)
                    shp = tuple(int(s) for s in sl.get_shape())
                    self.shapes[k] = shp
                    self.nbytes[k] = math.prod(shp) * _dtype_size(sl.get_dtype())
            except CheckpointError:
                raise
            except Exception as e:  # SafetensorError, OSError, ...
                raise _corrupt(f, e) from None
            self._handles[f] = h
            for k in keys:
                if k in self.key_file:
                    raise CheckpointError(f"tensor {k!r} appears in both {self.key_file[k].name} and {f.name}")
                self.key_file[k] = f
        if self.index_map is not None:
            for k, fn in self.index_map.items():
                if k in self.key_file and self.key_file[k].name != Path(fn).name:
                    raise CheckpointError(f"{index}: says {k!r} is in {fn} but it is in {self.key_file[k].name}")

    def keys(self):
        return self.key_file.keys()

    def __contains__(self, key):
        return key in self.key_file

    def get(self, key: str) -> torch.Tensor:
        f = self.key_file[key]
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:
            raise _corrupt(f, e) from None

    def missing_from_index(self) -> list:
        """Keys the index lists that no shard holds."""
        if self.index_map is None:
            return []
        return [k for k in self.index_map if k not in self.key_file]


def _dtype_size(name: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(name, 1)


def _shape_ok(found: Sequence[int], expected: Optional[Shape]) -> bool:
    if expected is None:
        return True
    if len(found) != len(expected):
        return False
    return all(e is None or int(e) == int(f) for f, e in zip(found, expected))


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _convert(t: torch.Tensor, dtype, device) -> torch.Tensor:
    if t.is_floating_point() and dtype is not None:
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def load_tensors(
    source,
    expected: Mapping[str, Optional[Shape]],
    *,
    dtype: Optional[torch.dtype] = None,
    device="cpu",
    ignore: Iterable[str] = (),
    where: str = "",
    progress: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """Load every key of `expected` from `source` (a SafetensorsCheckpoint or a plain dict of
    tensors), check shapes (None = any size), and report missing / unexpected / mis-shaped tensors
    in ONE CheckpointError. Keys of the source matching a glob in `ignore` are skipped silently."""
    ignore = tuple(ignore)
    is_st = isinstance(source, SafetensorsCheckpoint)
    keys = list(source.keys())
    shapes = source.shapes if is_st else {k: tuple(v.shape) for k, v in source.items()}

    def file_of(k):
        return source.key_file[k].name if is_st else where

    problems = []
    if is_st:
        for k in source.missing_from_index():
            if k in expected:
                problems.append(f"  missing   {k}: listed in model.safetensors.index.json ({source.index_map[k]}) but not in that file")
    for k, shp in expected.items():
        if k not in shapes:
            if not any(k in p for p in problems):
                problems.append(f"  missing   {k}: expected shape {_fmt(shp) if shp is not None else '(any)'}")
        elif not _shape_ok(shapes[k], shp):
            problems.append(f"  shape     {file_of(k)}: {k}: expected {_fmt(shp)}, found {_fmt(shapes[k])}")
    for k in keys:
        if k not in expected and not any(fnmatch.fnmatchcase(k, p) for p in ignore):
            problems.append(f"  unexpected {file_of(k)}: {k} {_fmt(shapes[k])}")
    if problems:
        loc = str(source.dir) if is_st else where
        raise CheckpointError(
            f"checkpoint {loc} does not match the model configuration ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )

    out: Dict[str, torch.Tensor] = {}
    total = sum(source.nbytes.get(k, 0) for k in expected) if is_st else 0
    show = (total >= PROGRESS_BYTES) if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {Path(str(getattr(source, 'dir', where))).name}")
    for k in expected:
        t = source.get(k) if is_st else source[k]
        out[k] = _convert(t, dtype, device)
        del t
        if bar is not None:
            bar.update(source.nbytes.get(k, 0))
    if bar is not None:
        bar.close()
    return out


def load_torch_file(path) -> dict:
    """torch.load(weights_only=True) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e}); the file may be truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def fold_weight_norm(sd: Mapping[str, torch.Tensor], where: str = "") -> Dict[str, torch.Tensor]:
    """Replace every `X.weight_g` / `X.weight_v` pair by `X.weight = g * v / ||v||` (norm over all
    dims but 0, as torch weight_norm(dim=0); for ConvTranspose1d dim 0 is the input channel).

    The folded weight is float32 whatever the storage dtype: VITA loads the fp16 `weight_g`/`weight_v`
    of `final.pt` into float32 parameters and folds there, so rounding the fold back to fp16 would
    add an error VITA does not have. The caller casts once, to its compute dtype."""
    out: Dict[str, torch.Tensor] = {}
    bad = []
    for k, t in sd.items():
        if k == "weight_g" or k.endswith(".weight_g"):
            base = k[: -len("weight_g")]  # keeps the trailing dot (or is empty)
            v = sd.get(base + "weight_v")
            if v is None:
                bad.append(f"{k} has no matching {base}weight_v")
                continue
            g = t
            if g.numel() != v.shape[0]:
                bad.append(f"{k}: shape {list(g.shape)} does not match {base}weight_v {list(v.shape)} (dim 0)")
                continue
            vf = v.to(torch.float32)
            norm = vf.reshape(vf.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
            out[base + "weight"] = g.to(torch.float32).reshape(norm.shape) * vf / norm
        elif k == "weight_v" or k.endswith(".weight_v"):
            if k[: -len("weight_v")] + "weight_g" not in sd:
                bad.append(f"{k} has no matching weight_g")
        else:
            out[k] = t
    if bad:
        raise CheckpointError(f"{where}: broken weight-norm pairs:\n  " + "\n  ".join(bad))
    return out


def load_cmvn(path, is_json: Optional[bool] = None):
    """Global CMVN statistics (WeNet): Kaldi text `[ sums... count\\n sumsq... 0 ]` or JSON
    `{mean_stat, var_stat, frame_num}` -> (mean, istd) float64 tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing CMVN file: {path}")
    text = path.read_bytes()
    if text[:2] == b"\0B":
        raise CheckpointError(f"{path}: binary Kaldi CMVN is not supported; convert it to text (copy-matrix --binary=false)")
    text = text.decode("utf-8")
    if is_json is None:
        is_json = text.lstrip().startswith("{")
    try:
        if is_json:
            d = json.loads(text)
            means = [float(x) for x in d["mean_stat"]]
            var = [float(x) for x in d["var_stat"]]
            count = float(d["frame_num"])
        else:
            arr = text.split()
            if arr[0] != "[" or arr[-1] != "]":
                raise ValueError("expected '[' ... ']'")
            dim = (len(arr) - 4) // 2
            means = [float(x) for x in arr[1 : dim + 1]]
            count = float(arr[dim + 1])
            var = [float(x) for x in arr[dim + 2 : 2 * dim + 2]]
    except Exception as e:
        raise CheckpointError(f"{path}: cannot parse CMVN statistics ({type(e).__name__}: {e})") from None
    mean = torch.tensor(means, dtype=torch.float64) / count
    v = torch.tensor(var, dtype=torch.float64) / count - mean * mean
    v = v.clamp(min=1e-20)
    return mean, 1.0 / v.sqrt()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device_dtype(where: str, device, dtype) -> Tuple[torch.device, torch.dtype]:
    """`device` ("cpu", "cuda", "cuda:N" or a torch.device) usable here, `dtype` float32 / float16 /
    bfloat16 (a torch dtype or its name): else ValueError / TypeError naming the argument."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{where}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{where}: device={device!r} but CUDA is not available here "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{where}: device={device!r} but only {n} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"{where}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    dt = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dt not in _DTYPES.values():
        raise TypeError(f"{where}: dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dev, dt


def load_codec(path, device="cpu", dtype=torch.float32):
    """The TiCodec of `vita_tts_ckpt/codec`: parse model.json, load final.pt, fold weight norm,
    build `vita_engine.model.codec.Codec` (imported lazily; owned by the codec module)."""
    device, dtype = check_device_dtype("load_codec", device, dtype)
    path = Path(path)
    cfg = read_json(path / "model.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path / 'model.json'}: expected a JSON object of codec hyper-parameters")
    sd = codec_state_dict(path)
    from .codec import Codec

    codec = Codec(cfg, device, dtype)
    codec.load_folded_state_dict(sd)
    return codec


def codec_state_dict(path) -> Dict[str, torch.Tensor]:
    """`generator.*` and `quantizer.*` of codec/final.pt with weight norm folded (encoder dropped)."""
    path = Path(path)
    f = path / "final.pt"
    raw = load_torch_file(f)
    missing = [k for k in ("generator", "quantizer") if not isinstance(raw.get(k), dict)]
    if missing:
        raise CheckpointError(f"{f}: expected dicts under keys 'generator' and 'quantizer' (and 'encoder'); missing {missing}; found keys {sorted(raw)[:10]}")
    sd: Dict[str, torch.Tensor] = {}
    for part in ("generator", "quantizer"):
        folded = fold_weight_norm(raw[part], where=f"{f} [{part}]")
        for k, t in folded.items():
            sd[f"{part}.{k}"] = t
    return sd

"""Configuration parsing: the LLM's config.json (Qwen2 fields, VITA `mm_*` keys), the InternViT
tower folder, the audio-encoder `train.yaml`, and the TTS decoder `model.json`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .loading import CheckpointError, read_json

__all__ = ["LLMConfig", "VisionConfig", "AudioConfig", "TTSConfig", "resolve_subfolder", "QWEN25_TOKENIZER_LEN"]

#: len(Qwen2.5 tokenizer): the VITA loader resizes the 152064-row tables to this many rows
QWEN25_TOKENIZER_LEN = 151665


@dataclass
class LLMConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    head_dim: int = 0
    attention_bias: bool = True  # q/k/v bias (Qwen2); o_proj never has one
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "LLMConfig":
        if "text_config" in d and "hidden_size" not in d:  # vLLM composite config
            d = {**d["text_config"], **{k: v for k, v in d.items() if k != "text_config"}}
        need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        miss = [k for k in need if k not in d]
        if miss:
            raise CheckpointError(f"{where}: missing Qwen2 field(s) {miss}")
        nh = int(d["num_attention_heads"])
        rs = d.get("rope_scaling")
        if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
            raise CheckpointError(f"{where}: rope_scaling {rs} is not supported (VITA-1.5 uses plain RoPE)")
        theta = d.get("rope_theta")
        if theta is None and isinstance(d.get("rope_parameters"), dict):
            theta = d["rope_parameters"].get("rope_theta")
        return cls(
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=nh,
            num_kv_heads=int(d.get("num_key_value_heads") or nh),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            rope_theta=float(theta if theta is not None else 1e6),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // nh),
            attention_bias=bool(d.get("attention_bias", True)) if d.get("model_type") not in ("qwen2", "vita-Qwen2") else True,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            raw=d,
        )

    @classmethod
    def from_file(cls, path) -> "LLMConfig":
        p = Path(path)
        return cls.from_dict(read_json(p), where=str(p))

    def vocab_rows_allowed(self) -> List[int]:
        """Embedding / head row counts accepted for this config (152064 or 151665 for VITA-1.5)."""
        rows = {self.vocab_size}
        if self.vocab_size >= QWEN25_TOKENIZER_LEN:
            rows.add(QWEN25_TOKENIZER_LEN)
        return sorted(rows)


def resolve_subfolder(root: Path, value: Optional[str], key: str, default_name: Optional[str] = None) -> Path:
    """Spec §11.9: the value as given, then relative to the checkpoint folder, then its last path
    component inside the checkpoint folder; else a CheckpointError naming the key and the tries."""
    root = Path(root)
    tried = []
    cands = []
    if value:
        v = Path(str(value))
        cands += [v, root / v, root / v.name]
    if default_name:
        cands.append(root / default_name)
    for c in cands:
        tried.append(str(c))
        if c.is_dir():
            return c
    raise CheckpointError(
        f"{root / 'config.json'}: {key} = {value!r} does not name an existing folder (tried: {', '.join(tried) or 'nothing'}); "
        f"put that folder inside the checkpoint folder or set {key} in config.json to its path"
    )


@dataclass
class VisionConfig:
    image_size: int = 448
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    downsample_ratio: float = 0.5
    scale_pix_shuffle: float = 0.5
    image_mean: tuple = (0.485, 0.456, 0.406)
    image_std: tuple = (0.229, 0.224, 0.225)
    max_tiles: int = 12
    use_thumbnail: bool = True

    @classmethod
    def from_folder(cls, folder: Path, llm_raw: dict) -> "VisionConfig":
        folder = Path(folder)
        d = read_json(folder / "config.json")
        if d.get("vision_config"):
            d = d["vision_config"]
        if d.get("qk_normalization"):
            raise CheckpointError(f"{folder / 'config.json'}: qk_normalization=true is not supported (InternViT-300M has none)")
        if d.get("norm_type", "layer_norm") != "layer_norm":
            raise CheckpointError(f"{folder / 'config.json'}: norm_type {d.get('norm_type')!r} is not supported")
        c = cls(
            image_size=int(d.get("image_size", 448)),
            patch_size=int(d.get("patch_size", 14)),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(d.get("qkv_bias", True)),
        )
        pp = folder / "preprocessor_config.json"
        if pp.is_file():
            p = read_json(pp)
            c.image_mean = tuple(p.get("image_mean", c.image_mean))
            c.image_std = tuple(p.get("image_std", c.image_std))
        c.max_tiles = int(llm_raw.get("max_dynamic_patch", 12))
        c.use_thumbnail = bool(llm_raw.get("use_thumbnail", True))
        c.downsample_ratio = float(llm_raw.get("downsample_ratio", 0.5))
        return c


@dataclass
class AudioConfig:
    num_heads: int = 16
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0
    sample_rate: int = 16000
    enc_ln_eps: float = 1e-5
    adapter_ln_eps: float = 1e-3
    adapter_kernel: int = 5
    adapter_stride: int = 2
    dynamic_chunks: bool = False
    chunk_size: int = -1
    left_chunks: int = -1
    cmvn_file: Optional[Path] = None
    is_json_cmvn: Optional[bool] = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, folder: Path) -> "AudioConfig":
        import yaml

        folder = Path(folder)
        f = folder / "train.yaml"
        if not f.is_file():
            raise CheckpointError(f"missing file: {f} (the audio-encoder folder must hold train.yaml and global_cmvn)")
        try:
            y = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"{f}: not valid YAML ({e})") from None
        c = cls(raw=y)
        para = (y.get("encoder_conf") or {}).get("para_conf") or {}
        # whale's assign_args_from_dict maps every key with '-' -> '_' onto its argparse names, so
        # "transformer-chunk_size", "transformer-chunk-size" and "transformer_chunk_size" are one key
        tr = {str(k).replace("-", "_"): v for k, v in (para.get("transformer") or {}).items()}
        c.num_heads = int(tr.get("transformer_attention_heads", c.num_heads))
        # argparse default True; Transformer.forward tests `== True`, so only a real true counts
        c.dynamic_chunks = _yaml_true(tr.get("transformer_dynamic_chunks", True))
        c.chunk_size = int(tr.get("transformer_chunk_size", -1))
        c.left_chunks = int(tr.get("transformer_left_chunks", -1))
        fb = (y.get("dataset_conf") or {}).get("fbank_conf") or {}
        c.num_mel_bins = int(fb.get("num_mel_bins", y.get("input_dim", 80)))
        c.frame_length_ms = float(fb.get("frame_length", 25))
        c.frame_shift_ms = float(fb.get("frame_shift", 10))
        c.dither = 0.0  # deterministic (spec §4); the training value is fbank_conf.dither
        rs = (y.get("dataset_conf") or {}).get("resample_conf") or {}
        c.sample_rate = int(rs.get("resample_rate", 16000))
        mc = y.get("model_conf") or {}
        # audioEncoder builds CNNSubsampling only for adpter_type "subsampling" ("cnn" is a two-conv
        # BatchNorm adapter with LEFT padding, "linear" a plain Linear). The tensors decide what is
        # loaded (another adapter's weights fail the shape check), so a mislabelled yaml (tiny
        # checkpoints cached by older versions say "cnn") only warns.
        if str(mc.get("adpter_type", "subsampling")) != "subsampling":
            import warnings

            warnings.warn(f"{f}: model_conf.adpter_type {mc.get('adpter_type')!r}: VITA-1.5's adapter is 'subsampling' "
                          f"(CNNSubsampling), and the adpter.* tensors are read as that", stacklevel=2)
        c.adapter_kernel = int(mc.get("kernel_size", 5))
        if str(mc.get("norm", "layer")) != "layer":
            raise CheckpointError(f"{f}: model_conf.norm {mc.get('norm')!r} is not supported (VITA-1.5 uses 'layer')")
        if str(mc.get("activation_func", "gelu")) != "gelu":
            raise CheckpointError(f"{f}: model_conf.activation_func {mc.get('activation_func')!r} is not supported")
        c.is_json_cmvn = y.get("is_json_cmvn")
        cm = folder / "global_cmvn"
        c.cmvn_file = cm if cm.is_file() else None
        return c


def _yaml_true(v) -> bool:
    """`v == True` as whale's Transformer.forward tests it, with strtobool's spellings for strings."""
    if isinstance(v, str):
        return v.strip().lower() in ("y", "yes", "t", "true", "on", "1")
    return v == True  # noqa: E712 (1 and 1.0 count, as in the reference)


@dataclass
class TTSConfig:
    idim: int
    odim: int
    hidden: int
    intermediate: int
    num_blocks: int
    num_heads: int
    out_dim: int
    topk: int = 2
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_tokens: int = 1000
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def nar_layers(self) -> int:
        return self.num_blocks // 2

    @classmethod
    def from_file(cls, path) -> "TTSConfig":
        path = Path(path)
        d = read_json(path)
        if not (isinstance(d, list) and len(d) == 3 and isinstance(d[2], dict)):
            raise CheckpointError(f"{path}: expected a JSON list [idim, odim, args]")
        idim, odim, a = int(d[0]), int(d[1]), d[2]
        need = ["transformer_attention_dim", "transformer_linear_units", "transformer_num_blocks", "transformer_attention_heads"]
        miss = [k for k in need if k not in a]
        if miss:
            raise CheckpointError(f"{path}: args lack {miss}")
        hid = int(a["transformer_attention_dim"])
        if hid != idim:
            raise CheckpointError(f"{path}: idim {idim} must equal transformer_attention_dim {hid}")
        return cls(
            idim=idim, odim=odim, hidden=hid,
            intermediate=int(a["transformer_linear_units"]),
            num_blocks=int(a["transformer_num_blocks"]),
            num_heads=int(a["transformer_attention_heads"]),
            out_dim=int(a.get("encoder_output_dim", hid)),
            topk=int(a.get("decoder_topk", 2)),
            max_tokens=int(a.get("max_tokens", 1000)),
            raw=a,
        )

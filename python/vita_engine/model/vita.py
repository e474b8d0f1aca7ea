"""VitaModel: the whole VITA-1.5 checkpoint (LLM + vision + audio + TTS + codec) on vita_engine ops."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ._ops import OpsHandle
from .audio import CMVN_KEYS, AudioEncoder
from .config import AudioConfig, LLMConfig, TTSConfig, VisionConfig, resolve_subfolder
from .llm import LLM, LLM_IGNORE
from .loading import CheckpointError, SafetensorsCheckpoint, check_device_dtype, load_cmvn, load_codec, load_tensors, load_torch_file
from .tts import TTS_IGNORE, TTSDecoder
from .vision import VisionTower

__all__ = ["VitaModel", "IMAGE_TOKEN_INDEX", "AUDIO_TOKEN_INDEX"]

IMAGE_TOKEN_INDEX = -200
AUDIO_TOKEN_INDEX = -500
log = logging.getLogger(__name__)


class VitaModel:
    """See docs/architecture.md §5. Components: `llm`, `vision`, `audio`, `tts`, `codec` (None when that part of
    the checkpoint, or the codec module, is absent), plus `splice`."""

    def __init__(self, path, llm, vision, audio, tts, codec, ops: OpsHandle, config: LLMConfig):
        self.path, self.llm, self.vision, self.audio, self.tts, self.codec = Path(path), llm, vision, audio, tts, codec
        self.ops, self.config = ops, config

    @property
    def use_reference(self) -> bool:
        return self.ops.use_reference

    @use_reference.setter
    def use_reference(self, flag: bool) -> None:
        self.ops.set_reference(flag)

    def reference(self, flag: bool = True):
        """Context manager: `with m.reference(): ...` runs every component on ops.reference."""
        return self.ops.reference(flag)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, *, use_reference: bool = False,
                        load_tts: bool = True, load_codec_model: bool = True, progress: Optional[bool] = None) -> "VitaModel":
        device, dtype = check_device_dtype("VitaModel.from_pretrained", device, dtype)
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {root}")
        cfg = LLMConfig.from_file(root / "config.json")
        raw = cfg.raw
        ops = OpsHandle(use_reference)
        ckpt = SafetensorsCheckpoint(root)
        rows = LLM.vocab_rows(cfg, ckpt)
        expected = LLM.expected_shapes(cfg, rows)
        ignore = list(LLM_IGNORE)
        if cfg.tie_word_embeddings:
            ignore.append("lm_head.weight")

        vcfg = acfg = None
        if raw.get("mm_vision_tower") is not None:
            vdir = resolve_subfolder(root, raw["mm_vision_tower"], "mm_vision_tower")
            vcfg = VisionConfig.from_folder(vdir, raw)
            if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
                raise CheckpointError(f"{root / 'config.json'}: mm_projector_type {raw['mm_projector_type']!r} is not supported (expected mlp2x_gelu)")
            expected.update(VisionTower.expected_shapes(vcfg, cfg.hidden_size))
        else:
            ignore += ["model.vision_tower.*", "model.mm_projector.*"]
        cmvn = None
        if raw.get("mm_audio_encoder") is not None:
            adir = resolve_subfolder(root, raw["mm_audio_encoder"], "mm_audio_encoder")
            acfg = AudioConfig.from_folder(adir)
            expected.update(AudioEncoder.expected_shapes(ckpt.shapes, acfg, cfg.hidden_size))
            if CMVN_KEYS[0] in ckpt or CMVN_KEYS[1] in ckpt:  # authoritative (spec §11.3)
                expected.update({k: (acfg.num_mel_bins,) for k in CMVN_KEYS})
            else:
                if acfg.cmvn_file is None:
                    raise CheckpointError(f"no CMVN statistics: neither {CMVN_KEYS[0]} in the safetensors nor {adir / 'global_cmvn'}")
                mean, istd = load_cmvn(acfg.cmvn_file, acfg.is_json_cmvn)
                cmvn = (mean.to(torch.float32), istd.to(torch.float32))
        else:
            ignore += ["model.audio_encoder.*"]

        t = load_tensors(ckpt, expected, dtype=dtype, device=device, ignore=ignore, progress=progress)
        del ckpt
        vt = {k: t.pop(k) for k in list(t) if k.startswith("model.vision_tower.") or k.startswith("model.mm_projector.")}
        at = {k: t.pop(k) for k in list(t) if k.startswith("model.audio_encoder.")}
        llm = LLM(cfg, t, ops)
        vision = VisionTower(vcfg, vt, ops) if vcfg is not None else None
        audio = AudioEncoder(acfg, at, ops, cmvn) if acfg is not None else None

        tts = codec = None
        tdir = root / "vita_tts_ckpt"
        if load_tts and tdir.is_dir():
            tts = load_tts_decoder(tdir / "decoder", llm.embed_tokens, ops, device, dtype)
        elif load_tts:
            warnings.warn(f"{tdir} not found: the model has no speech output (m.tts = m.codec = None)", stacklevel=2)
        if load_codec_model and tdir.is_dir():
            try:
                codec = load_codec(tdir / "codec", device, dtype)
            except ModuleNotFoundError as e:
                if "vita_engine.model.codec" not in str(e):
                    raise
                warnings.warn("vita_engine.model.codec is not available: m.codec = None", stacklevel=2)
        return cls(root, llm, vision, audio, tts, codec, ops, cfg)

    # ---- splicing ----------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: callers may feed the output to autograd-enabled code
    def splice(self, input_ids, image_features=None, audio_features=None) -> torch.Tensor:
        """Embed input_ids, expanding each -200 into the tokens of the next image tile/frame
        (image_features [tiles, tokens, hidden] or a list of [tokens, hidden]) and each -500 into
        the next audio clip (audio_features [T_llm, hidden] or a list of them) -> [T', hidden]."""
        ids = torch.as_tensor(input_ids).reshape(-1).tolist()
        imgs = _as_list(image_features, 3)
        auds = _as_list(audio_features, 2)
        n_img = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
        n_aud = sum(1 for i in ids if i == AUDIO_TOKEN_INDEX)
        if n_img != len(imgs):
            raise ValueError(f"splice: input_ids has {n_img} image placeholder(s) (-200, one per tile/frame) but {len(imgs)} image tile feature(s) were given")
        if n_aud != len(auds):
            raise ValueError(f"splice: input_ids has {n_aud} audio placeholder(s) (-500, one per clip) but {len(auds)} audio clip feature(s) were given")
        bad = sorted({i for i in ids if i < 0 and i not in (IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX)})
        if bad:
            raise ValueError(f"splice: unknown negative ids {bad} (only -200 image and -500 audio placeholders)")
        exp, feats = [], []
        ii = ai = 0
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                f = imgs[ii]; ii += 1
            elif i == AUDIO_TOKEN_INDEX:
                f = auds[ai]; ai += 1
            else:
                exp.append(i)
                continue
            exp.extend([-1] * f.shape[0])
            feats.append(f)
        E = self.llm.embed_tokens
        mm = torch.cat([f.to(E.device, E.dtype) for f in feats], 0) if feats else None
        return self.ops.fuse_embeddings(torch.tensor(exp, dtype=torch.long, device=E.device), E, mm)


def _as_list(x, tensor_dim: int):
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        if x.dim() == tensor_dim:
            return list(x) if tensor_dim == 3 else [x]
        if x.dim() == tensor_dim - 1 and tensor_dim == 3:
            return [x]
        raise ValueError(f"splice: expected a {tensor_dim}-D feature tensor, got shape {tuple(x.shape)}")
    return list(x)


def load_tts_decoder(ddir: Path, embed_tokens: torch.Tensor, ops: OpsHandle, device, dtype) -> TTSDecoder:
    """vita_tts_ckpt/decoder: model.json ([idim, odim, args]) + final.pt (state dict, maybe under 'model')."""
    ddir = Path(ddir)
    cfg = TTSConfig.from_file(ddir / "model.json")
    sd = load_torch_file(ddir / "final.pt")
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    t = load_tensors(sd, TTSDecoder.expected_shapes(cfg), dtype=dtype, device=device, ignore=TTS_IGNORE, where=str(ddir / "final.pt"))
    return TTSDecoder(cfg, t, embed_tokens, ops)

"""A VitaModel with RANDOM weights at given dimensions, built directly on the target device (for GPU
timing at the real VITA-1.5 sizes without a 15 GB checkpoint or 15 GB of host RAM): every tensor is
drawn with torch.randn on the device, component by component, through the same classes the loader
builds. The tokenizer is the tiny test tokenizer (its ids are valid rows of any vocabulary)."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

__all__ = ["DIMS", "random_vita_model"]

#: spec §2-§5 (the real model) and a small CPU-sized variant of the same structure (for tests). The TTS
#: weights are plain random (no eos shaping as in testing.py): its segments end at bench's tts_max_tokens.
DIMS = {
    "full": dict(llm=dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064),
                 vision=dict(hidden=1024, layers=24, heads=16, inter=4096, image=448),
                 audio=dict(heads=16, layers=24), tts=dict(hidden=896, heads=14, inter=4864, blocks=4, odim=1024),
                 codec=dict(code_dim=512, global_dim=128, n_codes=1024, global_code_num=8,
                            global_tokens=[473, 975, 419, 219, 565, 121, 550, 616], upsample_initial_channel=512,
                            upsample_rates=[8, 5, 5, 3], upsample_kernel_sizes=[16, 11, 11, 5],
                            resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3)),
    "mini": dict(llm=dict(hidden=256, layers=2, heads=4, kv=2, inter=512, vocab=2048),
                 vision=dict(hidden=64, layers=1, heads=2, inter=128, image=448),
                 audio=dict(heads=4, layers=1), tts=dict(hidden=64, heads=2, inter=128, blocks=2, odim=64),
                 # the real generator structure at 1/8 width, as the tiny test model's (testing.TINY)
                 codec=dict(code_dim=32, global_dim=16, n_codes=64, global_code_num=2, global_tokens=[3, 7],
                            upsample_initial_channel=64, upsample_rates=[8, 5, 5, 3], upsample_kernel_sizes=[16, 11, 11, 5],
                            resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3)),
}


def _rand(shapes: Dict[str, Tuple[int, ...]], device, dtype, g) -> Dict[str, torch.Tensor]:
    out = {}
    for k, s in shapes.items():
        if len(s) == 1:
            base = 1.0 if any(n in k for n in ("norm", "bn2", "ls1", "ls2")) else 0.0
            t = torch.full(s, base, device=device, dtype=dtype)
        else:
            fan = math.prod(s[1:]) if "embed_tokens" not in k and "embedding" not in k else s[-1]
            t = torch.randn(s, device=device, dtype=torch.float32, generator=g).mul_(fan ** -0.5).to(dtype)
        out[k] = t
    return out


@torch.inference_mode()
def random_vita_model(dims: str = "full", device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """-> (VitaModel, folder with config.json / tokenizer.json for the Engine)."""
    from ..model._ops import OpsHandle
    from ..model.audio import AudioEncoder
    from ..model.codec import Codec
    from ..model.config import AudioConfig, LLMConfig, TTSConfig, VisionConfig
    from ..model.llm import LLM
    from ..model.tts import TTSDecoder
    from ..model.vision import VisionTower
    from ..model.vita import VitaModel
    from ..testing import tiny_tokenizer

    D = DIMS[dims]
    L = D["llm"]
    d = Path(tempfile.mkdtemp(prefix=f"vita-random-{dims}-"))
    tok, sp = tiny_tokenizer(1024)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"hidden_size": L["hidden"], "num_hidden_layers": L["layers"], "num_attention_heads": L["heads"],
           "num_key_value_heads": L["kv"], "intermediate_size": L["inter"], "vocab_size": L["vocab"], "rope_theta": 1e6,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768, "max_dynamic_patch": 1,
           "eos_token_id": sp["<|im_end|>"]}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [sp["<|im_end|>"], sp["<|endoftext|>"]]}))
    g = torch.Generator(device=device).manual_seed(seed)
    ops = OpsHandle()
    c = LLMConfig.from_dict(cfg)
    llm = LLM(c, _rand(LLM.expected_shapes(c), device, dtype, g), ops)
    # Random weights would answer with ids the small tokenizer cannot spell (no text -> no speech):
    # zero the head rows past its text range so greedy decoding stays inside it. Same GEMM cost.
    n_text = min(sp.values()) if sp else 1000
    if llm.lm_head.shape[0] > n_text:
        if llm.lm_head is llm.embed_tokens:
            llm.lm_head = llm.lm_head.clone()
        llm.lm_head[n_text:].zero_()
    V = D["vision"]
    vc = VisionConfig(image_size=V["image"], hidden_size=V["hidden"], num_layers=V["layers"], num_heads=V["heads"],
                      intermediate_size=V["inter"], max_tiles=1)
    vision = VisionTower(vc, _rand(VisionTower.expected_shapes(vc, L["hidden"]), device, dtype, g), ops)
    A = D["audio"]
    ac = AudioConfig(num_heads=A["heads"])
    ash = AudioEncoder.expected_shapes({}, ac, L["hidden"], num_layers=A["layers"])
    if dims != "full":  # shrink the audio encoder widths for the CPU variant
        ash = AudioEncoder.expected_shapes({"model.audio_encoder.encoder.enc.0.core.conv.0.weight": (32, 1, 3, 3),
                                            "model.audio_encoder.encoder.enc.0.core.out.0.weight": (64, 1)}, ac, L["hidden"],
                                           num_layers=A["layers"])
    cmvn = (torch.zeros(ac.num_mel_bins), torch.full((ac.num_mel_bins,), 0.1))
    audio = AudioEncoder(ac, _rand(ash, device, dtype, g), ops, cmvn)
    T = D["tts"]
    tc = TTSConfig(idim=T["hidden"], odim=T["odim"], hidden=T["hidden"], intermediate=T["inter"], num_blocks=T["blocks"],
                   num_heads=T["heads"], out_dim=T["hidden"])
    tts = TTSDecoder(tc, _rand(TTSDecoder.expected_shapes(tc), device, dtype, g), llm.embed_tokens, ops)
    C = dict(D["codec"], resblock="1", n_code_groups=1, residul_layer=1, sampling_rate=24000)
    codec = Codec(C, device, dtype)
    codec.load_folded_state_dict(_rand(codec._expected_shapes(), device, dtype, g))
    return VitaModel(d, llm, vision, audio, tts, codec, ops, c), d

"""Test and demo helpers: `make_tiny_checkpoint(dir)` writes a tiny random VITA-1.5 in exactly the real
on-disk layout, loaded by the same code path as the real checkpoint.

Sizes are spec §10's, with two departures so that the tiny model behaves like the real one where the
runtime depends on it (issue 11 item 5):
* the codec has the REAL generator structure at 1/8 of its widths: upsample rates [8, 5, 5, 3] with
  kernels [16, 11, 11, 5] (hop 600 samples = 25 ms per token at 24 kHz, not §10's 12), resblock
  kernels [3, 7, 11] with dilations [1, 3, 5], channels 64 -> 32 -> 16 (global add: global_dim 16 at
  the 2nd stage, as 128 in 512 -> 256 -> 128 -> 64 -> 32) -> 8 -> 4. Its streaming look-ahead is
  therefore the real configuration's 13 tokens (7798 samples). code_dim / global_dim stay small
  (32 / 16): the engine reads them from model.json where VITA hard-codes 512 / 128, a test-only
  extension;
* the random TTS stops (samples eos) after ~TINY_CODEC_TOKENS_PER_TEXT_TOKEN codec tokens per text
  token, like speech, instead of at an arbitrary step (see `_shape_speech_length`); the engine's stop
  rule is VITA's unchanged (eos or max_tokens).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

from ._errors import require_torch

require_torch(__name__)
import torch  # noqa: E402

__all__ = ["make_tiny_checkpoint", "TINY", "TINY_CODEC_TOKENS_PER_TEXT_TOKEN", "VISION_DIR", "AUDIO_DIR", "tiny_tokenizer",
           "write_safetensors_sharded"]

VISION_DIR = "InternViT-300M-448px"
AUDIO_DIR = "audio-encoder-Qwen2-7B-1107-weight-base-11wh-tunning"

#: spec §10 tiny sizes, except the codec (the real structure at small widths, see the module docstring)
TINY = dict(
    llm=dict(hidden=128, layers=2, heads=4, kv_heads=2, inter=256, vocab=1024, theta=1e6, eps=1e-6),
    vision=dict(image=56, patch=14, hidden=32, layers=2, heads=2, mlp=64, eps=1e-6, max_tiles=2),
    audio=dict(mel=80, ch=32, d=32, layers=2, heads=2, ff=64, adapter=64, kernel=5),
    tts=dict(hidden=32, heads=2, inter=64, blocks=2, odim=64, topk=2),
    codec=dict(code_dim=32, global_dim=16, n_codes=64, n_code_groups=1, residul_layer=1, global_code_num=2,
               global_tokens=[3, 7], upsample_initial_channel=64, upsample_rates=[8, 5, 5, 3],
               upsample_kernel_sizes=[16, 11, 11, 5], resblock="1", resblock_kernel_sizes=[3, 7, 11],
               resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]]),
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """You are an AI robot and your name is VITA. You are a multimodal large language model developed by
the open source community. Your aim is to be helpful, honest and harmless. You support the ability to
communicate fluently and answer user questions in multiple languages of the user's choice. If the user
corrects the wrong answer you generated, you will apologize and discuss the correct answer with the user.
You must answer the question strictly according to the content of the image given by the user. Please note
that you are seeing the image, not the video. Hello, how are you today? What is in this picture? The quick
brown fox jumps over the lazy dog. Tell me a story about a cat and a dog who live in a small house near the
river. The weather is nice and the sun is shining. Can you describe what you hear? I think the answer is
yes, but let me check again. Thank you very much for your help! Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2025.
system user assistant image audio video speech music voice camera window table chair water light sound.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE (like Qwen2's) trained on a little English text, with the chat specials
    appended: returns (tokenizers.Tokenizer, {special: id})."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 64, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False, min_frequency=1)
    lines = [l for l in _CORPUS.splitlines() if l] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    if max(ids.values()) >= vocab_size:
        raise RuntimeError(f"tiny tokenizer exceeds {vocab_size} ids")
    return tok, ids


def _lin(g, out_f, in_f, dtype=torch.float32):
    return (torch.randn(out_f, in_f, generator=g) * in_f ** -0.5).to(dtype)


def _vec(g, n, scale=0.02, base=0.0):
    return base + torch.randn(n, generator=g) * scale


def _norm(g, n):
    return _vec(g, n, 0.1, 1.0)


def _decoder_layer(g, t, p, hidden, heads, kv, hd, inter, bias):
    a, m = p + "self_attn.", p + "mlp."
    t[a + "q_proj.weight"] = _lin(g, heads * hd, hidden)
    t[a + "k_proj.weight"] = _lin(g, kv * hd, hidden)
    t[a + "v_proj.weight"] = _lin(g, kv * hd, hidden)
    if bias:
        t[a + "q_proj.bias"] = _vec(g, heads * hd, 0.1)
        t[a + "k_proj.bias"] = _vec(g, kv * hd, 0.1)
        t[a + "v_proj.bias"] = _vec(g, kv * hd, 0.1)
    t[a + "o_proj.weight"] = _lin(g, hidden, heads * hd)
    t[m + "gate_proj.weight"] = _lin(g, inter, hidden)
    t[m + "up_proj.weight"] = _lin(g, inter, hidden)
    t[m + "down_proj.weight"] = _lin(g, hidden, inter)
    t[p + "input_layernorm.weight"] = _norm(g, hidden)
    t[p + "post_attention_layernorm.weight"] = _norm(g, hidden)


def write_safetensors_sharded(tensors: Dict[str, torch.Tensor], d: Path, shards: int = 2, index: bool = True,
                              prefix: str = "model") -> None:
    """HF `save_pretrained` layout: model-0000i-of-0000n.safetensors (+ model.safetensors.index.json)."""
    from safetensors.torch import save_file

    keys = list(tensors)
    n = max(1, shards)
    per = (len(keys) + n - 1) // n
    wm, total = {}, 0
    for s in range(n):
        part = keys[s * per : (s + 1) * per]
        fn = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{s + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(d / fn), metadata={"format": "pt"})
        for k in part:
            wm[k] = fn
            total += tensors[k].numel() * tensors[k].element_size()
    if index:
        (d / f"{prefix}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))


def make_tiny_checkpoint(dir, seed: int = 0, *, dtype: torch.dtype = torch.float32, shards: int = 2,
                         index: bool = True, cmvn_in_safetensors: bool = True, cmvn_json: bool = False,
                         vocab_rows: Optional[int] = None, tts_wrap_model: bool = False) -> Path:
    """Write a tiny random VITA-1.5 checkpoint (spec §10 sizes, real codec structure) into `dir` and return its path.

    Layout (as the real one): config.json, generation_config.json, tokenizer files, sharded
    model-*.safetensors (+ index) with LLM + vision tower + projector + audio encoder + adapter,
    InternViT-300M-448px/{config.json, preprocessor_config.json},
    audio-encoder-.../{train.yaml, global_cmvn}, vita_tts_ckpt/{decoder,codec}/{model.json, final.pt}.
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    L, Vc, A, Tc, Cc = TINY["llm"], TINY["vision"], TINY["audio"], TINY["tts"], TINY["codec"]
    H = L["hidden"]
    V = vocab_rows or L["vocab"]

    # ---- tokenizer -----------------------------------------------------------------------------
    tok, sp = tiny_tokenizer(L["vocab"])
    tok.save(str(d / "tokenizer.json"))
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
             for s, i in sp.items()}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False}, indent=2))
    (d / "generation_config.json").write_text(json.dumps({
        "bos_token_id": sp["<|endoftext|>"], "eos_token_id": [sp["<|im_end|>"], sp["<|endoftext|>"]],
        "pad_token_id": sp["<|endoftext|>"], "do_sample": False}, indent=2))

    # ---- config.json ---------------------------------------------------------------------------
    cfg = {
        "architectures": ["VITAQwen2ForCausalLM"], "model_type": "vita-Qwen2",
        "hidden_size": H, "num_hidden_layers": L["layers"], "num_attention_heads": L["heads"],
        "num_key_value_heads": L["kv_heads"], "intermediate_size": L["inter"], "vocab_size": L["vocab"],
        "hidden_act": "silu", "rope_theta": L["theta"], "rms_norm_eps": L["eps"], "max_position_embeddings": 4096,
        "max_window_layers": L["layers"], "use_sliding_window": False, "sliding_window": 4096,
        "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": sp["<|endoftext|>"], "eos_token_id": sp["<|im_end|>"],
        "torch_dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
        # the released configs hold paths from the authors' machines (spec §11.9)
        "mm_vision_tower": f"/mnt/cfs/lhj/model_weights/{VISION_DIR}",
        "mm_audio_encoder": f"/mnt/cfs/lhj/model_weights/{AUDIO_DIR}",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": Vc["hidden"] * 4, "image_aspect_ratio": "square",
        "tokenizer_model_max_length": 4600, "tokenizer_padding_side": "right",
        "freeze_audio_encoder": True, "freeze_audio_encoder_adapter": True, "max_dynamic_patch": Vc["max_tiles"],
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))

    t: Dict[str, torch.Tensor] = {}
    # ---- LLM -----------------------------------------------------------------------------------
    t["model.embed_tokens.weight"] = torch.randn(V, H, generator=g) * 0.5
    _mark_text_rows(t["model.embed_tokens.weight"], Tc["hidden"])
    hd = H // L["heads"]
    for i in range(L["layers"]):
        _decoder_layer(g, t, f"model.layers.{i}.", H, L["heads"], L["kv_heads"], hd, L["inter"], True)
    t["model.norm.weight"] = _norm(g, H)
    t["lm_head.weight"] = _lin(g, V, H)

    # ---- vision tower + projector ----------------------------------------------------------------
    C, S, P = Vc["hidden"], Vc["image"], Vc["patch"]
    gp = S // P
    vp = "model.vision_tower.vision_tower."
    t[vp + "embeddings.class_embedding"] = torch.randn(1, 1, C, generator=g)
    t[vp + "embeddings.patch_embedding.weight"] = torch.randn(C, 3, P, P, generator=g) * (3 * P * P) ** -0.5
    t[vp + "embeddings.patch_embedding.bias"] = _vec(g, C, 0.1)
    t[vp + "embeddings.position_embedding"] = torch.randn(1, gp * gp + 1, C, generator=g) * 0.5
    for i in range(Vc["layers"]):
        q = f"{vp}encoder.layers.{i}."
        t[q + "attn.qkv.weight"] = _lin(g, 3 * C, C)
        t[q + "attn.qkv.bias"] = _vec(g, 3 * C, 0.1)
        t[q + "attn.proj.weight"] = _lin(g, C, C)
        t[q + "attn.proj.bias"] = _vec(g, C, 0.1)
        t[q + "mlp.fc1.weight"] = _lin(g, Vc["mlp"], C)
        t[q + "mlp.fc1.bias"] = _vec(g, Vc["mlp"], 0.1)
        t[q + "mlp.fc2.weight"] = _lin(g, C, Vc["mlp"])
        t[q + "mlp.fc2.bias"] = _vec(g, C, 0.1)
        for n in ("norm1", "norm2"):
            t[q + n + ".weight"] = _norm(g, C)
            t[q + n + ".bias"] = _vec(g, C, 0.1)
        t[q + "ls1"] = _vec(g, C, 0.1, 0.5)
        t[q + "ls2"] = _vec(g, C, 0.1, 0.5)
    t["model.mm_projector.0.weight"] = _lin(g, H, 4 * C)
    t["model.mm_projector.0.bias"] = _vec(g, H, 0.1)
    t["model.mm_projector.2.weight"] = _lin(g, H, H)
    t["model.mm_projector.2.bias"] = _vec(g, H, 0.1)

    # ---- audio encoder + adapter ---------------------------------------------------------------
    ep = "model.audio_encoder.encoder."
    ch, ad, ff, nb = A["ch"], A["d"], A["ff"], A["mel"]
    fsub = ((nb - 1) // 2 - 1) // 2
    cmvn_mean = 10.0 + torch.randn(nb, generator=g)
    cmvn_istd = 0.3 + 0.05 * torch.rand(nb, generator=g)
    if cmvn_in_safetensors:
        t[ep + "global_cmvn.mean"] = cmvn_mean.clone()
        t[ep + "global_cmvn.istd"] = cmvn_istd.clone()
    t[ep + "enc.0.core.conv.0.weight"] = torch.randn(ch, 1, 3, 3, generator=g) / 3
    t[ep + "enc.0.core.conv.0.bias"] = _vec(g, ch, 0.1)
    t[ep + "enc.0.core.conv.2.weight"] = torch.randn(ch, ch, 3, 3, generator=g) / (3 * ch ** 0.5)
    t[ep + "enc.0.core.conv.2.bias"] = _vec(g, ch, 0.1)
    t[ep + "enc.0.core.out.0.weight"] = _lin(g, ad, ch * fsub)
    t[ep + "enc.0.core.out.0.bias"] = _vec(g, ad, 0.1)
    t[ep + "enc.1.embed.0.weight"] = _lin(g, ad, ad)
    t[ep + "enc.1.embed.0.bias"] = _vec(g, ad, 0.1)
    t[ep + "enc.1.embed.1.weight"] = _norm(g, ad)
    t[ep + "enc.1.embed.1.bias"] = _vec(g, ad, 0.1)
    dk = ad // A["heads"]
    for i in range(A["layers"]):
        p = f"{ep}enc.1.encoders.{i}."
        for n in ("linear_q", "linear_k", "linear_v", "linear_out"):
            t[p + f"self_attn.{n}.weight"] = _lin(g, ad, ad)
            t[p + f"self_attn.{n}.bias"] = _vec(g, ad, 0.1)
        t[p + "self_attn.linear_pos.weight"] = _lin(g, ad, ad)
        t[p + "self_attn.pos_bias_u"] = torch.randn(A["heads"], dk, generator=g) * 0.3
        t[p + "self_attn.pos_bias_v"] = torch.randn(A["heads"], dk, generator=g) * 0.3
        t[p + "feed_forward.w_1.weight"] = _lin(g, ff, ad)
        t[p + "feed_forward.w_1.bias"] = _vec(g, ff, 0.1)
        t[p + "feed_forward.w_2.weight"] = _lin(g, ad, ff)
        t[p + "feed_forward.w_2.bias"] = _vec(g, ad, 0.1)
        for n in ("norm1", "norm2"):
            t[p + n + ".weight"] = _norm(g, ad)
            t[p + n + ".bias"] = _vec(g, ad, 0.1)
    t[ep + "enc.1.after_norm.weight"] = _norm(g, ad)
    t[ep + "enc.1.after_norm.bias"] = _vec(g, ad, 0.1)
    ap = "model.audio_encoder.adpter."
    t[ap + "conv1d2.weight"] = torch.randn(A["adapter"], ad, A["kernel"], generator=g) * (ad * A["kernel"]) ** -0.5
    t[ap + "conv1d2.bias"] = _vec(g, A["adapter"], 0.1)
    t[ap + "bn2.weight"] = _norm(g, A["adapter"])
    t[ap + "bn2.bias"] = _vec(g, A["adapter"], 0.1)
    t[ap + "project.weight"] = _lin(g, H, A["adapter"])
    t[ap + "project.bias"] = _vec(g, H, 0.1)

    write_safetensors_sharded({k: v.to(dtype) for k, v in t.items()}, d, shards=shards, index=index)

    # ---- vision-tower folder -------------------------------------------------------------------
    vd = d / VISION_DIR
    vd.mkdir(exist_ok=True)
    (vd / "config.json").write_text(json.dumps({
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": C, "image_size": S,
        "patch_size": P, "num_hidden_layers": Vc["layers"], "num_attention_heads": Vc["heads"],
        "intermediate_size": Vc["mlp"], "hidden_act": "gelu", "layer_norm_eps": Vc["eps"], "norm_type": "layer_norm",
        "qkv_bias": True, "qk_normalization": False, "num_channels": 3, "drop_path_rate": 0.0, "dropout": 0.0,
        "attention_dropout": 0.0, "initializer_factor": 0.1, "initializer_range": 1e-10, "use_flash_attn": False}, indent=2))
    (vd / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": S, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": S}, indent=2))

    # ---- audio-encoder folder ------------------------------------------------------------------
    aud = d / AUDIO_DIR
    aud.mkdir(exist_ok=True)
    (aud / "train.yaml").write_text(_train_yaml(A, nb, fsub, cmvn_json))
    count = 1000.0
    sums = (cmvn_mean.double() * count).tolist()
    var = (1.0 / cmvn_istd.double() ** 2)
    sumsq = ((var + cmvn_mean.double() ** 2) * count).tolist()
    if cmvn_json:
        (aud / "global_cmvn").write_text(json.dumps({"mean_stat": sums, "var_stat": sumsq, "frame_num": count}))
    else:
        (aud / "global_cmvn").write_text(" [\n  " + " ".join(repr(x) for x in sums) + f" {count!r}\n  "
                                         + " ".join(repr(x) for x in sumsq) + " 0 ]\n")

    # ---- TTS decoder -----------------------------------------------------------------------------
    dd = d / "vita_tts_ckpt" / "decoder"
    dd.mkdir(parents=True, exist_ok=True)
    th, V4 = Tc["hidden"], Tc["odim"] + 4
    (dd / "model.json").write_text(json.dumps([th, Tc["odim"], {
        "transformer_attention_dim": th, "transformer_linear_units": Tc["inter"], "transformer_num_blocks": Tc["blocks"],
        "transformer_attention_heads": Tc["heads"], "transformer_dropout_rate": 0.1, "encoder_output_dim": th,
        "decoder_topk": Tc["topk"], "kv_cache_prefix_finetune": 0, "do_cross_attention": False,
        "transformer_concat_after": False, "encoder_pre_norm_type": "ln"}], indent=2))
    td: Dict[str, torch.Tensor] = {"embedding.weight": torch.randn(V4, th, generator=g)}
    thd = th // Tc["heads"]
    for i in range(Tc["blocks"] // 2):
        _decoder_layer(g, td, f"layers_pre_nn.{i}.", th, Tc["heads"], Tc["heads"], thd, Tc["inter"], False)
    for i in range(Tc["blocks"]):
        _decoder_layer(g, td, f"layers.{i}.", th, Tc["heads"], Tc["heads"], thd, Tc["inter"], False)
    td["norm.weight"] = _norm(g, th)
    td["out_fnn.weight"] = _lin(g, V4, th)
    td["out_fnn.bias"] = _vec(g, V4, 0.1)
    _shape_speech_length(td, Tc)
    td = {k: v.to(dtype) for k, v in td.items()}
    torch.save({"model": td} if tts_wrap_model else td, str(dd / "final.pt"))

    # ---- codec -----------------------------------------------------------------------------------
    cd = d / "vita_tts_ckpt" / "codec"
    cd.mkdir(parents=True, exist_ok=True)
    (cd / "model.json").write_text(json.dumps({**{k: Cc[k] for k in Cc}, "sampling_rate": 24000,
                                               "num_mels": 80, "n_fft": 1024, "hop_size": math.prod(Cc["upsample_rates"])}, indent=2))
    torch.save(_tiny_codec(g, Cc, dtype), str(cd / "final.pt"))
    return d


# ---- speech length of the random TTS ---------------------------------------------------------------
# With plain random weights the AR decoder samples eos (id V+2) at an arbitrary step: the answer is a
# click, or never ends before the cap. The engine stops a segment as VITA's decoder does (eos, or
# max_tokens), so the tiny weights carry a small circuit that samples eos once about
# TINY_CODEC_TOKENS_PER_TEXT_TOKEN codec tokens per text token have been emitted (real speech: ~40
# codec tokens/s at ~3-4 text tokens/s). Everything else in the decoder stays random.
#   * residual channel _MARK: +_TEXT_MARK in every text-embedding piece (the LLM embedding columns
#     j*tts_hidden, so each of the `split` pieces of a row), untouched by the NAR layers; every codec /
#     sos embedding row has it set so that its RMS-normalised value is exactly -_SPEECH_MARK;
#   * AR layer 0, last head: q = k = 0 (uniform causal attention) and one value row reading _MARK:
#     its output is the mean mark over [bos, text prefix, sos, codec so far], positive while the
#     prefix outweighs the speech, negative after; o_proj writes it (x _BALANCE_GAIN) to channel
#     _BALANCE, which nothing else writes and the codec/sos rows leave at 0;
#   * out_fnn's eos row reads -_EOS_GAIN x _BALANCE (bias 0); no other row reads _BALANCE.
# The sign of the mean, hence the stop, does not depend on the RMS normalisation: eos stays out of
# the top-2 while the balance is positive and wins shortly after it turns negative, at
#   n + 1 = (split*N + 1) * mean normalised text mark / _SPEECH_MARK  (~10.5 N for a mark of ~1.6),
# the eos logit needing a small negative balance to enter the top-2 makes it ~12 N.
#: codec tokens per text token the tiny TTS emits (measured 10-14 over seeds 0-4, segments of 4-48 text tokens)
TINY_CODEC_TOKENS_PER_TEXT_TOKEN = 12
_MARK, _BALANCE = 0, 1
_TEXT_MARK, _SPEECH_MARK, _BALANCE_GAIN, _EOS_GAIN = 1.5, 0.6, 2.0, 20.0


def _mark_text_rows(embed: torch.Tensor, tts_hidden: int) -> None:
    for j in range(embed.shape[1] // tts_hidden):
        embed[:, j * tts_hidden + _MARK] = _TEXT_MARK


def _shape_speech_length(td: Dict[str, torch.Tensor], Tc: dict) -> None:
    """The eos circuit described above, written into the random TTS tensors `td` (float32, in place)."""
    h, nh, V = Tc["hidden"], Tc["heads"], Tc["odim"]
    hd = h // nh
    bos, sos, eos = V, V + 1, V + 2
    for i in range(Tc["blocks"] // 2):  # the NAR output keeps the text mark as it came in
        td[f"layers_pre_nn.{i}.self_attn.o_proj.weight"][_MARK] = 0
        td[f"layers_pre_nn.{i}.mlp.down_proj.weight"][_MARK] = 0
    e = td["embedding.weight"]
    e[bos, _MARK] = _TEXT_MARK  # bos opens the prefix
    c = _SPEECH_MARK
    for r in list(range(V)) + [sos]:
        e[r, _BALANCE] = 0
        e[r, _MARK] = 0
        rest = float((e[r] ** 2).sum())  # x0 / rms(x) = -c  <=>  x0 = -c * sqrt(rest / (h - c^2))
        e[r, _MARK] = -c * (rest / (h - c * c)) ** 0.5
    a = "layers.0.self_attn."
    head = slice((nh - 1) * hd, nh * hd)
    col = (nh - 1) * hd  # that head's first value/output component
    td[a + "q_proj.weight"][head] = 0
    td[a + "k_proj.weight"][head] = 0
    td[a + "v_proj.weight"][col] = 0
    td[a + "v_proj.weight"][col, _MARK] = 1.0
    td[a + "o_proj.weight"][:, col] = 0
    for i in range(Tc["blocks"]):
        td[f"layers.{i}.self_attn.o_proj.weight"][_BALANCE] = 0
        td[f"layers.{i}.mlp.down_proj.weight"][_BALANCE] = 0
    td[a + "o_proj.weight"][_BALANCE, col] = _BALANCE_GAIN
    w = td["out_fnn.weight"]
    w[:, _BALANCE] = 0
    w[eos] = 0
    w[eos, _BALANCE] = -_EOS_GAIN
    td["out_fnn.bias"][eos] = 0


def _wn(g, t, p, shape, transpose=False, bias=True):
    """weight-norm pair for a conv of weight shape `shape` (dim 0 = out, or in for ConvTranspose)."""
    fan = shape[1] * shape[2] if not transpose else shape[1] * shape[2]
    v = torch.randn(*shape, generator=g) * fan ** -0.5
    t[p + ".weight_v"] = v
    t[p + ".weight_g"] = (v.reshape(shape[0], -1).norm(dim=1) * (0.8 + 0.4 * torch.rand(shape[0], generator=g))).reshape(shape[0], 1, 1)
    if bias:
        t[p + ".bias"] = torch.randn(shape[1] if transpose else shape[0], generator=g) * 0.02


def _tiny_codec(g, c, dtype):
    gen: Dict[str, torch.Tensor] = {}
    U = c["upsample_initial_channel"]
    _wn(g, gen, "conv_pre", (U, c["code_dim"], 7))
    nk = len(c["resblock_kernel_sizes"])
    for i, (u, k) in enumerate(zip(c["upsample_rates"], c["upsample_kernel_sizes"])):
        cin, cout = U // 2 ** i, U // 2 ** (i + 1)
        _wn(g, gen, f"ups.{i}", (cin, cout, k), transpose=True)
        for j, (kk, dil) in enumerate(zip(c["resblock_kernel_sizes"], c["resblock_dilation_sizes"])):
            for m in range(len(dil)):
                _wn(g, gen, f"resblocks.{i * nk + j}.convs1.{m}", (cout, cout, kk))
                _wn(g, gen, f"resblocks.{i * nk + j}.convs2.{m}", (cout, cout, kk))
    _wn(g, gen, "conv_post", (1, U // 2 ** len(c["upsample_rates"]), 7))
    quant = {"quantizer_modules.0.embedding.weight": torch.randn(c["n_codes"], c["code_dim"] // c["n_code_groups"], generator=g)}
    G = c["global_code_num"]
    for j in range(G):
        quant[f"quantizer_modules_globaltokens.{j}.embedding.weight"] = torch.randn(c["n_codes"], c["global_dim"] // G, generator=g)
    enc: Dict[str, torch.Tensor] = {}
    _wn(g, enc, "conv_pre", (8, 1, 7))
    _wn(g, enc, "conv_post", (c["code_dim"], 8, 3))
    cast = lambda dd: {k: v.to(dtype) for k, v in dd.items()}
    return {"generator": cast(gen), "quantizer": cast(quant), "encoder": cast(enc)}


def _train_yaml(A, nb, fsub, cmvn_json) -> str:
    import yaml

    y = {
        "input_dim": nb,
        "cmvn_file": "global_cmvn",
        "is_json_cmvn": bool(cmvn_json),
        "encoder_conf": {
            "overview_conf": {"encoder-input-dim": nb, "encoder-output-dim": A["d"], "encoder-layer-config": "subsampling-transformer"},
            "para_conf": {
                "subsampling": {"subsampling-rate": 4, "subsampling-input-dim": nb, "subsampling-output-dim": A["d"],
                                "subsampling-dropout-rate": 0.1},
                "transformer": {"transformer-input-dim": A["d"], "transformer-output-dim": A["d"],
                                "transformer-attention-dim": A["d"], "transformer-attention-heads": A["heads"],
                                "transformer-linear-units": A["ff"], "transformer-num-blocks": A["layers"],
                                "transformer-dropout-rate": 0.1, "transformer-attention-dropout-rate": 0.0,
                                "transformer-positional-dropout-rate": 0.1, "transformer-input-layer": "linear",
                                "transformer-pos-enc-class": "rel-enc", "transformer-normalize-before": True,
                                "transformer-concat-after": False, "transformer-positionwise-layer-type": "linear",
                                "transformer-positionwise-conv-kernel-size": 1, "transformer-chunk_size": -1,
                                "transformer-left_chunks": -1, "transformer-dynamic-chunks": False},
            },
        },
        # the keyword arguments of whale's audioEncoder (init_model passes model_conf as **kwargs):
        # adpter_type "subsampling" is the CNNSubsampling adapter these weights belong to
        "model_conf": {"llm_path": "Qwen2.5-7B-Instruct", "adpter_type": "subsampling", "kernel_size": A["kernel"],
                       "norm": "layer", "activation_func": "gelu", "llm_embed_dim": TINY["llm"]["hidden"],
                       "enc_out_dim": A["d"]},
        "dataset_conf": {"resample_conf": {"resample_rate": 16000},
                         "fbank_conf": {"num_mel_bins": nb, "frame_shift": 10, "frame_length": 25, "dither": 0.0}},
    }
    return yaml.safe_dump(y, sort_keys=False)

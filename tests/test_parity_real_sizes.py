"""Every non-codec component at its REAL VITA-1.5 widths, against independent float64 references
written here from VITA's own forward code (DESIGN §5: <= 1e-4 relative in float32).

One checkpoint folder in the released layout (bf16 main safetensors with the `model.*` names, the
InternViT and audio-encoder sub-folders, `vita_tts_ckpt/decoder/{model.json, final.pt}`) is loaded
once through `VitaModel.from_pretrained`, so weight naming, dtype conversion and the sub-model
configs are covered too. Real widths, heads and kernels everywhere; fewer layers where depth adds
nothing: LLM 1 Qwen2 layer (3584 / 28 q heads / 4 kv heads / 18944, vocab 512), InternViT 1 layer
(1024 / 16 heads / 4096, 448x448, pixel shuffle + 4096 -> 3584 projector), audio encoder 2 layers
(80 mels, 1024 conv channels, 1024 / 16 heads / 4096, adapter 2048 -> 3584), TTS decoder
num_blocks 2 (NAR 1, AR 2) at 896 / 14 heads / 4864 with 1024 + 4 codes.

The references read only the stored (bf16-rounded) tensors, upcast to float64, and follow:
  audio  whale/module/component/{subsampling,transformer}.py, layer/attention.py, adapter.py::CNNSubsampling
  vision internvit/modeling_intern_vit.py, internvit_encoder.py::pixel_shuffle, projector builder (mlp2x_gelu)
  LLM    transformers 4.44 Qwen2 (VITAQwen2ForCausalLM), vita_arch.py::prepare_inputs_labels_for_multimodal
  TTS    vita_tts/decoder/decoder.py::LLM2TTSCodecAR.{pre_nn_forward, infer} (LlamaDecoderLayer, eager)
"""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vita_engine.model.audio import AE_PREFIX, AudioEncoder, kaldi_fbank
from vita_engine.model.vita import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX, VitaModel
from vita_engine.testing import AUDIO_DIR, VISION_DIR, write_safetensors_sharded

TOL = 1e-4
LLM = dict(hidden=3584, heads=28, kv=4, inter=18944, vocab=512, layers=1, theta=1e6, eps=1e-6)
VIS = dict(hidden=1024, heads=16, mlp=4096, layers=1, image=448, patch=14, eps=1e-6)
AUD = dict(mel=80, ch=1024, d=1024, heads=16, ff=4096, layers=2, kernel=5)
TTS = dict(hidden=896, heads=14, inter=4864, blocks=2, odim=1024)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    return float((out - ref).abs().max() / ref.abs().max())


# ---- the checkpoint ------------------------------------------------------------------------------

def _rand(g, *shape, scale=1.0, base=0.0):
    # one normal_ pass + one cast: ~330M parameters, so the generator's speed is most of the setup
    return torch.empty(*shape).normal_(base, scale, generator=g).to(torch.bfloat16)


def _lin(g, out_f, in_f):
    return _rand(g, out_f, in_f, scale=in_f ** -0.5)


def _llama_layer(g, t, p, hidden, heads, kv, hd, inter, bias):
    a, m = p + "self_attn.", p + "mlp."
    t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"] = (
        _lin(g, heads * hd, hidden), _lin(g, kv * hd, hidden), _lin(g, kv * hd, hidden))
    if bias:
        t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"] = (
            _rand(g, heads * hd, scale=0.5), _rand(g, kv * hd, scale=0.5), _rand(g, kv * hd, scale=0.5))
    t[a + "o_proj.weight"] = _lin(g, hidden, heads * hd)
    t[m + "gate_proj.weight"], t[m + "up_proj.weight"] = _lin(g, inter, hidden), _lin(g, inter, hidden)
    t[m + "down_proj.weight"] = _lin(g, hidden, inter)
    t[p + "input_layernorm.weight"] = _rand(g, hidden, scale=0.1, base=1.0)
    t[p + "post_attention_layernorm.weight"] = _rand(g, hidden, scale=0.1, base=1.0)


def _train_yaml():
    import yaml

    d = AUD["d"]
    return yaml.safe_dump({
        "input_dim": AUD["mel"], "cmvn_file": "global_cmvn", "is_json_cmvn": True,
        "encoder_conf": {
            "overview_conf": {"encoder-input-dim": AUD["mel"], "encoder-output-dim": d, "encoder-layer-config": "subsampling-transformer"},
            "para_conf": {
                "subsampling": {"subsampling-rate": 4, "subsampling-input-dim": AUD["mel"], "subsampling-output-dim": d},
                "transformer": {"transformer-input-dim": d, "transformer-output-dim": d, "transformer-attention-dim": d,
                                "transformer-attention-heads": AUD["heads"], "transformer-linear-units": AUD["ff"],
                                "transformer-num-blocks": AUD["layers"], "transformer-input-layer": "linear",
                                "transformer-pos-enc-class": "rel-enc", "transformer-normalize-before": True,
                                "transformer-concat-after": False, "transformer-positionwise-layer-type": "linear",
                                "transformer-chunk_size": -1, "transformer-left_chunks": -1,
                                "transformer-dynamic-chunks": False}}},
        "model_conf": {"llm_path": "Qwen2.5-7B-Instruct", "adpter_type": "subsampling", "kernel_size": AUD["kernel"],
                       "norm": "layer", "activation_func": "gelu", "enc_out_dim": d, "llm_embed_dim": LLM["hidden"]},
        "dataset_conf": {"resample_conf": {"resample_rate": 16000},
                         "fbank_conf": {"num_mel_bins": AUD["mel"], "frame_shift": 10, "frame_length": 25, "dither": 0.1}},
    })


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("vita_real_widths")
    g = torch.Generator().manual_seed(11)
    H, t = LLM["hidden"], {}
    t["model.embed_tokens.weight"] = _rand(g, LLM["vocab"], H, scale=0.5)
    _llama_layer(g, t, "model.layers.0.", H, LLM["heads"], LLM["kv"], H // LLM["heads"], LLM["inter"], True)
    t["model.norm.weight"] = _rand(g, H, scale=0.1, base=1.0)
    t["lm_head.weight"] = _lin(g, LLM["vocab"], H)

    C, vp = VIS["hidden"], "model.vision_tower.vision_tower."
    grid = VIS["image"] // VIS["patch"]
    t[vp + "embeddings.class_embedding"] = _rand(g, 1, 1, C)
    t[vp + "embeddings.patch_embedding.weight"] = _rand(g, C, 3, 14, 14, scale=(3 * 14 * 14) ** -0.5)
    t[vp + "embeddings.patch_embedding.bias"] = _rand(g, C, scale=0.1)
    t[vp + "embeddings.position_embedding"] = _rand(g, 1, grid * grid + 1, C, scale=0.5)
    for i in range(VIS["layers"]):
        q = f"{vp}encoder.layers.{i}."
        t[q + "attn.qkv.weight"], t[q + "attn.qkv.bias"] = _lin(g, 3 * C, C), _rand(g, 3 * C, scale=0.1)
        t[q + "attn.proj.weight"], t[q + "attn.proj.bias"] = _lin(g, C, C), _rand(g, C, scale=0.1)
        t[q + "mlp.fc1.weight"], t[q + "mlp.fc1.bias"] = _lin(g, VIS["mlp"], C), _rand(g, VIS["mlp"], scale=0.1)
        t[q + "mlp.fc2.weight"], t[q + "mlp.fc2.bias"] = _lin(g, C, VIS["mlp"]), _rand(g, C, scale=0.1)
        for n in ("norm1", "norm2"):
            t[q + n + ".weight"], t[q + n + ".bias"] = _rand(g, C, scale=0.1, base=1.0), _rand(g, C, scale=0.1)
        t[q + "ls1"], t[q + "ls2"] = _rand(g, C, scale=0.1, base=0.5), _rand(g, C, scale=0.1, base=0.5)
    t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"] = _lin(g, H, 4 * C), _rand(g, H, scale=0.1)
    t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"] = _lin(g, H, H), _rand(g, H, scale=0.1)

    ep, ch, ad, ff = AE_PREFIX + "encoder.", AUD["ch"], AUD["d"], AUD["ff"]
    fsub = ((AUD["mel"] - 1) // 2 - 1) // 2
    t[ep + "global_cmvn.mean"] = _rand(g, AUD["mel"], base=10.0)
    t[ep + "global_cmvn.istd"] = (0.3 + 0.05 * torch.rand(AUD["mel"], generator=g)).to(torch.bfloat16)
    t[ep + "enc.0.core.conv.0.weight"], t[ep + "enc.0.core.conv.0.bias"] = _rand(g, ch, 1, 3, 3, scale=1 / 3), _rand(g, ch, scale=0.1)
    t[ep + "enc.0.core.conv.2.weight"] = _rand(g, ch, ch, 3, 3, scale=(9 * ch) ** -0.5)
    t[ep + "enc.0.core.conv.2.bias"] = _rand(g, ch, scale=0.1)
    t[ep + "enc.0.core.out.0.weight"], t[ep + "enc.0.core.out.0.bias"] = _lin(g, ad, ch * fsub), _rand(g, ad, scale=0.1)
    t[ep + "enc.1.embed.0.weight"], t[ep + "enc.1.embed.0.bias"] = _lin(g, ad, ad), _rand(g, ad, scale=0.1)
    t[ep + "enc.1.embed.1.weight"], t[ep + "enc.1.embed.1.bias"] = _rand(g, ad, scale=0.1, base=1.0), _rand(g, ad, scale=0.1)
    dk = ad // AUD["heads"]
    for i in range(AUD["layers"]):
        p = f"{ep}enc.1.encoders.{i}.self_attn."
        for n in ("linear_q", "linear_k", "linear_v", "linear_out"):
            t[p + n + ".weight"], t[p + n + ".bias"] = _lin(g, ad, ad), _rand(g, ad, scale=0.1)
        t[p + "linear_pos.weight"] = _lin(g, ad, ad)
        # strong position biases: the bd term (q + v)·p must matter for the test to see it
        t[p + "pos_bias_u"], t[p + "pos_bias_v"] = _rand(g, AUD["heads"], dk, scale=2.0), _rand(g, AUD["heads"], dk, scale=2.0)
        p = f"{ep}enc.1.encoders.{i}."
        t[p + "feed_forward.w_1.weight"], t[p + "feed_forward.w_1.bias"] = _lin(g, ff, ad), _rand(g, ff, scale=0.1)
        t[p + "feed_forward.w_2.weight"], t[p + "feed_forward.w_2.bias"] = _lin(g, ad, ff), _rand(g, ad, scale=0.1)
        for n in ("norm1", "norm2"):
            t[p + n + ".weight"], t[p + n + ".bias"] = _rand(g, ad, scale=0.1, base=1.0), _rand(g, ad, scale=0.1)
    t[ep + "enc.1.after_norm.weight"], t[ep + "enc.1.after_norm.bias"] = _rand(g, ad, scale=0.1, base=1.0), _rand(g, ad, scale=0.1)
    apf = AE_PREFIX + "adpter."
    t[apf + "conv1d2.weight"] = _rand(g, 2 * ad, ad, AUD["kernel"], scale=(ad * AUD["kernel"]) ** -0.5)
    t[apf + "conv1d2.bias"] = _rand(g, 2 * ad, scale=0.1)
    t[apf + "bn2.weight"], t[apf + "bn2.bias"] = _rand(g, 2 * ad, scale=0.1, base=1.0), _rand(g, 2 * ad, scale=0.1)
    t[apf + "project.weight"], t[apf + "project.bias"] = _lin(g, H, 2 * ad), _rand(g, H, scale=0.1)
    write_safetensors_sharded(t, d, shards=3)

    (d / "config.json").write_text(json.dumps({
        "architectures": ["VITAQwen2ForCausalLM"], "model_type": "vita-Qwen2", "hidden_size": H,
        "num_hidden_layers": LLM["layers"], "num_attention_heads": LLM["heads"], "num_key_value_heads": LLM["kv"],
        "intermediate_size": LLM["inter"], "vocab_size": LLM["vocab"], "hidden_act": "silu", "rope_theta": LLM["theta"],
        "rms_norm_eps": LLM["eps"], "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "mm_vision_tower": f"/mnt/cfs/lhj/model_weights/{VISION_DIR}", "mm_audio_encoder": AUDIO_DIR,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 4 * C, "image_aspect_ratio": "square",
        "max_dynamic_patch": 12, "use_thumbnail": True}))
    vd = d / VISION_DIR
    vd.mkdir()
    (vd / "config.json").write_text(json.dumps({
        "architectures": ["InternVisionModel"], "hidden_size": C, "image_size": VIS["image"], "patch_size": VIS["patch"],
        "num_hidden_layers": VIS["layers"], "num_attention_heads": VIS["heads"], "intermediate_size": VIS["mlp"],
        "hidden_act": "gelu", "layer_norm_eps": VIS["eps"], "norm_type": "layer_norm", "qkv_bias": True,
        "qk_normalization": False, "use_flash_attn": False}))
    (vd / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3, "size": 448,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    aud = d / AUDIO_DIR
    aud.mkdir()
    (aud / "train.yaml").write_text(_train_yaml())
    (aud / "global_cmvn").write_text(json.dumps({"mean_stat": [1.0] * 80, "var_stat": [2.0] * 80, "frame_num": 1.0}))

    dd = d / "vita_tts_ckpt" / "decoder"
    dd.mkdir(parents=True)
    th, V4 = TTS["hidden"], TTS["odim"] + 4
    (dd / "model.json").write_text(json.dumps([th, TTS["odim"], {
        "transformer_attention_dim": th, "transformer_linear_units": TTS["inter"], "transformer_num_blocks": TTS["blocks"],
        "transformer_attention_heads": TTS["heads"], "transformer_dropout_rate": 0.1, "encoder_output_dim": th,
        "decoder_topk": 2, "kv_cache_prefix_finetune": 0, "encoder_criterion": "ce"}]))
    td = {"embedding.weight": _rand(g, V4, th)}
    for i in range(TTS["blocks"] // 2):
        _llama_layer(g, td, f"layers_pre_nn.{i}.", th, TTS["heads"], TTS["heads"], th // TTS["heads"], TTS["inter"], False)
    for i in range(TTS["blocks"]):
        _llama_layer(g, td, f"layers.{i}.", th, TTS["heads"], TTS["heads"], th // TTS["heads"], TTS["inter"], False)
    td["norm.weight"] = _rand(g, th, scale=0.1, base=1.0)
    td["out_fnn.weight"], td["out_fnn.bias"] = _lin(g, V4, th), _rand(g, V4, scale=0.1)
    td = {k: v.float() for k, v in td.items()}  # a training state dict: fp32
    torch.save(td, str(dd / "final.pt"))

    m = VitaModel.from_pretrained(d, dtype=torch.float32, load_codec_model=False)
    return m, t, td


def _w(t, name):
    return t[name].double()


# ---- audio ---------------------------------------------------------------------------------------

def _audio_ref(t, feats, chunk=-1, left=-1):
    """whaleEncoder.forward (CMVN'd input) + CNNSubsampling.forward, float64."""
    ep, ap = AE_PREFIX + "encoder.", AE_PREFIX + "adpter."
    w = lambda n: _w(t, ep + n)
    x = feats.double()[None, None]
    x = F.relu(F.conv2d(x, w("enc.0.core.conv.0.weight"), w("enc.0.core.conv.0.bias"), stride=2))
    x = F.relu(F.conv2d(x, w("enc.0.core.conv.2.weight"), w("enc.0.core.conv.2.bias"), stride=2))
    b, c, T, f = x.size()
    x = F.linear(x.transpose(1, 2).contiguous().view(b, T, c * f), w("enc.0.core.out.0.weight"), w("enc.0.core.out.0.bias"))
    d, Hh = x.shape[-1], AUD["heads"]
    dk = d // Hh
    x = F.relu(F.layer_norm(F.linear(x, w("enc.1.embed.0.weight"), w("enc.1.embed.0.bias")), (d,),
                            w("enc.1.embed.1.weight"), w("enc.1.embed.1.bias"), 1e-5))
    # RelPositionalEncoding: the float32 table of PositionalEncoding, x * sqrt(d), no rel_shift
    pos = torch.arange(0, 5000, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe = torch.zeros(5000, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    pos_emb = pe[None, :T].double()
    x = x * math.sqrt(d)
    # utils.subsequent_chunk_mask (static chunks), else the padding mask only (all valid)
    ok = torch.ones(T, T, dtype=torch.bool)
    if chunk > 0:
        ok = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            start = 0 if left < 0 else max((i // chunk - left) * chunk, 0)
            ok[i, start:min((i // chunk + 1) * chunk, T)] = True
    for li in range(AUD["layers"]):
        p = f"enc.1.encoders.{li}."
        a = p + "self_attn."
        res = x
        h = F.layer_norm(x, (d,), w(p + "norm1.weight"), w(p + "norm1.bias"), 1e-5)
        q = F.linear(h, w(a + "linear_q.weight"), w(a + "linear_q.bias")).view(1, -1, Hh, dk)
        k = F.linear(h, w(a + "linear_k.weight"), w(a + "linear_k.bias")).view(1, -1, Hh, dk).transpose(1, 2)
        v = F.linear(h, w(a + "linear_v.weight"), w(a + "linear_v.bias")).view(1, -1, Hh, dk).transpose(1, 2)
        pp = F.linear(pos_emb, w(a + "linear_pos.weight")).view(1, -1, Hh, dk).transpose(1, 2)
        qu = (q + w(a + "pos_bias_u")).transpose(1, 2)
        qv = (q + w(a + "pos_bias_v")).transpose(1, 2)
        scores = (qu @ k.transpose(-2, -1) + qv @ pp.transpose(-2, -1)) / math.sqrt(dk)
        mask = ~ok[None, None]
        attn = torch.softmax(scores.masked_fill(mask, float(torch.finfo(torch.float16).min)), -1).masked_fill(mask, 0.0)
        o = (attn @ v).transpose(1, 2).contiguous().view(1, -1, d)
        x = res + F.linear(o, w(a + "linear_out.weight"), w(a + "linear_out.bias"))
        h = F.layer_norm(x, (d,), w(p + "norm2.weight"), w(p + "norm2.bias"), 1e-5)
        x = x + F.linear(torch.relu(F.linear(h, w(p + "feed_forward.w_1.weight"), w(p + "feed_forward.w_1.bias"))),
                         w(p + "feed_forward.w_2.weight"), w(p + "feed_forward.w_2.bias"))
    x = F.layer_norm(x, (d,), w("enc.1.after_norm.weight"), w("enc.1.after_norm.bias"), 1e-5)
    y = F.conv1d(F.pad(x.transpose(1, 2), (0, AUD["kernel"] - 1)), _w(t, ap + "conv1d2.weight"), _w(t, ap + "conv1d2.bias"), stride=2)
    y = F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],), _w(t, ap + "bn2.weight"), _w(t, ap + "bn2.bias"), 1e-3))
    return F.linear(y, _w(t, ap + "project.weight"), _w(t, ap + "project.bias"))[0]


def _wave(seconds=1.0, seed=3):
    r = np.random.RandomState(seed)
    n = int(16000 * seconds)
    tt = np.arange(n) / 16000.0
    return (0.2 * np.sin(2 * np.pi * 220 * tt) * np.hanning(n) + 0.05 * r.randn(n)).astype(np.float32)


def _cmvn_feats(t, wave):
    ep = AE_PREFIX + "encoder."
    raw = kaldi_fbank(torch.from_numpy(wave).double() * 32768.0)  # Kaldi fbank: tested in test_model_audio
    return (raw.double() - _w(t, ep + "global_cmvn.mean")) * _w(t, ep + "global_cmvn.istd")


def test_audio_encoder_real_widths(real):
    m, t, _ = real
    assert m.audio.d_model == 1024 and m.audio.num_heads == 16 and m.audio.num_layers == AUD["layers"]
    w = _wave()
    ref = _audio_ref(t, _cmvn_feats(t, w))
    out = m.audio.encode(w)
    assert out.shape == (12, 3584)  # 98 fbank frames -> T1 23 -> 12 LLM tokens
    assert rel(out, ref) < TOL


def test_audio_encoder_static_chunk_mask(real):
    """train.yaml with transformer-dynamic-chunks false and chunk_size > 0: whale's Transformer.forward
    applies subsequent_chunk_mask (deterministic), so the engine must too."""
    m, t, _ = real
    a = m.audio
    feats = _cmvn_feats(t, _wave(seed=5)).float()
    enc = AudioEncoder(replace(a.config, dynamic_chunks=False, chunk_size=4, left_chunks=2), dict(a.t), a.ops,
                       cmvn=(a.cmvn_mean, a.cmvn_istd))
    ref = _audio_ref(t, feats.double(), 4, 2)
    assert rel(a.encode_features(feats), ref) > 1e-3  # the mask matters here
    assert rel(enc.encode_features(feats), ref) < TOL


# ---- vision --------------------------------------------------------------------------------------

def _vision_ref(t, pv):
    """InternVisionModel (naive attention) -> hidden_states[-1][:, 1:] -> InternViTVisionTower.forward
    (x 0.5, pixel_shuffle view/permute) -> mlp2x_gelu projector, float64."""
    vp = "model.vision_tower.vision_tower."
    w = lambda n: _w(t, vp + n)
    C, Hh = VIS["hidden"], VIS["heads"]
    x = pv.double()
    pe = F.conv2d(x, w("embeddings.patch_embedding.weight"), w("embeddings.patch_embedding.bias"), stride=VIS["patch"])
    B, _, hh, ww = pe.shape
    pe = pe.flatten(2).transpose(1, 2)
    emb = torch.cat([w("embeddings.class_embedding").expand(B, 1, -1), pe], 1)
    pos = w("embeddings.position_embedding")
    g0 = VIS["image"] // VIS["patch"]
    grid = pos[:, 1:].float().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)  # _get_pos_embed: always interpolated
    grid = F.interpolate(grid, size=(hh, ww), mode="bicubic", align_corners=False).reshape(1, -1, hh * ww).permute(0, 2, 1)
    x = emb + torch.cat([pos[:, :1], grid.double()], 1)
    for i in range(VIS["layers"]):
        q = f"encoder.layers.{i}."
        h = F.layer_norm(x, (C,), w(q + "norm1.weight"), w(q + "norm1.bias"), VIS["eps"])
        N = h.shape[1]
        qkv = F.linear(h, w(q + "attn.qkv.weight"), w(q + "attn.qkv.bias")).reshape(B, N, 3, Hh, C // Hh).permute(2, 0, 3, 1, 4)
        qq, kk, vv = qkv.unbind(0)
        attn = ((qq * (C // Hh) ** -0.5) @ kk.transpose(-2, -1)).softmax(-1)
        o = F.linear((attn @ vv).transpose(1, 2).reshape(B, N, C), w(q + "attn.proj.weight"), w(q + "attn.proj.bias"))
        x = x + o * w(q + "ls1")
        h = F.layer_norm(x, (C,), w(q + "norm2.weight"), w(q + "norm2.bias"), VIS["eps"])
        x = x + F.linear(F.gelu(F.linear(h, w(q + "mlp.fc1.weight"), w(q + "mlp.fc1.bias"))), w(q + "mlp.fc2.weight"),
                         w(q + "mlp.fc2.bias")) * w(q + "ls2")
    f = x[:, 1:]
    s = int(f.shape[1] ** 0.5)
    f = f.reshape(B, s, s, -1) * 0.5
    n, W, Hs, c = f.size()  # InternViTVisionTower.pixel_shuffle, scale 0.5
    f = f.view(n, W, Hs // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    f = f.view(n, Hs // 2, W // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    f = f.reshape(B, -1, f.shape[-1])
    f = F.gelu(F.linear(f, _w(t, "model.mm_projector.0.weight"), _w(t, "model.mm_projector.0.bias")))
    return F.linear(f, _w(t, "model.mm_projector.2.weight"), _w(t, "model.mm_projector.2.bias"))


def test_vision_tower_real_widths(real):
    m, t, _ = real
    pv = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(4)).clamp(-2.5, 2.5)
    ref = _vision_ref(t, pv)
    out = m.vision.encode(pv)
    assert out.shape == (1, 256, 3584)
    assert rel(out, ref) < TOL


def _clip_reference(img, S=448, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """transformers CLIPImageProcessor semantics (size {shortest_edge: S}, crop S, resample bicubic):
    get_resize_output_image_size keeps the short edge at S and TRUNCATES the long one, int(S*long/short);
    center_crop takes (dim - S) // 2 from the top/left; rescale 1/255 then (x - mean) / std."""
    from PIL import Image

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    nl = int(S * long / short)
    size = (S, nl) if w <= h else (nl, S)
    a = np.asarray(img.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float64)
    top, lft = (a.shape[0] - S) // 2, (a.shape[1] - S) // 2
    a = a[top:top + S, lft:lft + S] / 255.0
    return torch.from_numpy(((a - np.array(mean)) / np.array(std)).transpose(2, 0, 1))


def test_clip_normalize_truncates_the_long_edge(real):
    """641x479: 448*641/479 = 599.5, CLIPImageProcessor resizes to 599 (int), a rounded 600 shifts
    the centre crop by one column."""
    from PIL import Image

    m = real[0]
    r = np.random.RandomState(2)
    for w, h in ((641, 479), (479, 641), (1001, 447), (449, 449)):
        img = Image.fromarray(r.randint(0, 256, (h, w, 3), dtype=np.uint8))
        out = m.vision.normalize([img])[0]
        assert (out.double() - _clip_reference(img)).abs().max() < 1e-5, (w, h)


# ---- LLM + splicing ------------------------------------------------------------------------------

def _rms(x, wt, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt


def _rope_cos_sin(pos, D, theta):
    """transformers' Llama/Qwen2 rotary embedding: inv_freq and angles in float32, then upcast."""
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    fr = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([fr, fr], -1)
    return emb.cos().double(), emb.sin().double()


def _rot(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def _llama_stack(t, prefix, n_layers, x, pos, allowed, H, KV, theta, eps, bias):
    """LlamaDecoderLayer / Qwen2DecoderLayer (eager): `allowed[i, j]` says whether row i sees key j."""
    T, hid = x.shape
    D = hid // H
    cos, sin = _rope_cos_sin(pos, D, theta)
    for i in range(n_layers):
        p = f"{prefix}{i}."
        a, mm = p + "self_attn.", p + "mlp."
        h = _rms(x, _w(t, p + "input_layernorm.weight"), eps)
        b = (lambda n: _w(t, a + n + "_proj.bias")) if bias else (lambda n: None)
        q = F.linear(h, _w(t, a + "q_proj.weight"), b("q")).view(T, H, D)
        k = F.linear(h, _w(t, a + "k_proj.weight"), b("k")).view(T, KV, D)
        v = F.linear(h, _w(t, a + "v_proj.weight"), b("v")).view(T, KV, D)
        q, k = _rot(q, cos, sin), _rot(k, cos, sin)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)  # repeat_kv
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        s = s.masked_fill(~allowed[None], float("-inf"))
        o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(T, H * D)
        x = x + F.linear(o, _w(t, a + "o_proj.weight"))
        h = _rms(x, _w(t, p + "post_attention_layernorm.weight"), eps)
        x = x + F.linear(F.silu(F.linear(h, _w(t, mm + "gate_proj.weight"))) * F.linear(h, _w(t, mm + "up_proj.weight")),
                         _w(t, mm + "down_proj.weight"))
    return x


def _llm_ref(t, embeds):
    T = embeds.shape[0]
    x = _llama_stack(t, "model.layers.", LLM["layers"], embeds.double(), torch.arange(T),
                     torch.ones(T, T, dtype=torch.bool).tril(), LLM["heads"], LLM["kv"], LLM["theta"], LLM["eps"], True)
    return F.linear(_rms(x, _w(t, "model.norm.weight"), LLM["eps"]), _w(t, "lm_head.weight"))


def test_llm_real_widths_full_and_cached(real):
    m, t, _ = real
    ids = torch.randint(0, LLM["vocab"], (20,), generator=torch.Generator().manual_seed(6))
    ref = _llm_ref(t, _w(t, "model.embed_tokens.weight")[ids])
    assert rel(m.llm.logits(ids), ref) < TOL
    cache = m.llm.new_cache(32)
    seq = cache.new_sequence()
    out = [m.llm.forward_cached(seq, m.llm.embed(ids[:16]))]
    out += [m.llm.forward_cached(seq, m.llm.embed(ids[i:i + 1])) for i in range(16, 20)]
    assert rel(torch.cat(out), ref) < TOL
    seq.release()


def test_splice_real_widths(real):
    """prepare_inputs_labels_for_multimodal: text embeddings with each -200 replaced by the next tile's
    [256, 3584] features and each -500 by the next clip's [T_llm, 3584] features, in order."""
    m, t, _ = real
    g = torch.Generator().manual_seed(8)
    tiles = torch.randn(3, 256, 3584, generator=g)
    clip = torch.randn(18, 3584, generator=g)
    ids = [5, 6, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 7, AUDIO_TOKEN_INDEX, 8, 9]
    E = _w(t, "model.embed_tokens.weight")
    ref = torch.cat([E[[5, 6]], tiles[0].double(), tiles[1].double(), tiles[2].double(), E[[7]], clip.double(), E[[8, 9]]])
    out = m.splice(ids, image_features=tiles, audio_features=clip)
    assert out.shape == (5 + 3 * 256 + 18, 3584)
    assert rel(out, ref) < 1e-6


# ---- TTS decoder ---------------------------------------------------------------------------------

def test_tts_decoder_real_widths(real):
    m, t, td = real
    tts = m.tts
    assert (tts.config.hidden, tts.config.num_heads, tts.split, len(tts.nar_layers), len(tts.ar_layers)) == (896, 14, 4, 1, 2)
    text = torch.tensor([3, 77, 150, 4, 511])
    codec = [5, 1000, 17, 17, 250, 0, 1023]
    hid = TTS["hidden"]
    x = _w(t, "model.embed_tokens.weight")[text].reshape(-1, hid)  # input-embedding rows, 3584 -> 4 x 896
    n4 = x.shape[0]
    # pre_nn_forward: all-True mask -> bidirectional, positions 0..4N-1
    nar = _llama_stack(td, "layers_pre_nn.", 1, x, torch.arange(n4), torch.ones(n4, n4, dtype=torch.bool),
                       TTS["heads"], TTS["heads"], 10000.0, 1e-6, False)
    assert rel(tts.nar(text), nar) < TOL
    # infer: [emb(bos), NAR] prefilled with mask None (bidirectional), then sos and each codec token one
    # at a time with a KV cache (each step sees the prefix and the earlier steps)
    E = _w(td, "embedding.weight")
    V = TTS["odim"]
    seq = torch.cat([E[V:V + 1], nar, E[[V + 1] + codec]])
    P, T = n4 + 1, seq.shape[0]
    ok = torch.ones(T, T, dtype=torch.bool)
    ok[:P, P:] = False
    ok[P:, P:] = torch.ones(T - P, T - P, dtype=torch.bool).tril()
    h = _llama_stack(td, "layers.", 2, seq, torch.arange(T), ok, TTS["heads"], TTS["heads"], 10000.0, 1e-6, False)
    ref = F.linear(_rms(h[P:], _w(td, "norm.weight"), 1e-6), _w(td, "out_fnn.weight"), _w(td, "out_fnn.bias"))
    assert rel(tts.ar_logits(text, codec), ref) < TOL
    # the batched decoder's logits (what it samples from) over the same rows
    from vita_engine.model.tts_batch import TTSBatchDecoder

    dec = TTSBatchDecoder(tts, max_streams=1, max_tokens=4)
    hb = tts._stack(tts.ar_layers, seq.float(), torch.arange(T),
                    lambda i, q, k, v: _masked_attn(q, k, v, ok))
    lb = dec.logits(hb[P:])
    keep = torch.ones(V + 4, dtype=torch.bool)
    keep[[V, V + 1, V + 3]] = False  # bos / sos / pad are masked out of sampling
    assert rel(lb[:, keep], ref[:, keep]) < TOL and torch.isinf(lb[:, ~keep]).all()


def _masked_attn(q, k, v, ok):
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~ok[None], float("-inf")).softmax(-1), v.double()).to(q.dtype)

"""Checkpoint layout round trip and clear errors for broken checkpoints."""
import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open

from vita_engine.model.loading import CheckpointError


def _load(d, **kw):
    from vita_engine import VitaModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VitaModel.from_pretrained(d, **kw)


def _all_tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_round_trip_every_tensor_lands(tiny_ckpt, tiny_model):
    m, t = tiny_model, _all_tensors(tiny_ckpt)
    eq = lambda a, b: torch.equal(a, b)
    assert eq(m.llm.embed_tokens, t["model.embed_tokens.weight"]) and eq(m.llm.lm_head, t["lm_head.weight"])
    assert eq(m.llm.norm, t["model.norm.weight"])
    for i, L in enumerate(m.llm.layers):
        p = f"model.layers.{i}."
        assert eq(L.qkv_w, torch.cat([t[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
        assert eq(L.qkv_b, torch.cat([t[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
        assert eq(L.o_w, t[p + "self_attn.o_proj.weight"])
        assert eq(L.gate_up_w, torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]))
        assert eq(L.down_w, t[p + "mlp.down_proj.weight"])
        assert eq(L.input_norm, t[p + "input_layernorm.weight"]) and eq(L.post_norm, t[p + "post_attention_layernorm.weight"])
    vp = "model.vision_tower.vision_tower."
    v = m.vision
    assert eq(v.patch_w, t[vp + "embeddings.patch_embedding.weight"]) and eq(v.pos_embedding, t[vp + "embeddings.position_embedding"])
    assert eq(v.class_embedding, t[vp + "embeddings.class_embedding"])
    for i, L in enumerate(v.layers):
        q = f"{vp}encoder.layers.{i}."
        assert eq(L.qkv_w, t[q + "attn.qkv.weight"]) and eq(L.ls1, t[q + "ls1"]) and eq(L.ls2, t[q + "ls2"])
        assert eq(L.fc2_w, t[q + "mlp.fc2.weight"]) and eq(L.norm2_b, t[q + "norm2.bias"])
    assert eq(v.proj0_w, t["model.mm_projector.0.weight"]) and eq(v.proj2_b, t["model.mm_projector.2.bias"])
    a = m.audio
    assert eq(a.cmvn_mean, t["model.audio_encoder.encoder.global_cmvn.mean"])
    for k, val in t.items():
        if k.startswith("model.audio_encoder.") and "global_cmvn" not in k:
            assert eq(a.t[k], val), k
    assert (a.num_layers, a.num_heads, a.d_model) == (2, 2, 32)
    sd = torch.load(tiny_ckpt / "vita_tts_ckpt/decoder/final.pt", weights_only=True)
    tts = m.tts
    assert eq(tts.embedding, sd["embedding.weight"]) and eq(tts.out_w, sd["out_fnn.weight"]) and eq(tts.norm, sd["norm.weight"])
    assert len(tts.nar_layers) == 1 and len(tts.ar_layers) == 2
    assert eq(tts.nar_layers[0].o_w, sd["layers_pre_nn.0.self_attn.o_proj.weight"])
    assert eq(tts.ar_layers[1].gate_up_w[:64], sd["layers.1.mlp.gate_proj.weight"])
    assert tts.llm_embed is m.llm.embed_tokens  # shared, not copied


def test_layouts_and_dtype(tmp_path):
    from vita_engine.testing import make_tiny_checkpoint

    ref = _all_tensors(make_tiny_checkpoint(tmp_path / "a"))
    d1 = make_tiny_checkpoint(tmp_path / "single", shards=1, index=False)  # model.safetensors, no index
    d2 = make_tiny_checkpoint(tmp_path / "noidx", shards=3, index=False)  # shards without index
    d3 = make_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    for d in (d1, d2):
        m = _load(d, load_tts=False, load_codec_model=False)
        assert torch.equal(m.llm.lm_head, ref["lm_head.weight"])
    m = _load(d3, dtype=torch.float32)
    assert m.llm.embed_tokens.dtype == torch.float32
    assert torch.equal(m.llm.embed_tokens, ref["model.embed_tokens.weight"].bfloat16().float())
    assert m.tts.embedding.dtype == torch.float32
    m = _load(d1, dtype=torch.bfloat16, load_tts=False, load_codec_model=False)
    assert m.llm.layers[0].qkv_w.dtype == torch.bfloat16 and m.llm.logits([1, 2, 3]).dtype == torch.bfloat16


def test_vocab_rows():
    from vita_engine.model.config import LLMConfig

    c = LLMConfig(hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=8, vocab_size=152064)
    assert c.vocab_rows_allowed() == [151665, 152064]


def test_wrong_vocab_rows(tmp_path):
    from vita_engine.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path / "v", vocab_rows=1000)
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has 1000 rows.*vocab_size 1024"):
        _load(d)


def test_tokenizer_files(tiny_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    text = "<|im_start|>user\nHello, how are you today?<|im_end|>\n"
    enc = tok.encode(text)
    assert max(enc.ids) < 1024
    assert tok.token_to_id("<|im_start|>") in enc.ids and tok.token_to_id("<|im_end|>") in enc.ids
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>")


# ---- corrupt inputs ----------------------------------------------------------------------------------

@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, d)
    return d


def _rewrite_shard(d, fn):
    from safetensors.torch import load_file, save_file

    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / "model-00001-of-00002.safetensors"
    t = load_file(shard)
    fn(t, idx["weight_map"])
    save_file(t, str(shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_truncated_safetensors(ckpt_copy):
    f = ckpt_copy / "model-00002-of-00002.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors.*truncated or corrupt"):
        _load(ckpt_copy)
    f.write_bytes(b"\x05\x00garbage")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors"):
        _load(ckpt_copy)


def test_missing_unexpected_and_misshaped_in_one_error(ckpt_copy):
    def edit(t, wm):
        del t["model.layers.0.self_attn.k_proj.bias"]
        wm.pop("model.layers.0.self_attn.k_proj.bias")
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(255, 128)
        t["model.extra.weight"] = torch.zeros(3)
        wm["model.extra.weight"] = "model-00001-of-00002.safetensors"

    _rewrite_shard(ckpt_copy, edit)
    with pytest.raises(CheckpointError) as ei:
        _load(ckpt_copy)
    msg = str(ei.value)
    assert "3 problem(s)" in msg
    assert "missing   model.layers.0.self_attn.k_proj.bias: expected shape [64]" in msg
    assert "model-00001-of-00002.safetensors: model.layers.1.mlp.up_proj.weight: expected [256, 128], found [255, 128]" in msg
    assert "unexpected model-00001-of-00002.safetensors: model.extra.weight [3]" in msg


def test_index_lists_absent_tensor(ckpt_copy):
    def edit(t, wm):
        del t["model.norm.weight"]

    _rewrite_shard(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"missing   model.norm.weight: listed in model.safetensors.index.json"):
        _load(ckpt_copy)


def test_missing_model_json_and_final_pt(ckpt_copy):
    (ckpt_copy / "vita_tts_ckpt/decoder/model.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file: .*vita_tts_ckpt/decoder/model.json"):
        _load(ckpt_copy)
    shutil.copy(ckpt_copy / "vita_tts_ckpt/codec/model.json", ckpt_copy / "vita_tts_ckpt/decoder/model.json")
    with pytest.raises(CheckpointError, match=r"decoder/model.json: expected a JSON list"):
        _load(ckpt_copy)


def test_codec_files_errors(ckpt_copy):
    from vita_engine.model.loading import codec_state_dict, load_codec

    (ckpt_copy / "vita_tts_ckpt/codec/model.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file: .*codec/model.json"):
        load_codec(ckpt_copy / "vita_tts_ckpt/codec")
    f = ckpt_copy / "vita_tts_ckpt/codec/final.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"codec/final.pt: cannot load"):
        codec_state_dict(ckpt_copy / "vita_tts_ckpt/codec")


def test_bad_tts_tensor(ckpt_copy):
    f = ckpt_copy / "vita_tts_ckpt/decoder/final.pt"
    sd = torch.load(f, weights_only=True)
    sd["out_fnn.bias"] = torch.zeros(67)
    del sd["layers.0.mlp.up_proj.weight"]
    sd["layers_prefix.0.foo"] = torch.zeros(1)  # Freeze-Omni extra: ignored
    torch.save(sd, f)
    with pytest.raises(CheckpointError) as ei:
        _load(ckpt_copy)
    msg = str(ei.value)
    assert "decoder/final.pt" in msg and "2 problem(s)" in msg
    assert "out_fnn.bias: expected [68], found [67]" in msg and "missing   layers.0.mlp.up_proj.weight" in msg


def test_subfolder_resolution(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["mm_vision_tower"] = "/nonexistent/place/NotThere"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mm_vision_tower = '/nonexistent/place/NotThere' does not name an existing folder"):
        _load(ckpt_copy)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_weight_norm_fold():
    from vita_engine.model.loading import fold_weight_norm

    conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(4, 6, 3))
    convt = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5, stride=2))
    with torch.no_grad():
        conv.weight_g.mul_(1.7)
        convt.weight_g.mul_(0.6)
    for mod in (conv, convt):
        sd = {k: v.detach() for k, v in mod.state_dict().items()}
        assert "weight_g" in sd and "weight_v" in sd
        f = fold_weight_norm(sd)
        assert set(f) == {"weight", "bias"}
        torch.nn.utils.remove_weight_norm(mod)
        torch.testing.assert_close(f["weight"], mod.weight.detach())
    with pytest.raises(CheckpointError, match="no matching"):
        fold_weight_norm({"a.weight_g": torch.ones(2, 1, 1)}, where="x")

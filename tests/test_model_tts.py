"""TTS decoder vs an independent Llama prefix-LM re-implementation with explicit masks (spec §5, §11.6)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import max_errs


def _rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta=10000.0):
    # x [H, T, D]; rotate_half form, angles pos * theta^(-2i/D)
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _llama(x, W, p, heads, mask, pos):
    T, h = x.shape
    dh = h // heads
    y = _rms(x, W[p + "input_layernorm.weight"])
    q = (y @ W[p + "self_attn.q_proj.weight"].T).view(T, heads, dh).transpose(0, 1)
    k = (y @ W[p + "self_attn.k_proj.weight"].T).view(T, heads, dh).transpose(0, 1)
    v = (y @ W[p + "self_attn.v_proj.weight"].T).view(T, heads, dh).transpose(0, 1)
    q, k = _rope(q, pos), _rope(k, pos)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
    s = s.masked_fill(~mask, float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(T, h)
    x = x + o @ W[p + "self_attn.o_proj.weight"].T
    y = _rms(x, W[p + "post_attention_layernorm.weight"])
    return x + (F.silu(y @ W[p + "mlp.gate_proj.weight"].T) * (y @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T


def ref_tts(ckpt, embed_tokens, text_ids, codec):
    W = {k: v.double() for k, v in torch.load(ckpt / "vita_tts_ckpt/decoder/final.pt", weights_only=True).items()}
    idim, V, a = json.loads((ckpt / "vita_tts_ckpt/decoder/model.json").read_text())
    heads, nb = a["transformer_attention_heads"], a["transformer_num_blocks"]
    x = embed_tokens.double()[torch.tensor(text_ids)].reshape(-1, idim)  # [4N, 32]
    n = x.shape[0]
    full = torch.ones(n, n, dtype=torch.bool)
    pos = torch.arange(n)
    for i in range(nb // 2):
        x = _llama(x, W, f"layers_pre_nn.{i}.", heads, full, pos)
    nar = x
    seq = torch.cat([W["embedding.weight"][V : V + 1], nar, W["embedding.weight"][torch.tensor([V + 1] + list(codec))]])
    L = seq.shape[0]
    P = n + 1
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    mask = (ki < P) & (qi < P) | (qi >= P) & (ki <= qi)  # prefix bidirectional, then causal
    pos = torch.arange(L)
    for i in range(nb):
        seq = _llama(seq, W, f"layers.{i}.", heads, mask, pos)
    logits = _rms(seq, W["norm.weight"]) @ W["out_fnn.weight"].T + W["out_fnn.bias"]
    return nar, logits[P:]


def test_nar_and_ar_logits_match_reference(tiny_ckpt, tiny_model):
    tts = tiny_model.tts
    text = list(range(5, 25))  # a 20-token answer -> 80 NAR positions (spec §10)
    codec = [3, 17, 63, 0, 9, 41]
    nar = tts.nar(text)
    assert nar.shape == (80, 32)
    assert tts.split == 4 and (tts.bos, tts.sos, tts.eos, tts.pad) == (64, 65, 66, 67)
    logits = tts.ar_logits(text, codec)
    assert logits.shape == (len(codec) + 1, 68)
    rnar, rlog = ref_tts(tiny_ckpt, tiny_model.llm.embed_tokens, text, codec)
    e1, e2 = max_errs(nar, rnar), max_errs(logits, rlog)
    assert e1[1] < 1e-5 and e2[1] < 1e-5, (e1, e2)
    with tiny_model.reference():
        torch.testing.assert_close(tts.ar_logits(text, codec), logits, rtol=1e-5, atol=1e-5)


def test_generate_follows_teacher_forced_logits(tiny_model):
    tts = tiny_model.tts
    text = [7, 8, 9]
    toks = tts.generate(text, max_tokens=12, seed=0)
    assert 0 < len(toks) <= 12
    assert all(0 <= t < tts.config.odim for t in toks)
    logits = tts.ar_logits(text, toks).clone()
    logits[:, [tts.bos, tts.sos, tts.pad]] = float("-inf")  # never emitted (not codec ids)
    for i, t in enumerate(toks):  # every sampled token is one of the 2 most likely at its step
        assert t in logits[i].topk(2).indices.tolist()


def test_wrapped_state_dict(tmp_path):
    """decoder final.pt may hold the state dict under key 'model'."""
    import warnings

    from vita_engine import VitaModel
    from vita_engine.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path / "w", tts_wrap_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = VitaModel.from_pretrained(d, load_codec_model=False)
    assert m.tts.nar([1, 2]).shape == (8, 32)

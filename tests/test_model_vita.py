"""VitaModel end to end on the tiny checkpoint: splicing (spec §11.2), a full multimodal forward,
the reference-ops switch, and the codec hand-off."""
import importlib.util
import time

import numpy as np
import pytest
import torch


def test_splice_expands_placeholders(tiny_model):
    m = tiny_model
    E = m.llm.embed_tokens
    tiles = torch.randn(3, 4, 128)
    audio = torch.randn(12, 128)
    ids = [5, -200, -200, -200, 9, 10, -500, 11]
    x = m.splice(ids, tiles, audio)
    ref = torch.cat([E[[5]], tiles[0], tiles[1], tiles[2], E[[9, 10]], audio, E[[11]]])
    assert x.shape == (1 + 12 + 2 + 12 + 1, 128)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    # lists work too: two audio clips, one frame per -200
    a2 = [torch.randn(3, 128), torch.randn(5, 128)]
    x = m.splice([-500, 1, -200, -500], [tiles[1]], a2)
    torch.testing.assert_close(x, torch.cat([a2[0], E[[1]], tiles[1], a2[1]]), rtol=0, atol=0)
    torch.testing.assert_close(m.splice([1, 2, 3]), E[[1, 2, 3]], rtol=0, atol=0)


def test_splice_count_mismatch(tiny_model):
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) .* but 3 image tile"):
        tiny_model.splice([1, -200, 2], torch.randn(3, 4, 128))
    with pytest.raises(ValueError, match=r"1 audio placeholder"):
        tiny_model.splice([1, -500, 2], None, None)
    with pytest.raises(ValueError, match=r"unknown negative ids \[-7\]"):
        tiny_model.splice([1, -7])


def test_full_forward_and_reference_switch(tiny_model):
    from PIL import Image

    m = tiny_model
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (56, 112, 3), dtype=np.uint8))
    wav = (np.random.RandomState(1).randn(16000) * 0.1).astype(np.float32)
    t0 = time.perf_counter()
    pv = m.vision.preprocess(img, max_tiles=2)
    img_f = m.vision.encode(pv)
    aud_f = m.audio.encode(wav)
    ids = [1] + [-200] * pv.shape[0] + [2, -500, 3]
    x = m.splice(ids, img_f, aud_f)
    logits = m.llm.logits(inputs_embeds=x)
    nar = m.tts.nar([4, 5, 6])
    dt = time.perf_counter() - t0
    assert img_f.shape == (3, 4, 128) and aud_f.shape == (12, 128)
    assert logits.shape == (1 + 12 + 1 + 12 + 1, 1024) and nar.shape == (12, 32)
    assert torch.isfinite(logits).all()
    assert dt < 5.0
    assert m.ops.backend()["rms_norm"] == "vita_engine.ops.elementwise"
    with m.reference():
        assert set(m.ops.backend().values()) == {"vita_engine.ops.reference"}
        x2 = m.splice(ids, m.vision.encode(pv), m.audio.encode(wav))
        l2 = m.llm.logits(inputs_embeds=x2)
    torch.testing.assert_close(l2, logits, rtol=1e-4, atol=1e-4)
    assert not m.use_reference


def test_generate_on_spliced_prompt(tiny_model):
    m = tiny_model
    x = m.splice([1, -500, 2], None, torch.randn(6, 128, generator=torch.Generator().manual_seed(0)))
    out = m.llm.generate(inputs_embeds=x, max_new_tokens=8)
    ref = []
    seq = x
    for _ in range(8):  # greedy by repeated full forwards
        t = int(m.llm.logits(inputs_embeds=seq)[-1].argmax())
        ref.append(t)
        seq = torch.cat([seq, m.llm.embed_tokens[[t]]])
    assert out == ref


def test_codec_state_dict_folded(tiny_ckpt):
    from vita_engine.model.loading import codec_state_dict

    sd = codec_state_dict(tiny_ckpt / "vita_tts_ckpt/codec")
    assert not any(k.endswith(("weight_g", "weight_v")) or k.startswith("encoder.") for k in sd)
    assert sd["generator.ups.0.weight"].shape == (64, 32, 16)  # ConvTranspose1d [in, out, k]
    assert sd["generator.ups.3.weight"].shape == (8, 4, 5)
    assert sd["generator.resblocks.11.convs2.2.weight"].shape == (4, 4, 11)  # 4 stages x 3 resblocks
    assert sd["quantizer.quantizer_modules.0.embedding.weight"].shape == (64, 32)
    assert sd["quantizer.quantizer_modules_globaltokens.1.embedding.weight"].shape == (64, 8)
    raw = torch.load(tiny_ckpt / "vita_tts_ckpt/codec/final.pt", weights_only=True)["generator"]
    v, g = raw["ups.1.weight_v"], raw["ups.1.weight_g"]
    assert g.shape == (32, 1, 1)  # weight norm over dim 0 (= in channels of a ConvTranspose1d)
    torch.testing.assert_close(sd["generator.ups.1.weight"], g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1))


@pytest.mark.skipif(importlib.util.find_spec("vita_engine.model.codec") is None, reason="vita_engine.model.codec not present yet")
def test_codec_loaded(tiny_model):
    c = tiny_model.codec
    assert c is not None
    # the real generator structure at small widths (testing.py): x600 hop, 24 kHz, 4 stages, the
    # global add at the 2nd stage, the real configuration's streaming look-ahead
    assert c.hop_length == 600 and c.sample_rate == 24000
    assert c.upsample_rates == [8, 5, 5, 3] and c.upsample_kernel_sizes == [16, 11, 11, 5]
    assert c.channels == [32, 16, 8, 4] and c.channels.index(c.global_dim) == 1
    assert c.lookahead_tokens == 13 and c.lookahead_samples == 7798
    wav = c.decode(torch.tensor([1, 2, 3, 4, 5]))
    assert wav.shape[-1] == 5 * 600

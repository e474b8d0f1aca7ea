"""The public API exactly as /work/shared/DESIGN.md §4-6 writes it (and docs/architecture.md §5).

Each test calls the API the way the contract spells it: argument names, defaults, return types,
and the documented error types, whose messages name the argument. Tiny bundled model, CPU."""
import asyncio
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vita_engine
from vita_engine import ops
from vita_engine.runtime import AudioChunk, Interrupted, Metrics, TextDelta, TurnEnd

from runtime_util import check_turn_tail, kinds


# ---- §4 ops ----------------------------------------------------------------------------------------

def test_paged_attention_errors_name_the_op_and_argument():
    q = torch.randn(5, 4, 16)
    kc, vc = torch.randn(4, 8, 2, 16), torch.randn(4, 8, 2, 16)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    kv = torch.tensor([10, 5], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"^paged_attention: block_table must be int32 or int64"):
        ops.paged_attention(q, kc, vc, bt.float(), kv, cu)
    with pytest.raises(TypeError, match=r"^paged_attention: kv_lens must be int32 or int64"):
        ops.paged_attention(q, kc, vc, bt, kv.float(), cu)
    with pytest.raises(ValueError, match=r"^paged_attention: .*block_table \[B, max_blocks\]"):
        ops.paged_attention(q, kc, vc, bt[0], kv, cu)
    with pytest.raises(ValueError, match=r"^paged_attention: q heads \(3\) must be a multiple of k_cache kv_heads \(2\)"):
        ops.paged_attention(torch.randn(5, 3, 16), kc, vc, bt, kv, cu)


def test_paged_attention_contract_semantics():
    """int64 index tensors, GQA, bottom-right causal (query j of a q_len sequence sees keys
    < kv_len - q_len + j + 1), against a loop over a gathered contiguous cache."""
    g = torch.Generator().manual_seed(3)
    Hq, Hkv, D, bs = 4, 2, 16, 8
    kvl, ql = [10, 5, 7], [3, 2, 1]
    kc, vc = torch.randn(6, bs, Hkv, D, generator=g), torch.randn(6, bs, Hkv, D, generator=g)
    bt = torch.tensor([[1, 3], [0, 2], [5, 4]])
    q = torch.randn(sum(ql), Hq, D, generator=g)
    cu = torch.tensor([0, 3, 5, 6])
    o = ops.paged_attention(q, kc, vc, bt, torch.tensor(kvl), cu, causal=True, scale=None)
    assert o.shape == q.shape and o.dtype == q.dtype
    ref, qi = [], 0
    for b, (L, n) in enumerate(zip(kvl, ql)):
        K = kc[bt[b]].reshape(-1, Hkv, D)[:L].double()
        V = vc[bt[b]].reshape(-1, Hkv, D)[:L].double()
        for j in range(n):
            lim = L - n + j + 1
            Kr, Vr = K[:lim].repeat_interleave(Hq // Hkv, 1), V[:lim].repeat_interleave(Hq // Hkv, 1)
            s = torch.einsum("hd,thd->ht", q[qi + j].double(), Kr) / D ** 0.5
            ref.append(torch.einsum("ht,thd->hd", s.softmax(-1), Vr))
        qi += n
    torch.testing.assert_close(o.double(), torch.stack(ref), rtol=1e-5, atol=1e-5)


# ---- §5 model ---------------------------------------------------------------------------------------

def _no_inference(t):
    """A plain tensor: usable by autograd-enabled code (e.g. VITA's own modules fed our output)."""
    assert isinstance(t, torch.Tensor) and not t.is_inference()
    w = torch.ones((), requires_grad=True)
    (t.float() * w).sum().backward()  # an inference tensor cannot be saved for backward
    assert w.grad is not None


def test_model_outputs_are_plain_tensors(tiny_model):
    m = tiny_model
    ids = torch.tensor([1, 2, 3, 4])
    _no_inference(m.llm.logits(input_ids=ids))
    _no_inference(m.llm.logits(inputs_embeds=m.llm.embed(ids)))
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (56, 112, 3), dtype=np.uint8))
    feats = m.vision.encode(m.vision.preprocess(img, max_tiles=12))
    _no_inference(feats)
    w = (0.1 * np.random.RandomState(1).randn(16000)).astype(np.float32)
    a = m.audio.encode(w)
    _no_inference(a)
    _no_inference(m.splice(torch.tensor([1, -200, -200, -200, 2, -500, 3]), image_features=feats, audio_features=a))
    _no_inference(m.tts.nar([5, 6, 7]))
    _no_inference(m.tts.ar_logits([5, 6, 7], [1, 2, 3]))
    _no_inference(m.codec.decode([1, 2, 3]))


def test_vision_preprocess_default_is_max_tiles_12(tiny_model):
    """DESIGN: m.vision.preprocess(image, max_tiles=12), VITA's demo call
    dynamic_preprocess(min_num=1, max_num=12, use_thumbnail=True). 641x479 is closest to a 4x3 grid:
    12 tiles plus the thumbnail (the tiny checkpoint's own max_dynamic_patch is 2)."""
    m = tiny_model
    img = Image.fromarray(np.random.RandomState(2).randint(0, 256, (479, 641, 3), dtype=np.uint8))
    pv = m.vision.preprocess(img)
    S = m.vision.config.image_size
    assert pv.shape == (13, 3, S, S) and pv.dtype == torch.float32
    torch.testing.assert_close(pv, m.vision.preprocess(img, max_tiles=12), rtol=0, atol=0)
    # an ndarray is the same image
    torch.testing.assert_close(m.vision.preprocess(np.asarray(img)), pv, rtol=0, atol=0)
    # None: the checkpoint's max_dynamic_patch (2), what the engine uses for push_image
    assert m.vision.preprocess(img, max_tiles=None).shape[0] <= 3


def test_vision_errors_name_the_argument(tiny_model):
    m = tiny_model
    pv = m.vision.preprocess(np.zeros((56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="pixel_values"):
        m.vision.encode(pv[0])
    with pytest.raises(ValueError, match="pixel_values"):
        m.vision.encode(pv[:, :2])
    with pytest.raises(TypeError, match="image"):
        m.vision.preprocess("not an image")
    with pytest.raises(ValueError, match="max_tiles"):
        m.vision.preprocess(np.zeros((56, 56, 3), np.uint8), max_tiles=0)


def test_audio_fbank_input_contract(tiny_model):
    """1-D float32 (numpy or torch) in [-1, 1] -> [frames, 80]; anything else is refused by name."""
    am = tiny_model.audio
    w = (0.1 * np.random.RandomState(3).randn(16000)).astype(np.float32)
    f = am.fbank(w)
    assert f.shape == (98, 80) and f.dtype == torch.float32
    torch.testing.assert_close(am.fbank(torch.from_numpy(w)), f)
    with pytest.raises(TypeError, match="waveform_16k.*int16"):
        am.fbank((w * 32767).astype(np.int16))
    with pytest.raises(ValueError, match="waveform_16k.*1-D"):
        am.fbank(w[None])
    with pytest.raises(ValueError, match="waveform_16k.*NaN"):
        am.fbank(np.where(np.arange(16000) == 5, np.nan, w).astype(np.float32))


def test_audio_encode_too_short_is_a_value_error(tiny_model):
    am = tiny_model.audio
    with pytest.raises(ValueError, match="waveform_16k is too short"):
        am.encode(np.zeros(1200, np.float32))  # 6 fbank frames: no encoder frame
    assert am.encode(np.zeros(1360, np.float32)).shape[0] == 1  # 7 frames: the first one


def test_tts_ar_logits_codec_tokens_checked(tiny_model):
    t = tiny_model.tts
    V4 = t.embedding.shape[0]
    assert t.ar_logits([5, 6, 7], [1, 2, 3, 4]).shape == (5, V4)
    assert t.ar_logits([5, 6, 7], []).shape == (1, V4)
    with pytest.raises(ValueError, match="codec_tokens"):
        t.ar_logits([5, 6, 7], [V4])
    with pytest.raises(ValueError, match="codec_tokens"):
        t.ar_logits([5, 6, 7], [-1])
    with pytest.raises(TypeError, match="codec_tokens"):
        t.ar_logits([5, 6, 7], [1.5])


def test_from_pretrained_device_and_dtype_checked(tiny_ckpt):
    from vita_engine import VitaModel
    from vita_engine.model.loading import load_codec

    with pytest.raises(ValueError, match="device"):
        VitaModel.from_pretrained(tiny_ckpt, device="tpu", dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        VitaModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        load_codec(tiny_ckpt / "vita_tts_ckpt" / "codec", device="cpu", dtype=torch.int64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'.*CUDA is not available"):
            VitaModel.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float32)


# ---- §6 runtime ---------------------------------------------------------------------------------------

def test_event_dataclasses_as_written():
    for cls, names in ((TextDelta, ("text",)), (AudioChunk, ("pcm", "sample_rate")), (TurnEnd, ("turn",)),
                       (Interrupted, ("turn",)), (Metrics, ("turn", "values"))):
        assert dataclasses.is_dataclass(cls)
        assert tuple(f.name for f in dataclasses.fields(cls))[: len(names)] == names, cls
    pcm = np.zeros(4, np.float32)
    assert TextDelta("hi").text == "hi"
    assert AudioChunk(pcm, 24000).sample_rate == 24000
    assert TurnEnd(3).turn == Interrupted(3).turn == Metrics(3, {"ttfa_ms": 1.0}).turn == 3


@pytest.fixture(scope="module")
def tiny_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = vita_engine.Engine.from_pretrained("tiny", device="cpu", dtype=torch.float32,
                                               max_new_tokens=12, tts_max_tokens=24, cpu_threads=1)
    yield e
    e.close()


async def _one_turn(s, on_audio=None):
    out = []
    async for ev in s.events():
        out.append(ev)
        if on_audio is not None and isinstance(ev, AudioChunk):
            on_audio()
            on_audio = None
        if isinstance(ev, TurnEnd):
            break
    return out


def _check_answer(evs):
    check_turn_tail(evs)
    aud = [e for e in evs if isinstance(e, AudioChunk)]
    assert aud, kinds(evs)
    for e in aud:
        assert isinstance(e.pcm, np.ndarray) and e.pcm.dtype == np.float32 and e.pcm.ndim == 1
        assert e.sample_rate == 24000 and np.abs(e.pcm).max() <= 1.0
    assert all(isinstance(e.text, str) for e in evs if isinstance(e, TextDelta))
    met = evs[-2]
    assert isinstance(met.values, dict) and met.values["ttfa_ms"] >= 0 and met.turn == evs[-1].turn
    # DESIGN §6: values holds the §7 keys (a spoken answer reaches every moment; the work stages are
    # there even when the turn had none of that work, e.g. vision_ms without an image: 0)
    from vita_engine.runtime.metrics import KEYS

    missing = [k for k in KEYS if k not in met.values]
    assert not missing, missing
    assert all(isinstance(met.values[k], float) and met.values[k] >= 0 for k in KEYS)


def test_session_as_written_each_turn_on_its_own_event_loop(tiny_engine):
    """DESIGN §6 line by line; every turn drained by its own asyncio.run (a new event loop), and the
    synchronous helpers still work afterwards."""
    from vita_engine.runtime import _compat

    engine = tiny_engine
    s = engine.session(system_prompt=None)
    s.push_text("Hello there.")
    e1 = asyncio.run(_one_turn(s))
    _check_answer(e1)
    # audio: int16, odd chunk sizes, then silence so the VAD ends the turn
    x, sr = _compat.load_sample("hello.wav")
    pcm = np.round(np.concatenate([x, np.zeros(int(1.0 * sr), np.float32)]) * 32767).astype(np.int16)
    for i in range(0, len(pcm), 1234):
        s.push_audio(pcm[i:i + 1234], sr)
    e2 = asyncio.run(_one_turn(s))
    _check_answer(e2)
    assert e2[-1].turn == e1[-1].turn + 1 and e2[-2].values.get("audio_encoder_ms", 0) > 0
    # barge-in: Interrupted, no audio after it, then Metrics and TurnEnd
    s.push_text("Tell me a long story.")
    e3 = asyncio.run(_one_turn(s, on_audio=s.interrupt))
    check_turn_tail(e3)
    assert any(isinstance(e, Interrupted) for e in e3), kinds(e3)
    # the synchronous helpers after asyncio consumers
    s.push_text("And now?")
    e4 = s.collect(timeout=120)
    check_turn_tail(e4)
    s.close()
    assert asyncio.run(_drain(s)) == []  # events() ends after close()
    with pytest.raises(vita_engine.runtime.SessionClosedError, match="push_text"):
        s.push_text("closed")


async def _drain(s):
    return [ev async for ev in s.events()]


def test_events_left_early_keep_the_rest(tiny_engine):
    """Leaving `async for` early (another loop later) loses no event."""
    s = tiny_engine.session(system_prompt="You are terse.")
    s.push_text("Hi.")

    async def first():
        async for ev in s.events():
            return ev

    head = asyncio.run(first())
    rest = asyncio.run(_one_turn(s))
    evs = [head] + rest
    _check_answer(evs)
    s.close()

"""Audio path: fbank vs a per-frame numpy Kaldi implementation, CMVN sources, and the encoder +
adapter vs an independent rel-PE re-implementation (spec §4, §11.1)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import max_errs


def numpy_kaldi_fbank(wave, sr=16000, bins=80):
    """Independent Kaldi fbank (frame-by-frame, numpy float64): snip_edges, DC removal,
    preemphasis 0.97 (first sample against itself), povey window, 512-pt power spectrum,
    triangular mel banks on 1127 ln(1 + f/700) from 20 Hz to Nyquist, log with float32-eps floor."""
    wl, ws, nfft = 400, 160, 512
    n = 1 + (len(wave) - wl) // ws
    i = np.arange(wl)
    win = (0.5 - 0.5 * np.cos(2 * np.pi * i / (wl - 1))) ** 0.85
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    lo, hi = mel(20.0), mel(sr / 2)
    fmel = mel(np.arange(nfft // 2 + 1) * sr / nfft)
    banks = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        l, c, r = lo + b * (hi - lo) / (bins + 1), lo + (b + 1) * (hi - lo) / (bins + 1), lo + (b + 2) * (hi - lo) / (bins + 1)
        for k in range(nfft // 2):  # Kaldi uses nfft/2 bins; the Nyquist bin has weight 0
            m = fmel[k]
            if l < m < r:
                banks[b, k] = (m - l) / (c - l) if m <= c else (r - m) / (r - c)
    out = np.zeros((n, bins))
    for t in range(n):
        fr = np.asarray(wave[t * ws : t * ws + wl], dtype=np.float64)
        fr = fr - fr.mean()
        pre = fr.copy()
        pre[1:] = fr[1:] - 0.97 * fr[:-1]
        pre[0] = fr[0] - 0.97 * fr[0]
        buf = np.zeros(nfft)
        buf[:wl] = pre * win
        spec = np.abs(np.fft.rfft(buf)) ** 2
        out[t] = np.log(np.maximum(banks @ spec, np.finfo(np.float32).eps))
    return out


def test_fbank_matches_independent_numpy():
    from vita_engine.model.audio import kaldi_fbank

    w = np.random.RandomState(0).randn(8000) * 3000.0
    ref = numpy_kaldi_fbank(w)
    out = kaldi_fbank(w).double().numpy()
    assert out.shape == ref.shape == (48, 80)
    assert np.abs(out - ref).max() < 1e-4


def test_fbank_frames_and_cmvn(tiny_model, tiny_ckpt):
    w = (np.random.RandomState(1).randn(16000) * 0.1).astype(np.float32)
    fb = tiny_model.audio.fbank(w)
    assert fb.shape == (98, 80)  # spec §11.1: 1 + (16000 - 400)//160
    raw = numpy_kaldi_fbank(w.astype(np.float64) * 32768.0)
    mean = tiny_model.audio.cmvn_mean.double().numpy()
    istd = tiny_model.audio.cmvn_istd.double().numpy()
    assert np.abs(fb.double().numpy() - (raw - mean) * istd).max() < 1e-4
    # torch input accepted too
    torch.testing.assert_close(tiny_model.audio.fbank(torch.from_numpy(w)), fb)


@pytest.mark.parametrize("json_form", [False, True])
def test_cmvn_file_forms(tmp_path, json_form):
    """Without the safetensors buffers the global_cmvn file (Kaldi text or JSON) is used."""
    import warnings

    from vita_engine import VitaModel
    from vita_engine.model.loading import load_cmvn
    from vita_engine.testing import AUDIO_DIR, make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path / "c", cmvn_in_safetensors=False, cmvn_json=json_form)
    d2 = make_tiny_checkpoint(tmp_path / "ref")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = VitaModel.from_pretrained(d, load_tts=False, load_codec_model=False)
        ref = VitaModel.from_pretrained(d2, load_tts=False, load_codec_model=False)
    torch.testing.assert_close(m.audio.cmvn_mean, ref.audio.cmvn_mean)
    torch.testing.assert_close(m.audio.cmvn_istd, ref.audio.cmvn_istd)
    mean, istd = load_cmvn(d / AUDIO_DIR / "global_cmvn")  # form auto-detected
    torch.testing.assert_close(mean.float(), ref.audio.cmvn_mean)


def _state(ckpt, prefix):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = h.get_tensor(k).double()
    return out


def ref_audio_encode(ckpt, feats, heads=2, layers=2):
    """Spec §4 written out: Conv2dSubsampling4 (channel-major flatten), Linear-LN-ReLU embed,
    ×√d, rel-PE MHA with ((q+u)·k + (q+v)·p)/√dk and p = linear_pos(PE[j]) (no rel_shift),
    pre-LN blocks, after_norm, right-padded conv adapter, LN eps 1e-3, exact GELU, Linear."""
    W = _state(ckpt, "model.audio_encoder.")
    E = "encoder."
    x = feats.double()[None, None]
    x = F.relu(F.conv2d(x, W[E + "enc.0.core.conv.0.weight"], W[E + "enc.0.core.conv.0.bias"], stride=2))
    x = F.relu(F.conv2d(x, W[E + "enc.0.core.conv.2.weight"], W[E + "enc.0.core.conv.2.bias"], stride=2))
    b, c, t, f = x.size()
    x = x.transpose(1, 2).contiguous().view(b, t, c * f)[0]
    x = x @ W[E + "enc.0.core.out.0.weight"].T + W[E + "enc.0.core.out.0.bias"]
    d = x.shape[-1]
    x = x @ W[E + "enc.1.embed.0.weight"].T + W[E + "enc.1.embed.0.bias"]
    x = torch.relu(F.layer_norm(x, (d,), W[E + "enc.1.embed.1.weight"], W[E + "enc.1.embed.1.bias"], 1e-5))
    x = x * math.sqrt(d)
    pe = torch.zeros(t, d, dtype=torch.float64)
    for pos in range(t):
        for i in range(0, d, 2):
            ang = pos / (10000 ** (i / d))
            pe[pos, i], pe[pos, i + 1] = math.sin(ang), math.cos(ang)
    dk = d // heads
    for l in range(layers):
        p = f"{E}enc.1.encoders.{l}."
        a = p + "self_attn."
        h = F.layer_norm(x, (d,), W[p + "norm1.weight"], W[p + "norm1.bias"], 1e-5)
        q = (h @ W[a + "linear_q.weight"].T + W[a + "linear_q.bias"]).view(t, heads, dk).transpose(0, 1)
        k = (h @ W[a + "linear_k.weight"].T + W[a + "linear_k.bias"]).view(t, heads, dk).transpose(0, 1)
        v = (h @ W[a + "linear_v.weight"].T + W[a + "linear_v.bias"]).view(t, heads, dk).transpose(0, 1)
        pp = (pe @ W[a + "linear_pos.weight"].T).view(t, heads, dk).transpose(0, 1)
        q_u = q + W[a + "pos_bias_u"][:, None, :]
        q_v = q + W[a + "pos_bias_v"][:, None, :]
        s = (q_u @ k.transpose(-1, -2) + q_v @ pp.transpose(-1, -2)) / math.sqrt(dk)
        o = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(t, d)
        x = x + o @ W[a + "linear_out.weight"].T + W[a + "linear_out.bias"]
        h = F.layer_norm(x, (d,), W[p + "norm2.weight"], W[p + "norm2.bias"], 1e-5)
        x = x + torch.relu(h @ W[p + "feed_forward.w_1.weight"].T + W[p + "feed_forward.w_1.bias"]) @ W[p + "feed_forward.w_2.weight"].T + W[p + "feed_forward.w_2.bias"]
    x = F.layer_norm(x, (d,), W[E + "enc.1.after_norm.weight"], W[E + "enc.1.after_norm.bias"], 1e-5)
    y = torch.nn.ConstantPad1d((0, 4), 0.0)(x.T[None])
    y = F.conv1d(y, W["adpter.conv1d2.weight"], W["adpter.conv1d2.bias"], stride=2)[0].T
    y = F.gelu(F.layer_norm(y, (y.shape[-1],), W["adpter.bn2.weight"], W["adpter.bn2.bias"], 1e-3))
    return y @ W["adpter.project.weight"].T + W["adpter.project.bias"]


@pytest.mark.parametrize("seconds", [1.0, 0.37])
def test_encode_matches_reference(tiny_ckpt, tiny_model, seconds):
    from vita_engine.model.audio import llm_tokens_for_frames

    n = int(16000 * seconds)
    w = (np.random.RandomState(2).randn(n) * 0.1).astype(np.float32)
    feats = tiny_model.audio.fbank(w)
    T = feats.shape[0]
    T1 = ((T - 1) // 2 - 1) // 2
    out = tiny_model.audio.encode(w)
    assert out.shape == ((T1 - 1) // 2 + 1, 128) == (llm_tokens_for_frames(T), 128)
    if seconds == 1.0:
        assert (T, T1, out.shape[0]) == (98, 23, 12)  # spec §11.1
    ab, rel = max_errs(out, ref_audio_encode(tiny_ckpt, feats))
    assert rel < 1e-5, (ab, rel)
    with tiny_model.reference():
        torch.testing.assert_close(tiny_model.audio.encode(w), out, rtol=1e-5, atol=1e-5)


def test_llm_token_count_formula():
    from vita_engine.model.audio import llm_tokens_for_frames

    for T in range(7, 400, 7):
        assert llm_tokens_for_frames(T) == len(np.ones(T)[2::2][2::2][0::2])

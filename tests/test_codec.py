"""Codec module: decode vs an independent generator written here from the spec (tiny config of spec
§10, random weights), exact streaming for arbitrary push splits, batching, and bad inputs."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vita_engine.model.codec import Codec, CodecWeightsError

TINY = dict(upsample_rates=[4, 3], upsample_kernel_sizes=[8, 5], upsample_initial_channel=32, resblock="1",
            resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], n_codes=64, n_code_groups=1,
            residul_layer=1, global_code_num=2, global_tokens=[3, 7], code_dim=32, global_dim=16)
REAL = dict(upsample_rates=[8, 5, 5, 3], upsample_kernel_sizes=[16, 11, 11, 5], upsample_initial_channel=512, resblock="1",
            resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3, n_codes=1024, n_code_groups=1,
            residul_layer=1, global_code_num=8, global_tokens=[473, 975, 419, 219, 565, 121, 550, 616])


def tiny_state_dict(seed=0):
    """Random weights with the checkpoint's key names, built from weight-norm pairs (g, v) and folded."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, shape, transpose=False):
        v = torch.randn(*shape, generator=g)
        gn = torch.rand(shape[0], 1, 1, generator=g) + 0.5  # weight_g: dim 0 (= input channels for ConvTranspose1d)
        sd[name + ".weight"] = gn * v / v.reshape(shape[0], -1).norm(dim=1).reshape(-1, 1, 1)
        cout = shape[1] if transpose else shape[0]
        sd[name + ".bias"] = torch.randn(cout, generator=g) * 0.1

    conv("generator.conv_pre", (32, 32, 7))
    cin = 32
    for i, (u, k) in enumerate(zip(TINY["upsample_rates"], TINY["upsample_kernel_sizes"])):
        ch = 32 // 2 ** (i + 1)
        conv(f"generator.ups.{i}", (cin, ch, k), transpose=True)
        for j, rk in enumerate(TINY["resblock_kernel_sizes"]):
            for c in ("convs1", "convs2"):
                for m in range(3):
                    conv(f"generator.resblocks.{i * 2 + j}.{c}.{m}", (ch, ch, rk))
        cin = ch
    conv("generator.conv_post", (1, cin, 7))
    sd["quantizer.quantizer_modules.0.embedding.weight"] = torch.randn(64, 32, generator=g)
    for q in range(2):
        sd[f"quantizer.quantizer_modules_globaltokens.{q}.embedding.weight"] = torch.randn(64, 8, generator=g)
    return sd


def spec_generator(sd, tokens):
    """Independent float64 implementation of spec §5 (TiCodec Generator, ResBlock1)."""
    d = {k: v.double() for k, v in sd.items()}
    x = d["quantizer.quantizer_modules.0.embedding.weight"][tokens].T[None]  # [1, 32, n]
    gvec = torch.cat([d[f"quantizer.quantizer_modules_globaltokens.{q}.embedding.weight"][t] for q, t in enumerate([3, 7])])
    x = F.conv1d(x, d["generator.conv_pre.weight"], d["generator.conv_pre.bias"], padding=3)
    for i, (u, k) in enumerate(zip([4, 3], [8, 5])):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, d[f"generator.ups.{i}.weight"], d[f"generator.ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        outs = []
        for j, rk in enumerate([3, 5]):
            h = x
            for m, dil in enumerate([1, 3, 5]):
                p = f"generator.resblocks.{i * 2 + j}"
                t = F.leaky_relu(h, 0.1)
                t = F.conv1d(t, d[f"{p}.convs1.{m}.weight"], d[f"{p}.convs1.{m}.bias"], padding=(rk * dil - dil) // 2, dilation=dil)
                t = F.leaky_relu(t, 0.1)
                t = F.conv1d(t, d[f"{p}.convs2.{m}.weight"], d[f"{p}.convs2.{m}.bias"], padding=(rk - 1) // 2)
                h = t + h
            outs.append(h)
        x = sum(outs) / len(outs)
        if x.shape[-2] == 16:
            x = x + gvec[None, :, None]
    x = F.leaky_relu(x, 0.1)  # VITA ticodec/models.py Generator.forward: LRELU_SLOPE before conv_post too
    x = F.conv1d(x, d["generator.conv_post.weight"], d["generator.conv_post.bias"], padding=3)
    return torch.tanh(x)[0, 0]


@pytest.fixture(scope="module")
def sd():
    return tiny_state_dict()


@pytest.fixture(scope="module")
def codec(sd):
    return Codec(TINY).load_folded_state_dict(sd)


def test_attributes(codec):
    assert codec.hop_length == 12 and codec.sample_rate == 24000
    assert Codec(REAL).hop_length == 600


def test_decode_matches_spec_generator(codec, sd):
    tok = torch.randint(0, 64, (19,))
    y = codec.decode(tok)
    assert y.dtype == torch.float32 and y.shape == (19 * 12,)
    ref = spec_generator(sd, tok)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5)
    assert (y.double() - ref).abs().max() / ref.abs().max() <= 1e-5  # the parity bound of the real config too
    torch.testing.assert_close(codec.decode(tok, use_reference=True).double(), ref, rtol=0, atol=2e-5)
    # list and numpy inputs, single token, empty
    torch.testing.assert_close(codec.decode(tok.tolist()), y)
    torch.testing.assert_close(codec.decode(tok.numpy().astype(np.int32)), y)
    torch.testing.assert_close(codec.decode([5]).double(), spec_generator(sd, torch.tensor([5])), rtol=0, atol=2e-5)
    assert codec.decode([]).shape == (0,)


@pytest.mark.parametrize("key", ["leaky_relu_slope", "final_leaky_relu_slope"])
def test_other_slopes_refused(key):
    # VITA's generator has one constant slope; a config asking for another must not change numbers silently.
    with pytest.raises(ValueError, match=key):
        Codec(dict(TINY, **{key: 0.01}))
    assert Codec(dict(TINY, **{key: 0.1})).lrelu_slope == 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_low_precision(sd, dtype):
    c = Codec(TINY, dtype=dtype).load_folded_state_dict(sd)
    tok = torch.randint(0, 64, (15,))
    y = c.decode(tok)
    assert y.dtype == torch.float32
    ref = spec_generator(sd, tok)
    assert (y.double() - ref).abs().max() < 0.1
    assert (y.double() - ref).abs().mean() < 0.02


def test_decode_batch(codec):
    tok = torch.randint(0, 64, (3, 11))
    y = codec.decode_batch(tok)
    assert y.shape == (3, 132)
    for b in range(3):
        torch.testing.assert_close(y[b], codec.decode(tok[b]), rtol=0, atol=1e-6)


def _split(n, rng):
    sizes, i = [], 0
    while i < n:
        k = rng.choice([0, 1, 1, 1, 2, 3, 4, 6, 9])
        sizes.append(min(k, n - i))
        i += sizes[-1]
    return sizes


@pytest.mark.parametrize("seed", range(6))
def test_stream_equals_decode_any_split(codec, seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 5, 13, 30, 41])
    tok = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))
    full = codec.decode(tok)
    s = codec.stream()
    pieces, i = [], 0
    for k in _split(n, rng):
        out = s.push(tok[i:i + k])
        i += k
        assert out.dim() == 1 and out.dtype == torch.float32
        pieces.append(out)
        # causality bound: never more than the complete receptive field allows
        assert s.samples_emitted <= max(0, i * codec.hop_length - codec.lookahead_samples)
    pieces.append(s.flush())
    got = torch.cat(pieces)
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    assert s.flush().numel() == 0
    with pytest.raises(RuntimeError, match="after flush"):
        s.push([1])


def test_stream_emits_as_soon_as_complete(codec):
    """After n tokens exactly max(0, n*hop - lookahead_samples) samples are out (no extra delay)."""
    s = codec.stream()
    tok = torch.randint(0, 64, (40,))
    for n in range(1, 41):
        s.push(tok[n - 1:n])
        assert s.samples_emitted == max(0, n * codec.hop_length - codec.lookahead_samples)


def test_lookahead_from_config():
    c = Codec(REAL)
    # conv_pre 3 tok; ups: 8*3+4=28, +60 (MRF k=11: 5*(1+3+5)+3*5); 5*88+3, +60; 5*503+3, +60; 3*2578+1, +60; conv_post +3
    assert c.lookahead_samples == 7798
    assert c.lookahead_tokens == 13
    assert Codec(TINY).lookahead_tokens == -(-Codec(TINY).lookahead_samples // 12)


def test_batched_stream_and_push_many(codec):
    tok = torch.randint(0, 64, (3, 17))
    full = codec.decode_batch(tok)
    s = codec.stream(batch=3)
    outs = [s.push(tok[:, a:b]) for a, b in [(0, 4), (4, 5), (5, 5), (5, 17)]] + [s.flush()]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)

    streams = [codec.stream() for _ in range(4)]
    seqs = [torch.randint(0, 64, (20,)) for _ in range(4)]
    got = [[] for _ in range(4)]
    pos = [0] * 4
    rng = random.Random(3)
    for _ in range(12):
        lists = []
        for i in range(4):
            k = rng.choice([0, 2, 2, 3]) if i % 2 else 2  # streams 0 and 2 stay in lockstep (batched together)
            k = min(k, 20 - pos[i])
            lists.append(seqs[i][pos[i]:pos[i] + k])
            pos[i] += k
        for i, y in enumerate(codec.push_many(streams, lists)):
            got[i].append(y)
    for i in range(4):
        got[i].append(streams[i].push(seqs[i][pos[i]:]))
        got[i].append(streams[i].flush())
        torch.testing.assert_close(torch.cat(got[i]), codec.decode(seqs[i]), rtol=0, atol=1e-5)


def test_bad_tokens(codec):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        codec.decode([1, 64])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        codec.decode(torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integer"):
        codec.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integers"):
        codec.decode([1, 2.5])
    with pytest.raises(TypeError, match="integers"):
        codec.decode(np.array([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        codec.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        codec.decode("abc")
    s = codec.stream()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        s.push([100])
    with pytest.raises(ValueError, match="2-D"):
        codec.decode_batch([1, 2])


def test_bad_state_dict(sd):
    c = Codec(TINY)
    with pytest.raises(RuntimeError, match="not loaded"):
        c.decode([1])
    broken = dict(sd)
    del broken["generator.ups.1.weight"]
    broken["generator.conv_post.bias"] = torch.zeros(2)
    with pytest.raises(CodecWeightsError) as e:
        c.load_folded_state_dict(broken)
    assert "generator.ups.1.weight" in str(e.value) and "generator.conv_post.bias: expected [1], got [2]" in str(e.value)


def test_bad_config():
    with pytest.raises(ValueError, match="upsample_rates"):
        Codec({k: v for k, v in TINY.items() if k != "upsample_rates"})
    with pytest.raises(ValueError, match="n_code_groups"):
        Codec(dict(TINY, n_code_groups=2))
    with pytest.raises(ValueError, match="global token"):
        Codec(dict(TINY, global_tokens=[3, 99]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_decode_and_stream(sd, dtype):
    c = Codec(TINY, device="cuda", dtype=dtype).load_folded_state_dict(sd)
    tok = torch.randint(0, 64, (33,))
    y = c.decode(tok)
    assert y.device.type == "cuda"
    ref = spec_generator(sd, tok)
    tol = 2e-4 if dtype == torch.float32 else 0.1
    assert (y.double().cpu() - ref).abs().max() < tol
    s = c.stream()
    parts = [s.push(tok[a:b]) for a, b in [(0, 1), (1, 1), (1, 7), (7, 20), (20, 33)]] + [s.flush()]
    torch.testing.assert_close(torch.cat(parts), y, rtol=0, atol=1e-3 if dtype == torch.float32 else 5e-2)

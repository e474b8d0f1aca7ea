"""Vision tower vs an independent InternViT + InternVL pixel-shuffle re-implementation (spec §3)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import max_errs


def _state(ckpt, prefix):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = h.get_tensor(k)
    return out


def internvl_pixel_shuffle(x, scale_factor=0.5):
    # verbatim structure of InternVL's view/permute sequence
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


def ref_encode(ckpt, pixel_values, heads=2, eps=1e-6, layers=2):
    vt = _state(ckpt, "model.vision_tower.vision_tower.")
    pj = _state(ckpt, "model.mm_projector.")
    x = pixel_values.double()
    W = {k: v.double() for k, v in vt.items()}
    p = F.conv2d(x, W["embeddings.patch_embedding.weight"], W["embeddings.patch_embedding.bias"], stride=14)
    N, C = p.shape[:2]
    p = p.reshape(N, C, -1).permute(0, 2, 1)
    x = torch.cat([W["embeddings.class_embedding"].repeat(N, 1, 1), p], 1) + W["embeddings.position_embedding"]
    L = x.shape[1]
    for i in range(layers):
        q = f"encoder.layers.{i}."
        h = F.layer_norm(x, (C,), W[q + "norm1.weight"], W[q + "norm1.bias"], eps)
        qkv = (h @ W[q + "attn.qkv.weight"].T + W[q + "attn.qkv.bias"]).reshape(N, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(C // heads), -1) @ qkv[2]
        a = a.transpose(1, 2).reshape(N, L, C) @ W[q + "attn.proj.weight"].T + W[q + "attn.proj.bias"]
        x = x + W[q + "ls1"] * a
        h = F.layer_norm(x, (C,), W[q + "norm2.weight"], W[q + "norm2.bias"], eps)
        m = F.gelu(h @ W[q + "mlp.fc1.weight"].T + W[q + "mlp.fc1.bias"]) @ W[q + "mlp.fc2.weight"].T + W[q + "mlp.fc2.bias"]
        x = x + W[q + "ls2"] * m
    f = x[:, 1:]
    g = int(f.shape[1] ** 0.5)
    f = internvl_pixel_shuffle(f.reshape(N, g, g, C) * 0.5).reshape(N, -1, 4 * C)
    P = {k: v.double() for k, v in pj.items()}
    f = F.gelu(f @ P["0.weight"].T + P["0.bias"]) @ P["2.weight"].T + P["2.bias"]
    return f


def test_pixel_shuffle_channel_order():
    from vita_engine.model.vision import pixel_shuffle

    x = torch.randn(2, 8, 8, 5)
    ref = internvl_pixel_shuffle(x).reshape(2, 16, 20)
    torch.testing.assert_close(pixel_shuffle(x), ref, rtol=0, atol=0)
    # spec §3: token r2*G2 + c2, channel (r%2)*2C + (c%2)*C + ch
    r, c, ch = 5, 2, 3
    assert pixel_shuffle(x)[1, (r // 2) * 4 + c // 2, (r % 2) * 10 + (c % 2) * 5 + ch] == x[1, r, c, ch]


def test_encode_matches_reference(tiny_ckpt, tiny_model):
    pv = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    out = tiny_model.vision.encode(pv)
    assert out.shape == (3, 4, 128)  # 4 tokens per 56² tile (256 per 448² tile at full size)
    assert tiny_model.vision.tokens_per_tile == 4
    ab, rel = max_errs(out, ref_encode(tiny_ckpt, pv))
    assert rel < 1e-5, (ab, rel)
    with tiny_model.reference():
        torch.testing.assert_close(tiny_model.vision.encode(pv), out, rtol=1e-5, atol=1e-5)


def _spec_tiles(img, size, max_num):
    """Spec §3 dynamic tiling, written independently: closest aspect ratio among i*j <= max_num,
    ties to the later grid when area > 0.5*size²*i*j; row-major tiles; thumbnail last."""
    from PIL import Image

    w, h = img.size
    grids = sorted({(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, bd = (1, 1), float("inf")
    for i, j in grids:
        dd = abs(w / h - i / j)
        if dd < bd:
            best, bd = (i, j), dd
        elif dd == bd and w * h > 0.5 * size * size * i * j:
            best = (i, j)
    i, j = best
    big = img.resize((size * i, size * j), Image.BICUBIC)
    tiles = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(j) for c in range(i)]
    if len(tiles) > 1:
        tiles.append(img.resize((size, size), Image.BICUBIC))
    return tiles


@pytest.mark.parametrize("hw,max_tiles,n", [((56, 112), 2, 3), ((56, 56), 2, 1), ((112, 56), 2, 3), ((100, 300), 12, 13), ((300, 100), 4, 4)])
def test_preprocess_tiling(tiny_model, hw, max_tiles, n):
    from PIL import Image

    a = np.random.RandomState(1).randint(0, 256, (*hw, 3), dtype=np.uint8)
    pv = tiny_model.vision.preprocess(a, max_tiles=max_tiles)
    assert pv.shape == (n, 3, 56, 56)
    tiles = _spec_tiles(Image.fromarray(a), 56, max_tiles)
    ref = torch.stack([torch.from_numpy(np.asarray(t, dtype=np.float32) / 255).permute(2, 0, 1) for t in tiles])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(pv, (ref - mean) / std)

"""InternViT-300M-448px vision tower + ×0.5 pixel shuffle + mlp2x_gelu projector, and the
dynamic-tiling image preprocessor (spec §3, §9.1-2, §11.8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ._ops import OpsHandle
from .config import VisionConfig

__all__ = ["VisionTower", "pixel_shuffle", "dynamic_tiles", "VT_PREFIX", "PROJ_PREFIX"]

VT_PREFIX = "model.vision_tower.vision_tower."
PROJ_PREFIX = "model.mm_projector."


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """[N, G, G, C] -> [N, (G/2)^2, 4C]: token r2*(G/2)+c2, channel (r%2)*2C + (c%2)*C + ch
    (the InternVL view/permute order with scale 0.5)."""
    N, G, G2, C = x.shape
    h = G // 2
    return x.reshape(N, h, 2, h, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(N, h * h, 4 * C)


def _closest_grid(aspect, ratios, width, height, size):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and area > 0.5 * size * size * r[0] * r[1]:
            best = r
    return best


def dynamic_tiles(image, size: int, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True):
    """InternVL `dynamic_preprocess`: PIL tiles in row-major order, thumbnail last (if >1 tile)."""
    from PIL import Image

    w, h = image.size
    ratios = sorted(
        set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if min_num <= i * j <= max_num),
        key=lambda r: r[0] * r[1],
    )
    gi, gj = _closest_grid(w / h, ratios, w, h, size)
    tw, th = size * gi, size * gj
    resized = image.resize((tw, th), Image.BICUBIC)
    cols = tw // size
    tiles = []
    for b in range(gi * gj):
        x0, y0 = (b % cols) * size, (b // cols) * size
        tiles.append(resized.crop((x0, y0, x0 + size, y0 + size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    return tiles


@dataclass
class _ViTLayer:
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: Optional[torch.Tensor]
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ls1: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    ls2: torch.Tensor


class VisionTower:
    """`encode(pixel_values [tiles,3,S,S]) -> [tiles, tokens, llm_hidden]`; `preprocess(image)`."""

    def __init__(self, config: VisionConfig, tensors: Dict[str, torch.Tensor], ops: OpsHandle):
        self.config, self.ops = config, ops
        t = tensors  # consumed
        p = VT_PREFIX
        self.class_embedding = t.pop(p + "embeddings.class_embedding")
        self.patch_w = t.pop(p + "embeddings.patch_embedding.weight")
        self.patch_b = t.pop(p + "embeddings.patch_embedding.bias")
        self.pos_embedding = t.pop(p + "embeddings.position_embedding")
        self.layers: List[_ViTLayer] = []
        for i in range(config.num_layers):
            q = f"{p}encoder.layers.{i}."
            self.layers.append(_ViTLayer(
                t.pop(q + "norm1.weight"), t.pop(q + "norm1.bias"),
                t.pop(q + "attn.qkv.weight"), t.pop(q + "attn.qkv.bias", None),
                t.pop(q + "attn.proj.weight"), t.pop(q + "attn.proj.bias"), t.pop(q + "ls1"),
                t.pop(q + "norm2.weight"), t.pop(q + "norm2.bias"),
                t.pop(q + "mlp.fc1.weight"), t.pop(q + "mlp.fc1.bias"),
                t.pop(q + "mlp.fc2.weight"), t.pop(q + "mlp.fc2.bias"), t.pop(q + "ls2"),
            ))
        self.proj0_w, self.proj0_b = t.pop(PROJ_PREFIX + "0.weight"), t.pop(PROJ_PREFIX + "0.bias")
        self.proj2_w, self.proj2_b = t.pop(PROJ_PREFIX + "2.weight"), t.pop(PROJ_PREFIX + "2.bias")
        self.device, self.dtype = self.patch_w.device, self.patch_w.dtype

    @staticmethod
    def expected_shapes(c: VisionConfig, llm_hidden: int) -> dict:
        p, C, I = VT_PREFIX, c.hidden_size, c.intermediate_size
        g = c.image_size // c.patch_size
        e = {
            p + "embeddings.class_embedding": (1, 1, C),
            p + "embeddings.patch_embedding.weight": (C, 3, c.patch_size, c.patch_size),
            p + "embeddings.patch_embedding.bias": (C,),
            p + "embeddings.position_embedding": (1, g * g + 1, C),
        }
        for i in range(c.num_layers):
            q = f"{p}encoder.layers.{i}."
            e.update({
                q + "norm1.weight": (C,), q + "norm1.bias": (C,), q + "norm2.weight": (C,), q + "norm2.bias": (C,),
                q + "attn.qkv.weight": (3 * C, C), q + "attn.proj.weight": (C, C), q + "attn.proj.bias": (C,),
                q + "mlp.fc1.weight": (I, C), q + "mlp.fc1.bias": (I,), q + "mlp.fc2.weight": (C, I), q + "mlp.fc2.bias": (C,),
                q + "ls1": (C,), q + "ls2": (C,),
            })
            if c.qkv_bias:
                e[q + "attn.qkv.bias"] = (3 * C,)
        mm = int(C / (c.downsample_ratio ** 2))
        e.update({PROJ_PREFIX + "0.weight": (llm_hidden, mm), PROJ_PREFIX + "0.bias": (llm_hidden,),
                  PROJ_PREFIX + "2.weight": (llm_hidden, llm_hidden), PROJ_PREFIX + "2.bias": (llm_hidden,)})
        return e

    @property
    def tokens_per_tile(self) -> int:
        g = self.config.image_size // self.config.patch_size
        return (g // 2) ** 2

    # ---- preprocessing -----------------------------------------------------------------------------
    def preprocess(self, image, max_tiles: Optional[int] = 12) -> torch.Tensor:
        """PIL image or HxWx3 uint8 array -> pixel_values [tiles, 3, S, S] (float32, CLIP-normalised):
        dynamic tiling (1..max_tiles grid, closest aspect ratio), thumbnail last. The default 12 is
        VITA's own demo call (`dynamic_preprocess(max_num=12)`); None: the checkpoint's
        `max_dynamic_patch` (what the engine uses)."""
        from PIL import Image

        if isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        if isinstance(image, np.ndarray):
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
                raise ValueError(f"vision.preprocess: image array must be HxWx3 (or HxW, HxWx4) uint8, got shape {image.shape}")
            if image.dtype != np.uint8:
                raise TypeError(f"vision.preprocess: image array must be uint8, got {image.dtype}")
            image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"vision.preprocess: image must be a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
        c = self.config
        mt = c.max_tiles if max_tiles is None else max_tiles
        if isinstance(mt, bool) or not isinstance(mt, (int, np.integer)) or mt < 1:
            raise ValueError(f"vision.preprocess: max_tiles must be an integer >= 1 (or None), got {max_tiles!r}")
        image = image.convert("RGB")
        tiles = dynamic_tiles(image, c.image_size, max_num=int(mt), use_thumbnail=c.use_thumbnail)
        return self.normalize(tiles)

    def normalize(self, tiles) -> torch.Tensor:
        """CLIPImageProcessor on S×S tiles: resize shortest edge (bicubic), centre crop, /255, mean/std."""
        from PIL import Image

        S = self.config.image_size
        out = []
        for t in tiles:
            t = t.convert("RGB")
            if t.size != (S, S):
                # transformers' get_resize_output_image_size: short edge -> S, long edge truncated
                # int(S * long / short) (not rounded: a rounded edge shifts the centre crop by a pixel)
                w, h = t.size
                if w <= h:
                    nw, nh = S, int(S * h / w)
                else:
                    nw, nh = int(S * w / h), S
                t = t.resize((nw, nh), Image.BICUBIC)
                w, h = t.size
                l, tp = (w - S) // 2, (h - S) // 2
                t = t.crop((l, tp, l + S, tp + S))
            a = np.asarray(t, dtype=np.float32) / 255.0
            out.append(torch.from_numpy(a).permute(2, 0, 1))
        x = torch.stack(out)
        mean = torch.tensor(self.config.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x - mean) / std

    # ---- forward -----------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: callers may feed the output to autograd-enabled code
    def vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT: [N,3,S,S] -> last hidden states [N, 1+G², C] (no final norm)."""
        c, ops = self.config, self.ops
        x = pixel_values.to(self.device, self.dtype)
        N = x.shape[0]
        x = F.conv2d(x, self.patch_w, self.patch_b, stride=c.patch_size)  # [N, C, g, g]
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        C = x.shape[-1]
        x = torch.cat([self.class_embedding.expand(N, 1, C), x], 1)
        pos = self.pos_embedding
        g0 = int(round((pos.shape[1] - 1) ** 0.5))
        if g0 != g:  # bicubic resize of the patch grid (identity at the native size)
            pp = pos[:, 1:].reshape(1, g0, g0, C).permute(0, 3, 1, 2).float()
            pp = F.interpolate(pp, size=(g, g), mode="bicubic", align_corners=False).to(pos.dtype)
            pos = torch.cat([pos[:, :1], pp.reshape(1, C, g * g).transpose(1, 2)], 1)
        x = x + pos
        L = x.shape[1]
        H = c.num_heads
        D = C // H
        cu = torch.arange(0, N + 1, dtype=torch.int32, device=self.device) * L
        x = x.reshape(N * L, C)
        eps = c.layer_norm_eps
        for ly in self.layers:
            h = F.layer_norm(x, (C,), ly.norm1_w, ly.norm1_b, eps)
            qkv = F.linear(h, ly.qkv_w, ly.qkv_b).view(N * L, 3, H, D)
            q, k, v = (qkv[:, j].contiguous() for j in range(3))
            o = ops.varlen_attention(q, k, v, cu, causal=False)
            x = x + ly.ls1 * F.linear(o.reshape(N * L, C), ly.proj_w, ly.proj_b)
            h = F.layer_norm(x, (C,), ly.norm2_w, ly.norm2_b, eps)
            x = x + ly.ls2 * F.linear(F.gelu(F.linear(h, ly.fc1_w, ly.fc1_b)), ly.fc2_w, ly.fc2_b)
        return x.view(N, L, C)

    def check_pixel_values(self, pixel_values) -> torch.Tensor:
        """pixel_values must be a float [tiles, 3, S, S] tensor, S a multiple of 2 * patch_size."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"vision.encode: pixel_values must be a torch tensor [tiles, 3, S, S], got {type(pixel_values).__name__}")
        x = pixel_values
        p = self.config.patch_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] % (2 * p) or x.shape[0] == 0:
            raise ValueError(f"vision.encode: pixel_values must be [tiles >= 1, 3, S, S] with S a multiple of {2 * p} "
                             f"(S = {self.config.image_size} for this tower), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"vision.encode: pixel_values must be a float tensor (from preprocess), got {x.dtype}")
        return x

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles, tokens_per_tile, llm_hidden]."""
        h = self.vit(self.check_pixel_values(pixel_values))[:, 1:]
        N, L, C = h.shape
        g = int(round(L ** 0.5))
        f = pixel_shuffle(h.reshape(N, g, g, C) * self.config.scale_pix_shuffle)
        f = F.linear(F.gelu(F.linear(f, self.proj0_w, self.proj0_b)), self.proj2_w, self.proj2_b)
        return f

"""One TTS AR step at the real sizes (hidden 896, 14 heads x 64, FFN 4864, 4 AR layers, V = 1024 + 4;
random weights), batch 1 and 16, each stream prefilled with a 20-token text segment (prefix 81).

Ours: `TTSBatchDecoder.step()` (paged KV, store_kv + paged_attention, fused row ops, sample_tokens,
one host sync). Reference: `models.TorchTTS`, the same step in plain torch with a preallocated
dense K/V cache and SDPA. Both are pinned to the first step, so every call does the same work."""
from __future__ import annotations

import torch

from ..harness import Case
from ..models import EngineStep, TorchTTS, cached, texts_for
from ._spec import Spec, dtype_name, rel_err

TEXT_LEN = 20


def step_case(tts, batch: int, text_len: int = TEXT_LEN, name: str = None) -> Case:
    """Ours vs TorchTTS for any loaded TTSDecoder whose eos is disabled (models.no_eos)."""
    ours = EngineStep(tts, batch, text_len)
    ref = TorchTTS(tts, batch, text_len, kv_from=ours)
    c, es = tts.config, tts.embedding.element_size()
    per_layer = 4 * c.hidden * c.hidden + 3 * c.hidden * c.intermediate  # qkv + o, gate|up + down
    weights = (len(tts.ar_layers) * per_layer + (c.odim + 4) * c.hidden) * es
    kv = 2 * len(tts.ar_layers) * batch * ref.P * c.hidden * es

    def check():  # first-step logits of stream 0: the torch step vs the engine's teacher forcing
        want = tts.ar_logits(texts_for(tts, 1, text_len)[0], [])[0].float()
        got = ref.logits()[0]
        keep = torch.isfinite(got)
        keep[tts.eos] = False  # no_eos moved that bias
        return rel_err(got[keep], want[keep])

    shape = f"batch {batch}, hidden {c.hidden}, {c.num_heads} heads, FFN {c.intermediate}, {len(tts.ar_layers)} AR layers, kv {ref.P + 1}"
    return Case(name or f"tts_ar_step_b{batch}", "tts_step", dtype_name(tts.dtype), shape, ours, {"torch_static_cache": ref.step},
                bytes=weights + kv, flops=2 * batch * weights / es, check=check)


def _step(batch: int):
    return lambda device, dtype: step_case(cached("tts", device, dtype), batch)


SPECS = [
    Spec("tts_ar_step_b1", "tts_step", _step(1)),
    Spec("tts_ar_step_b16", "tts_step", _step(16)),
]

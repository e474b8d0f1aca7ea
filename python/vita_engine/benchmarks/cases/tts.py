"""One TTS AR step at the real sizes (hidden 896, 14 heads x 64, FFN 4864, 4 AR layers, V = 1024 + 4;
random weights), batch 1 and 16, each stream prefilled with a 20-token text segment (prefix 81).

Ours: `TTSBatchDecoder.step()` (paged KV, store_kv + paged_attention, fused row ops, sample_tokens,
one host sync). Reference: `models.TorchTTS`, the same step in plain torch with a preallocated
dense K/V cache and SDPA. Both are pinned to the first step, so every call does the same work."""
from __future__ import annotations

import torch

from ..harness import Case
from ..models import REAL_TTS, EngineStep, TorchTTS, cached, texts_for
from ._spec import Spec, dtype_name, rel_err

TEXT_LEN = 20


def _step(batch: int):
    def build(device, dtype):
        tts = cached("tts", device, dtype)
        ours = EngineStep(tts, batch, TEXT_LEN)
        ref = TorchTTS(tts, batch, TEXT_LEN, kv_from=ours)
        c, es = tts.config, torch.empty((), dtype=dtype).element_size()
        per_layer = 4 * c.hidden * c.hidden + 3 * c.hidden * c.intermediate  # qkv + o, gate|up + down
        weights = (len(tts.ar_layers) * per_layer + (c.odim + 4) * c.hidden) * es
        kv = 2 * len(tts.ar_layers) * batch * ref.P * c.hidden * es

        def check():  # first-step logits of stream 0: the torch step vs the engine's teacher forcing
            want = tts.ar_logits(texts_for(tts, 1, TEXT_LEN)[0], [])[0].float()
            got = ref.logits()[0]
            keep = torch.isfinite(got)
            keep[tts.eos] = False  # no_eos moved that bias
            return rel_err(got[keep], want[keep])

        R = REAL_TTS
        shape = f"batch {batch}, hidden {R['hidden']}, {R['heads']} heads, FFN {R['inter']}, {R['blocks']} AR layers, kv {ref.P + 1}"
        return Case(f"tts_ar_step_b{batch}", "tts_step", dtype_name(dtype), shape, ours, {"torch_static_cache": ref.step},
                    bytes=weights + kv, flops=2 * batch * weights / es, check=check)
    return build


SPECS = [
    Spec("tts_ar_step_b1", "tts_step", _step(1)),
    Spec("tts_ar_step_b16", "tts_step", _step(16)),
]

"""Token sampling for a decode batch of 16 rows: greedy and temperature sampling over the LLM
vocabulary (152064), top-2 over the TTS vocabulary (1024 + 4). float32 logits, as the models emit.

References: argmax; softmax + torch.multinomial, or the exponential-race form of the Gumbel-max
trick (argmax of p / Exp(1), as gpt-fast / vLLM do), fastest counted; topk + softmax + multinomial.
The draws differ from ours (different random streams), the work is the same."""
from __future__ import annotations

import torch

from ..harness import Case
from ._spec import Spec, randn

B, LLM_VOCAB, TTS_VOCAB = 16, 152064, 1028


def _greedy(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(20)
    x = randn(g, B, LLM_VOCAB, device=device, scale=3.0)
    ours = lambda: ops.sample_tokens(x, temperature=0.0)  # noqa: E731
    ref = lambda: x.argmax(-1)  # noqa: E731
    return Case("sample_greedy_v152k", "sample_tokens", "float32", f"[{B}, {LLM_VOCAB}] greedy", ours, {"argmax": ref},
                bytes=x.numel() * 4, check=lambda: float((ours() != ref()).any()))


def _temperature(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(21)
    x = randn(g, B, LLM_VOCAB, device=device, scale=3.0)
    t = 0.7

    def multinomial():
        return torch.multinomial(torch.softmax(x / t, -1), 1).squeeze(1)

    def exp_race():
        p = torch.softmax(x / t, -1)
        return (p / torch.empty_like(p).exponential_()).argmax(-1)

    return Case("sample_t0.7_v152k", "sample_tokens", "float32", f"[{B}, {LLM_VOCAB}] temperature 0.7, whole vocabulary",
                lambda: ops.sample_tokens(x, temperature=t, top_k=0, seed=1, step=3), {"multinomial": multinomial, "exp_race": exp_race},
                bytes=x.numel() * 4)


def _top2(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(22)
    x = randn(g, B, TTS_VOCAB, device=device, scale=3.0)

    def topk():
        v, i = x.topk(2, -1)
        return i.gather(-1, torch.multinomial(torch.softmax(v, -1), 1)).squeeze(1)

    return Case("sample_top2_v1028", "sample_tokens", "float32", f"[{B}, {TTS_VOCAB}] top-2 (TTS)",
                lambda: ops.sample_tokens(x, temperature=1.0, top_k=2, seed=1, step=3), {"topk+multinomial": topk},
                bytes=x.numel() * 4)


SPECS = [
    Spec("sample_greedy_v152k", "sample_tokens", _greedy, dtypes=("float32",)),
    Spec("sample_t0.7_v152k", "sample_tokens", _temperature, dtypes=("float32",)),
    Spec("sample_top2_v1028", "sample_tokens", _top2, dtypes=("float32",)),
]

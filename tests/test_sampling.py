"""sample_tokens: greedy / top-k / full-vocabulary Gumbel-max draws with a Philox counter RNG."""
import math

import pytest
import torch

from vita_engine import ops
from vita_engine.ops import reference as ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_matches_argmax(device, dtype):
    logits = torch.randn(9, 1003).to(dtype=dtype, device=device)
    logits[3, 17] = logits[3, 500] = 100.0  # tie -> smallest id
    got = ops.sample_tokens(logits, temperature=0.0)
    assert got.dtype == torch.int64 and got.device == logits.device
    assert got.tolist() == ref.sample_tokens(logits.cpu(), temperature=0.0).tolist()
    assert got[3].item() == 17


@pytest.mark.parametrize("top_k", [1, 2, 5, 0])
def test_matches_reference_draws(device, top_k):
    torch.manual_seed(0)
    logits = torch.randn(16, 257, device=device) * 2
    for step in (0, 1, 12345):
        got = ops.sample_tokens(logits, temperature=0.7, top_k=top_k, seed=99, step=step)
        want = ref.sample_tokens(logits.cpu(), temperature=0.7, top_k=top_k, seed=99, step=step)
        assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3, 33, 34, 66, 1028, 1029])
def test_top2_ties_and_nan_match_reference(device, dtype, vocab):
    # The top-2 fast path (block-max skipping) must keep exactly the general top-k candidates: ties go
    # to the smaller id, the winners may sit in any block or the tail, and a NaN row takes the general path.
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (12, vocab), generator=g).float()  # many ties
    logits[0, -1] = logits[1, 0] = logits[1, -2] = 9.0  # winners at the ends, tied
    logits[2] = 1.0  # all equal
    logits[3, vocab // 2] = 50.0
    logits = logits.to(dtype)
    for step in (0, 5, 777):
        got = ops.sample_tokens(logits.to(device), temperature=0.9, top_k=2, seed=3, step=step)
        want = ref.sample_tokens(logits, temperature=0.9, top_k=2, seed=3, step=step)
        assert got.cpu().tolist() == want.tolist()
    with_nan = logits.clone()
    with_nan[4, vocab // 3] = float("nan")
    nan_rows = ops.sample_tokens(with_nan.to(device), temperature=0.9, top_k=2, seed=3, step=1).cpu()
    clean = ops.sample_tokens(logits.to(device), temperature=0.9, top_k=2, seed=3, step=1).cpu()
    assert torch.equal(torch.cat([nan_rows[:4], nan_rows[5:]]), torch.cat([clean[:4], clean[5:]]))
    assert 0 <= nan_rows[4].item() < vocab


def test_philox_known_answer():
    # Philox-4x32-10 known-answer vector (Random123): counter 0, key 0
    from vita_engine.ops.reference import _mulhilo

    c = [torch.tensor(0)] * 4
    k0 = k1 = 0
    c0, c1, c2, c3 = c
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    assert [int(x) for x in (c0, c1, c2, c3)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_top2_frequencies_follow_softmax():
    # k = 2 (the TTS): the two candidates must be drawn with their softmax probabilities.
    logits = torch.tensor([[0.0, 1.0, -5.0, 0.3]])
    n = 4000
    draws = torch.stack([ops.sample_tokens(logits, top_k=2, seed=7, step=s) for s in range(n)]).flatten()
    assert set(draws.tolist()) <= {1, 3}
    p1 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.3))
    frac = (draws == 1).float().mean().item()
    assert abs(frac - p1) < 4 * math.sqrt(p1 * (1 - p1) / n)


def test_full_vocab_frequencies_and_temperature():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]]))
    n = 3000
    d = torch.stack([ops.sample_tokens(logits, seed=3, step=s) for s in range(n)]).flatten()
    freq = torch.bincount(d, minlength=3).float() / n
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.035)
    cold = torch.stack([ops.sample_tokens(logits, temperature=0.05, seed=3, step=s) for s in range(300)]).flatten()
    assert (cold == 2).all()


def test_reproducible_and_batch_independent(device):
    logits = torch.randn(6, 100, device=device)
    seeds = torch.arange(6, device=device) * 1000 + 1
    steps = torch.arange(6, device=device)
    a = ops.sample_tokens(logits, top_k=2, seed=seeds, step=steps)
    b = ops.sample_tokens(logits, top_k=2, seed=seeds, step=steps)
    assert torch.equal(a, b)
    # row 4 alone gives the same draw as inside the batch
    alone = ops.sample_tokens(logits[4:5], top_k=2, seed=seeds[4:5], step=steps[4:5])
    assert alone.item() == a[4].item()
    other = ops.sample_tokens(logits, top_k=0, seed=seeds + 1, step=steps)
    assert not torch.equal(other, ops.sample_tokens(logits, top_k=0, seed=seeds, step=steps))


def test_sampling_bad_arguments():
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.sample_tokens(torch.randn(5))
    with pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
        ops.sample_tokens(torch.randint(0, 5, (2, 5)))
    with pytest.raises(ValueError, match="seed dim 0 .batch of logits. must be 2"):
        ops.sample_tokens(torch.randn(2, 5), seed=torch.tensor([1, 2, 3]))


def test_uniform_is_never_one():
    # philox_uniform once mapped 24 bits to (v + 0.5) / 2^24, whose top bucket rounds to exactly 1.0:
    # the Gumbel noise was +inf and that token won whatever its logit. (seed 7, step 4772) draws the
    # top raw value at index 1380.
    u = ref.philox_uniform(7, 4772, torch.tensor([1380]))
    assert 0.0 < u.item() < 1.0
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    logits = torch.zeros(1, 4096)
    logits[0, 0], logits[0, 1380] = 30.0, -30.0  # token 1380 has probability ~e^-60
    for device_logits in [logits] + ([logits.cuda()] if torch.cuda.is_available() else []):
        assert ops.sample_tokens(device_logits, temperature=1.0, top_k=0, seed=7, step=4772).item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_vocab_draws_match_reference_at_llm_size(device, dtype):
    # The CPU whole-vocabulary path scores only the tokens that can still win (x / t within the
    # largest Gumbel noise of the best score so far): the draw must be the one of scoring all of them,
    # at the LLM's vocabulary and temperatures, with infinities, NaNs and ties mixed in.
    V = 152064
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(10, V, generator=g) * 3
    logits[1] = torch.randn(V, generator=g) * 0.01  # flat: most tokens are candidates
    logits[2, 1000:] = -float("inf")  # the winner among a few finite tokens
    logits[3, ::7] = float("nan")
    logits[4, 77] = logits[4, 99999] = float("inf")  # two +inf: the smaller id
    logits[5] = 0.0  # all tied
    logits[6] = -float("inf")
    logits[6, 12345] = -1e30
    logits[7] = torch.randn(V, generator=g) * 40  # peaked
    logits[8, 3] = 1e30
    logits = logits.to(dtype)
    temps = torch.tensor([0.7, 1.0, 0.05, 0.7, 1.3, 1.0, 0.7, 2.0, 0.7, 1e-3])
    for step in (0, 9):
        got = ops.sample_tokens(logits.to(device), temperature=temps.to(device), top_k=0, seed=123, step=step).cpu()
        # (the reference has no NaN rule; a NaN token never wins, as a -inf one)
        clean = torch.where(logits.isnan(), torch.full_like(logits, -float("inf")), logits)
        want = [ref.sample_tokens(clean[b:b + 1], temperature=float(temps[b]), top_k=0, seed=123, step=step).item() for b in range(10)]
        assert got.tolist() == want
    assert got[2].item() < 1000 and got[4].item() == 77 and got[6].item() == 12345 and got[8].item() == 3

"""The bundled tiny model behaves like the real one where the runtime depends on it (issue 11 item 5):
the codec has the real generator structure (x600 hop, the real 13-token streaming look-ahead) and the
random TTS stops by itself (eos) after a speech-like number of codec tokens per text token."""
import torch

from vita_engine.testing import TINY, TINY_CODEC_TOKENS_PER_TEXT_TOKEN


def test_tts_speaks_about_12_codec_tokens_per_text_token(tiny_model):
    tts = tiny_model.tts
    g = torch.Generator().manual_seed(7)
    ratios = []
    for n in (3, 24):
        for seed in range(3):
            ids = torch.randint(0, 1000, (n,), generator=g)
            toks = tts.generate(ids, max_tokens=1000, seed=seed)
            assert len(toks) < 1000, "the segment must end on eos, not on the cap"
            assert all(0 <= t < tts.config.odim for t in toks)
            ratios.append(len(toks) / n)
    # speech: ~40 codec tokens/s at ~3-4 text tokens/s
    assert all(0.6 * TINY_CODEC_TOKENS_PER_TEXT_TOKEN <= r <= 1.5 * TINY_CODEC_TOKENS_PER_TEXT_TOKEN for r in ratios), ratios


def test_tts_length_follows_the_text(tiny_model):
    """Longer text, longer speech (not a fixed-hazard eos): 40 text tokens speak ~10x longer than 4."""
    tts = tiny_model.tts
    g = torch.Generator().manual_seed(3)
    short = tts.generate(torch.randint(0, 1000, (4,), generator=g), seed=1)
    long = tts.generate(torch.randint(0, 1000, (40,), generator=g), seed=1)
    assert 6 <= len(long) / len(short) <= 14, (len(short), len(long))


def test_tts_codec_tokens_vary(tiny_model):
    """The eos circuit leaves the token choice random: an answer is not one repeated code."""
    toks = tiny_model.tts.generate(torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(5)), seed=2)
    assert len(set(toks)) >= 8, toks


def test_codec_streams_with_the_real_lookahead(tiny_model):
    c = tiny_model.codec
    assert TINY["codec"]["upsample_rates"] == [8, 5, 5, 3] and c.hop_length == 600
    assert c.lookahead_tokens == 13 and c.lookahead_samples == 7798  # as the real configuration
    toks = torch.randint(0, c.n_codes, (40,), generator=torch.Generator().manual_seed(0))
    ref = c.decode(toks)
    s = c.stream()
    parts, n = [], 0
    for k in (1, 5, 1, 12, 3, 18):
        parts.append(s.push(toks[n:n + k]))
        n += k
        # samples leave as soon as their receptive field is complete, not before
        assert s.samples_emitted == max(0, n * c.hop_length - c.lookahead_samples), n
    parts.append(s.flush())
    y = torch.cat(parts)
    assert y.shape == ref.shape == (40 * 600,)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


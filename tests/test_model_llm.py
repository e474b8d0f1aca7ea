"""The LLM against Hugging Face transformers' Qwen2ForCausalLM (logits + greedy paged generate)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import max_errs  # noqa: E402


@pytest.fixture(scope="module")
def hf_qwen(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=256, vocab_size=1024, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=512)
    m = Qwen2ForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf_qwen2")
    m.save_pretrained(d)
    return m, d


def test_logits_match_hf(hf_qwen):
    from vita_engine import LLM

    hf, d = hf_qwen
    llm = LLM.from_pretrained(d)
    ids = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    out = llm.logits(ids)
    assert out.shape == (40, 1024)
    ab, rel = max_errs(out, ref)
    assert rel < 1e-5, (ab, rel)
    # inputs_embeds path and the pure-torch reference ops give the same numbers
    torch.testing.assert_close(llm.logits(inputs_embeds=llm.embed(ids)), out)
    with llm.ops.reference():
        ab2, rel2 = max_errs(llm.logits(ids), ref)
    assert rel2 < 1e-5


def test_greedy_generate_matches_hf(hf_qwen):
    from vita_engine import LLM

    hf, d = hf_qwen
    llm = LLM.from_pretrained(d)
    ids = torch.randint(0, 1024, (12,), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(ids[None], max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    mine = llm.generate(ids, max_new_tokens=32, temperature=0.0, block_size=8)  # several blocks: paging exercised
    assert len(ref) == 32
    assert mine == ref


def test_paged_prefill_decode_equals_full_forward(hf_qwen):
    from vita_engine import LLM

    _, d = hf_qwen
    llm = LLM.from_pretrained(d)
    ids = torch.randint(0, 1024, (21,), generator=torch.Generator().manual_seed(3))
    full = llm.logits(ids)
    cache = llm.new_cache(64, block_size=4)
    cache.free.reverse()  # non-contiguous block order
    seq = cache.new_sequence()
    a = llm.forward_cached(seq, llm.embed(ids[:13]))  # chunked prefill
    b = llm.forward_cached(seq, llm.embed(ids[13:17]))  # continuation chunk
    c = torch.cat([llm.forward_cached(seq, llm.embed(ids[i : i + 1])) for i in range(17, 21)])  # decode steps
    torch.testing.assert_close(torch.cat([a, b, c]), full, rtol=1e-4, atol=1e-4)


def test_tiny_vita_llm_matches_hf(tiny_ckpt, tiny_model):
    """The LLM part of the VITA checkpoint, loaded into HF Qwen2 from the same safetensors."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import json
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    hcfg = Qwen2Config(**{k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                              "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings")})
    hf = Qwen2ForCausalLM(hcfg).eval()
    sd = {}
    for f in sorted(tiny_ckpt.glob("*.safetensors")):
        sd.update({k: v for k, v in load_file(f).items() if k.startswith("model.layers.") or k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    ids = torch.randint(0, 1024, (17,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ab, rel = max_errs(tiny_model.llm.logits(ids), ref)
    assert rel < 1e-5, (ab, rel)

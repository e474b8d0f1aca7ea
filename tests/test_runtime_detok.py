"""Streamed answer text: multi-byte characters split across tokens never show up as U+FFFD in a
TextDelta (unless the full decode has it), and the deltas concatenate to the full decode exactly."""
import pytest
import torch

from vita_engine.runtime import TextDelta

from runtime_util import make_engine, one_thread  # noqa: F401


def _bytes_to_unicode():
    """GPT-2 byte-level alphabet: byte -> printable char (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_ids(fmt, text: str):
    """One token per UTF-8 byte of `text` (so every multi-byte character is split across tokens)."""
    b2u = _bytes_to_unicode()
    ids = [fmt.tok.token_to_id(b2u[b]) for b in text.encode("utf-8")]
    assert None not in ids, "the tiny tokenizer has no single-byte token"
    return ids


@pytest.fixture(scope="module")
def fmt(tiny_ckpt):
    from vita_engine.runtime.chat import ChatFormat

    return ChatFormat(tiny_ckpt)


@pytest.mark.parametrize("text,cut", [("hé 世界 €!", 0), ("ok 世界 €", 1), ("☞ 你好 ok", 0), ("a😀b", 2)])
def test_incremental_detokenizer_split_utf8(fmt, text, cut):
    from vita_engine.runtime.chat import IncrementalDetokenizer

    ids = byte_ids(fmt, text)
    if cut:
        ids = ids[:-cut]  # the answer stops in the middle of a character
    d = IncrementalDetokenizer(fmt)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.flush())
    full = fmt.decode(ids)
    if full.startswith("☞"):
        full = full.lstrip("☞").lstrip(" ")
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in x for x in deltas), deltas
    else:
        assert not any("\ufffd" in x for x in deltas[:-1]) and deltas[-1].endswith("\ufffd"), deltas
    assert d.mismatches == 0
    # text before a split character is not held back longer than the character itself
    if not cut:
        assert "".join(deltas[:len(byte_ids(fmt, text[:2]))]) == text[:2].lstrip("☞").lstrip(" ")


def test_engine_deltas_and_tts_text_are_clean(tiny_ckpt, one_thread, monkeypatch):  # noqa: F811
    """Scripted LLM tokens (one per UTF-8 byte) through the real scheduler: the streamed deltas equal
    decode(answer ids), and the text handed to the TTS has no U+FFFD either; an answer cut by
    max_new_tokens in the middle of a character still delivers its tail."""
    import vita_engine.ops as ops
    from vita_engine.runtime.llm_stage import LLMStage

    e = make_engine(tiny_ckpt, tts_max_tokens=4)
    try:
        fmt = e.chat
        tts_vocab = int(e.tts._logit_mask.numel())
        stop = min(fmt.stop_ids)
        script = []
        orig = ops.sample_tokens

        def fake_sample(logits, *a, **k):
            out = orig(logits, *a, **k)
            if logits.shape[-1] == tts_vocab:
                return out
            steps = k["step"].tolist()  # the session's generation step: 0 = the answer's first token
            return torch.tensor([script[s] if s < len(script) else stop for s in steps], dtype=out.dtype, device=out.device)

        segs = []
        orig_add = LLMStage.add_segment

        def add_segment(self, st, t, text, tok_end):
            segs.append(text)
            return orig_add(self, st, t, text, tok_end)

        monkeypatch.setattr(ops, "sample_tokens", fake_sample)
        monkeypatch.setattr(LLMStage, "add_segment", add_segment)
        for text, cut in (("hé 世界, ça va? 你好!", 0), ("ok 世界 €", 1)):
            ids = byte_ids(fmt, text)
            if cut:
                ids = ids[:-cut]
            script[:] = ids
            segs.clear()
            s = e.session(seed=0, max_new_tokens=len(ids) if cut else 64)
            try:
                evs = s.run_turn(text="hi", timeout=60).events
            finally:
                s.close()
            deltas = [ev.text for ev in evs if isinstance(ev, TextDelta)]
            full = fmt.decode(ids)
            assert "".join(deltas) == full, (deltas, full)
            assert not any("\ufffd" in x for x in (deltas[:-1] if cut else deltas)), deltas
            # the TTS saw the same clean text (its letters/digits, in order)
            alnum = lambda x: "".join(ch for ch in x.lower() if ch.isalnum())  # noqa: E731
            assert segs and not any("\ufffd" in x for x in (segs[:-1] if cut else segs)), segs
            assert alnum("".join(segs)) == alnum(full), (segs, full)
    finally:
        e.close()

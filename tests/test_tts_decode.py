"""Batched TTS AR decoding (TTSBatchDecoder) and the text -> TTS segmenter.

Teacher-forced logits vs an independent re-implementation live in test_model_tts.py; here: batching
never changes a stream's tokens, reproducibility, eos/cap, release, capacity and bad inputs."""
import pytest
import torch

from vita_engine.model.tts_batch import TTSBatchDecoder, TTSCapacityError
from vita_engine.runtime.text_segmenter import TextSegmenter, normalize_tts_text

CAP = 16
TEXTS = [[5], [7, 8, 9], [100, 3, 44, 12, 9, 1, 2], [11] * 12]
SEEDS = [0, 7, 123456789, 2**40 + 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny shapes: torch's intra-op threads only add contention on a loaded 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tts(tiny_model):
    return tiny_model.tts


@pytest.fixture(scope="module")
def alone(tts):
    """Each (text, seed) decoded alone by generate (a 1-stream decoder)."""
    return [tts.generate(t, max_tokens=CAP, seed=s) for t, s in zip(TEXTS, SEEDS)]


def run_all(dec, record=None):
    while True:
        r = dec.step()
        if not r:
            return
        if record is not None:
            for sid, t in r.items():
                record.setdefault(sid, []).append(t)


def test_batched_equals_alone_staggered(tts, alone):
    assert all(len(a) > 0 for a in alone)
    dec = TTSBatchDecoder(tts, max_streams=4, max_tokens=CAP)
    total = dec.free_blocks
    seen = {}
    sids = {0: dec.start(TEXTS[0], seed=SEEDS[0])}
    for tick in range(200):
        if tick == 3:
            sids[1] = dec.start(TEXTS[1], seed=SEEDS[1])
        if tick == 5:  # two segments prefilled in one packed call
            sids[2], sids[3] = dec.start_many(TEXTS[2:], SEEDS[2:])
        r = dec.step()
        for sid, t in r.items():
            seen.setdefault(sid, []).append(t)
        if tick > 5 and not r:
            break
    for i, sid in sids.items():
        assert dec.finished(sid)
        assert dec.tokens(sid) == alone[i], i
        # exactly one None, at the end; tokens are codec ids
        assert seen[sid][:-1] == alone[i] and seen[sid][-1] is None
        assert all(0 <= t < tts.config.odim for t in alone[i])
    assert dec.free_blocks == total  # finished streams give their pages back at once
    assert dec.active() == sorted(sids.values())
    for sid in sids.values():
        dec.release(sid)
    assert dec.active() == [] and dec.free_blocks == total


def test_seeded_reproducibility_and_generate_equals_decoder(tts, alone):
    assert tts.generate(TEXTS[2], max_tokens=CAP, seed=SEEDS[2]) == alone[2]
    dec = TTSBatchDecoder(tts, max_streams=1, max_tokens=CAP)
    sid = dec.start(TEXTS[2], seed=SEEDS[2])
    run_all(dec)
    assert dec.tokens(sid) == alone[2]
    others = {tuple(tts.generate(TEXTS[2], max_tokens=CAP, seed=s)) for s in (1, 2, 3)}
    assert len(others | {tuple(alone[2])}) > 1  # the seed matters


def test_step_subset_and_own_step_index(tts, alone):
    """Stepping streams at different rates (explicit stream_ids) still gives each its solo tokens."""
    dec = TTSBatchDecoder(tts, max_streams=2, max_tokens=CAP)
    a, b = dec.start(TEXTS[1], seed=SEEDS[1]), dec.start(TEXTS[3], seed=SEEDS[3])
    for _ in range(3):
        dec.step([a])
    assert len(dec.tokens(b)) == 0
    run_all(dec)
    assert dec.tokens(a) == alone[1] and dec.tokens(b) == alone[3]
    assert dec.step([a, b]) == {a: None, b: None}  # finished streams: None, no work


def test_eos_stops(tts, tiny_model):
    old = tts.out_b
    try:
        b = old.clone()
        b[tts.eos] = 1e4  # eos always wins
        tts.out_b = b
        dec = TTSBatchDecoder(tts, max_streams=2, max_tokens=CAP)
        total = dec.free_blocks
        sid = dec.start(TEXTS[1], seed=0)
        assert dec.free_blocks < total
        assert dec.step() == {sid: None}
        assert dec.finished(sid) and dec.tokens(sid) == [] and dec.free_blocks == total
        assert dec.step() == {}
        assert tts.generate(TEXTS[1], max_tokens=CAP, seed=0) == []
    finally:
        tts.out_b = old


def test_eos_after_some_tokens(tts):
    """Eos that becomes likely only after a few steps: tokens stop right before it."""
    old = tts.out_b
    try:
        b = old.clone()
        b[tts.eos] = 3.0
        tts.out_b = b
        outs = [tts.generate(t, max_tokens=CAP, seed=s) for t, s in zip(TEXTS, SEEDS)]
        assert any(0 < len(o) < CAP for o in outs), outs
        for t, s, o in zip(TEXTS, SEEDS, outs):
            if len(o) < CAP:  # stopped on eos: teacher-forced top-2 at the next step holds eos
                lg = tts.ar_logits(t, o)[len(o)]
                assert tts.eos in lg.topk(2).indices.tolist()
    finally:
        tts.out_b = old


def test_cap(tts, alone):
    dec = TTSBatchDecoder(tts, max_streams=1, max_tokens=3)
    sid = dec.start(TEXTS[0], seed=SEEDS[0])
    got = [dec.step()[sid] for _ in range(4)]
    assert got[:3] == alone[0][:3] and got[3] is None and dec.finished(sid)
    assert tts.generate(TEXTS[0], max_tokens=3, seed=SEEDS[0]) == alone[0][:3]
    assert tts.generate(TEXTS[0], max_tokens=0) == []


def test_release_mid_generation(tts, alone):
    dec = TTSBatchDecoder(tts, max_streams=3, max_tokens=CAP)
    total = dec.free_blocks
    s = dec.start_many(TEXTS[:3], SEEDS[:3])
    for _ in range(4):
        dec.step()
    before = dec.free_blocks
    dec.release(s[1])  # barge-in
    assert dec.free_blocks > before
    assert dec.active() == [s[0], s[2]]
    dec.release(s[1])  # idempotent
    with pytest.raises(KeyError, match="released"):
        dec.step([s[1]])
    with pytest.raises(KeyError):
        dec.tokens(s[1])
    with pytest.raises(KeyError, match="unknown"):
        dec.release(999)
    # a new stream reuses the freed pages without disturbing the others
    n = dec.start(TEXTS[3], seed=SEEDS[3])
    run_all(dec)
    assert dec.tokens(s[0]) == alone[0] and dec.tokens(s[2]) == alone[2] and dec.tokens(n) == alone[3]
    for sid in dec.active():
        dec.release(sid)
    assert dec.free_blocks == total


def test_capacity_errors_leave_others_untouched(tts, alone):
    bs = 8
    need = [-(-(tts.split * len(t) + 1 + CAP) // bs) for t in TEXTS]
    dec = TTSBatchDecoder(tts, max_streams=3, block_size=bs, num_blocks=need[0] + need[2] + 1, max_tokens=CAP)
    a = dec.start(TEXTS[0], seed=SEEDS[0])
    dec.step()
    b = dec.start(TEXTS[2], seed=SEEDS[2])
    free = dec.free_blocks
    with pytest.raises(TTSCapacityError, match="pool exhausted"):
        dec.start(TEXTS[3], seed=SEEDS[3])
    with pytest.raises(TTSCapacityError):  # all or nothing
        dec.start_many([TEXTS[0], TEXTS[3]], [1, 2])
    assert isinstance(TTSCapacityError("x"), RuntimeError)
    assert dec.free_blocks == free and dec.active() == [a, b]
    run_all(dec)
    assert dec.tokens(a) == alone[0] and dec.tokens(b) == alone[2]

    slots = TTSBatchDecoder(tts, max_streams=1, max_tokens=CAP)
    slots.start(TEXTS[0], seed=0)
    with pytest.raises(TTSCapacityError, match="slot"):
        slots.start(TEXTS[0], seed=1)


def test_bad_inputs(tts):
    dec = TTSBatchDecoder(tts, max_streams=2, max_tokens=4)
    vocab = tts.llm_embed.shape[0]
    free = dec.free_blocks
    with pytest.raises(ValueError, match="empty"):
        dec.start([], seed=0)
    with pytest.raises(ValueError, match=r"\[0, %d\)" % vocab):
        dec.start([1, vocab], seed=0)
    with pytest.raises(ValueError, match="min -1"):
        dec.start([-1, 2], seed=0)
    with pytest.raises(TypeError, match="float32"):
        dec.start(torch.tensor([1.0, 2.0]), seed=0)
    with pytest.raises(TypeError, match="bool"):
        dec.start(torch.tensor([True]), seed=0)
    with pytest.raises(TypeError):
        dec.start("hello", seed=0)
    with pytest.raises(ValueError, match="1-D"):
        dec.start(torch.ones(2, 3, dtype=torch.long), seed=0)
    with pytest.raises(ValueError, match="seed"):
        dec.start([1], seed=-1)
    with pytest.raises(ValueError, match="seed"):
        dec.start([1], seed=1.5)
    with pytest.raises(ValueError, match="2 texts but 1 seeds"):
        dec.start_many([[1], [2]], [0])
    with pytest.raises(ValueError, match="empty"):
        tts.generate([], max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        tts.nar([])
    assert dec.free_blocks == free and dec.active() == []
    # accepted forms: list, int32/int64 tensors, a [1, N] row
    ref = tts.generate([3, 4], max_tokens=4, seed=5)
    for ids in (torch.tensor([3, 4], dtype=torch.int32), torch.tensor([[3, 4]])):
        assert tts.generate(ids, max_tokens=4, seed=5) == ref


@pytest.mark.cuda
def test_batched_equals_alone_cuda(tiny_ckpt):
    import warnings

    from vita_engine import VitaModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = VitaModel.from_pretrained(tiny_ckpt, device="cuda", dtype=torch.float32, load_codec_model=False)
    tts = m.tts
    solo = [tts.generate(t, max_tokens=CAP, seed=s) for t, s in zip(TEXTS, SEEDS)]
    dec = TTSBatchDecoder(tts, max_streams=4, max_tokens=CAP)
    first = dec.start(TEXTS[0], seed=SEEDS[0])
    dec.step()
    rest = dec.start_many(TEXTS[1:], SEEDS[1:])
    run_all(dec)
    assert [dec.tokens(s) for s in [first] + rest] == solo


# ---- text segmenter ------------------------------------------------------------------------------

def feed(seg, pieces):
    out = []
    for p in pieces:
        out += seg.push(p)
    return out, seg.flush()


def test_normalize():
    assert normalize_tts_text("Hello <|im_end|>World<|endoftext|>") == "hello world"
    assert normalize_tts_text("<|im_start|>assistant\nOK<|foo_bar|>") == "assistant\nok"
    assert normalize_tts_text("☞ Sure") == "sure"  # server.py drops "☞ " as one unit
    assert normalize_tts_text("A ☟b") == "a b"
    assert normalize_tts_text("1+1=2") == "1+1=2"  # equation rewrite not implemented


def test_first_segment_early_handoff():
    # by token count, cut after the last whitespace (the trailing word may be incomplete)
    s = TextSegmenter(first_min_chars=None, first_min_tokens=3)
    assert s.push("I") == [] and s.push(" really") == []
    assert s.push(" like") == ["i really"]
    assert not s.first_pending
    # by characters
    s = TextSegmenter(first_min_chars=6, first_min_tokens=None)
    assert s.push("Wonder") == ["wonder"]
    # by punctuation, even when short; first-segment comma becomes 。
    s = TextSegmenter(first_min_chars=50, first_min_tokens=50)
    assert s.push("Yes") == [] and s.push(",") == ["yes。"]
    # CJK: cut whole
    s = TextSegmenter(first_min_chars=4, first_min_tokens=None)
    assert s.push("今天天气") == ["今天天气"]


def test_later_segments_at_sentence_boundaries():
    s = TextSegmenter(first_min_chars=None, first_min_tokens=None)
    pieces = ["Hi", "!", " Ok", ",", " so", " the", " value", " is", " 3", ".", "14", ",", " right", "?", "\n", "Done", " now"]
    out, rest = feed(s, pieces)
    # "hi!" first; " ok," is < 5 chars so it runs on; "3.14" is not split at its dot; segments keep the
    # space after the previous cut, as web_demo/server.py hands them to the TTS
    assert out == ["hi!", " ok, so the value is 3.14,", " right?"]
    assert rest == ["\ndone now"]
    assert s.first_pending  # flush re-arms the early first segment


def test_later_segment_length_counts_spaces_as_the_reference():
    # server.py::tts_worker cuts at punctuation once len(tts_input_text) >= 5, the leading space
    # included: " abc," (5 characters) is a segment, " ab," (4) runs on
    s = TextSegmenter(first_min_chars=None, first_min_tokens=None)
    assert feed(s, ["Hi", "!", " abc", ",", " ab", ",", " x"]) == (["hi!", " abc,"], [" ab, x"])


def test_segmenter_specials_split_across_pieces_and_reset():
    s = TextSegmenter(first_min_chars=None, first_min_tokens=None)
    out, rest = feed(s, ["Good", " day", "<|im", "_end|>", "."])
    assert out == ["good day."] and rest == []
    s = TextSegmenter()
    s.push("abc")
    s.reset()
    assert s.flush() == []
    # punctuation-only pieces are never a segment
    s = TextSegmenter(first_min_chars=None, first_min_tokens=None)
    assert feed(s, ["。", "!", "\n"]) == ([], [])
    # first-segment commas become 。, later ones stay
    s = TextSegmenter(first_min_chars=None, first_min_tokens=None)
    assert feed(s, ["你好", "，", "世界和平万岁", "，", "好"]) == (["你好。", "世界和平万岁，"], ["好"])


def test_segmenter_max_chars_and_args():
    s = TextSegmenter(first_min_chars=None, first_min_tokens=None, max_chars=20)
    out = s.push("Ok.")
    out += s.push(" one two three four five six seven")
    assert out == ["ok.", " one two three four five six"] and s.flush() == [" seven"]
    with pytest.raises(ValueError):
        TextSegmenter(punctuation="")
    with pytest.raises(TypeError):
        TextSegmenter().push(3)

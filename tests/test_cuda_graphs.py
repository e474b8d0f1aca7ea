"""CUDA graphs (runtime/graphs.py): bucket choice, options, the static-buffer decode path against the
eager forward, the scratch page, padding isolation (NaN poison), buffer identity, engine determinism.

The CPU tests run the exact buffers, padding and plan updates that a captured graph replays (eagerly);
the `cuda`-marked tests capture and replay for real (skipped without a GPU)."""

import pytest
import torch

from runtime_util import one_thread, run_sessions, same_answers  # noqa: F401
from vita_engine.runtime.batch_llm import BatchLLM, LLMDecodeGraphs, LLMWork
from vita_engine.runtime.events import CapacityError
from vita_engine.runtime.graphs import DEFAULT_BUCKETS, bucket_for, check_buckets
from vita_engine.runtime.kv_pool import KVPool


# ---- buckets and options ---------------------------------------------------------------------------

def test_bucket_for():
    b = DEFAULT_BUCKETS
    assert b == (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n, b) for n in (1, 2, 3, 4, 5, 8, 9, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 32, 32]
    assert bucket_for(33, b) is None
    assert bucket_for(3, (3,)) == 3 and bucket_for(4, (3,)) is None
    with pytest.raises(ValueError, match="n must be >= 1"):
        bucket_for(0, b)


@pytest.mark.parametrize("bad, exc", [([], ValueError), ([0, 1], ValueError), ([1, 1], ValueError), ([1.5], ValueError),
                                      ([True], ValueError), ("1,2", TypeError), (4, TypeError), (None, TypeError)])
def test_check_buckets_rejects(bad, exc):
    with pytest.raises(exc, match="cuda_graph_buckets"):
        check_buckets(bad)


def test_check_buckets_sorts():
    assert check_buckets([8, 1, 3]) == (1, 3, 8)


def test_engine_options_validated(tiny_ckpt, tiny_model):
    from vita_engine.runtime import Engine

    with pytest.raises(TypeError, match="cuda_graphs"):
        Engine(tiny_model, tiny_ckpt, {"cuda_graphs": "yes"})
    with pytest.raises(ValueError, match="cuda_graph_buckets"):
        Engine(tiny_model, tiny_ckpt, {"cuda_graphs": True, "cuda_graph_buckets": [0, 4]})
    with pytest.raises(TypeError, match="cuda_graph_buckets"):
        Engine(tiny_model, tiny_ckpt, {"cuda_graph_buckets": "1,2"})


# ---- the scratch page --------------------------------------------------------------------------------

def test_scratch_page_is_never_a_sessions():
    p = KVPool(1, 6, 4, 1, 8)
    s = p.take_scratch_block()
    assert p.take_scratch_block() == s  # idempotent
    assert p.usable_blocks == 5 and p.free_blocks == 5
    u = p.usage()
    assert (u["blocks"], u["free"], u["used"]) == (5, 5, 0)
    p.reserve(20)  # 5 pages: the whole usable pool
    with pytest.raises(CapacityError):
        p.reserve(1)
    seqs = [p.new_sequence() for _ in range(5)]
    for q in seqs:
        q.append(4)
    assert s not in {b for q in seqs for b in q.blocks}
    with pytest.raises(CapacityError):
        p.new_sequence().append(1)
    with pytest.raises(RuntimeError, match="scratch"):
        p.release([s])
    for q in seqs:
        q.release()
    assert p.free_blocks == 5 and s not in p._free


def test_scratch_page_needs_a_free_page():
    p = KVPool(1, 2, 4, 1, 8)
    p.reserve(8)
    with pytest.raises(CapacityError, match="scratch"):
        p.take_scratch_block()


def test_grow_matches_append():
    a, b = KVPool(1, 16, 4, 1, 8).new_sequence(), KVPool(1, 16, 4, 1, 8).new_sequence()
    for n in (3, 1, 5, 1, 1, 7):
        assert a.append(n).tolist() == b.grow(n)
        assert a.length == b.length
    assert len(a.blocks) == len(b.blocks)


# ---- the LLM decode path on static buffers vs the eager forward ------------------------------------------

BS, MAX_BLOCKS, NB = 4, 16, 96


def _pair(llm, buckets=(1, 2, 4, 8)):
    pa = KVPool.for_llm(llm, NB, BS)
    pb = KVPool.for_llm(llm, NB + 1, BS)
    g = LLMDecodeGraphs(llm, pb, buckets, MAX_BLOCKS)
    return BatchLLM(llm, pa), BatchLLM(llm, pb, graphs=g), g


def _slots(seq, upto):
    bs = seq.pool.block_size
    return [seq.blocks[p // bs] * bs + p % bs for p in range(upto)]


def _poison(pool, live):
    """NaN in every KV slot except the tokens the live sequences hold; -> (keep mask, saved values)."""
    keep = torch.zeros(pool.num_blocks * pool.block_size, dtype=torch.bool)
    for s in live:
        keep[_slots(s, s.length)] = True
    saved = []
    m = keep.to(pool.device)
    for t in pool.k + pool.v:
        f = t.view(t.shape[0] * t.shape[1], -1)
        f[~m] = float("nan")
        saved.append(f[m].clone())
    return keep, saved


def _check_written(pool, keep, saved, written):
    """Held tokens unchanged; exactly the `written` slots changed from NaN; nothing else touched."""
    exp_nan = ~keep
    exp_nan[list(written)] = False
    for t, sv in zip(pool.k + pool.v, saved):
        f = t.view(t.shape[0] * t.shape[1], -1)
        assert torch.equal(f[keep], sv), "a held KV entry changed"
        got_nan = torch.isnan(f).all(1)
        changed = torch.nonzero(~got_nan & ~keep).flatten().tolist()
        assert torch.equal(got_nan, exp_nan), f"slots written: {changed}, expected {sorted(written)}"
        assert not torch.isnan(f[list(written)]).any()


def test_decode_on_static_buffers_matches_eager(tiny_model, one_thread):  # noqa: F811
    llm = tiny_model.llm
    ea, gr, g = _pair(llm)
    hidden = llm.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    live = []  # (seq in pool A, seq in pool B)
    ptrs = {}
    seen_buckets = set()

    def join(*lens):
        work_a, work_b = [], []
        for n in lens:
            x = torch.randn(n, hidden, generator=gen)
            sa, sb = ea.pool.new_sequence(), gr.pool.new_sequence()
            work_a.append(LLMWork(sa, x))
            work_b.append(LLMWork(sb, x))
            live.append((sa, sb))
        la, lb = ea.forward(work_a), gr.forward(work_b)  # prefill: eager on both
        torch.testing.assert_close(lb, la, rtol=0, atol=0)

    def leave(*idx):
        for i in sorted(idx, reverse=True):
            sa, sb = live.pop(i)
            sa.release()
            sb.release()

    def tick():
        n = len(live)
        x = torch.randn(n, hidden, generator=gen)
        keep, saved = _poison(gr.pool, [sb for _, sb in live])
        before = gr.graph_forwards
        la = ea.forward([LLMWork(sa, x[i:i + 1]) for i, (sa, _) in enumerate(live)])
        lb = gr.forward([LLMWork(sb, x[i:i + 1]) for i, (_, sb) in enumerate(live)])
        assert gr.graph_forwards == before + 1
        assert torch.isfinite(lb).all()
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
        sbatch = g.runner.batch_for(n)
        seen_buckets.add(sbatch.b)
        assert lb.data_ptr() == sbatch.out.data_ptr()
        assert torch.isfinite(sbatch.out[n:]).all()  # padded rows attended over their own scratch slot only
        written = {_slots(sb, sb.length)[-1] for _, sb in live}  # each live row's new token
        if n < sbatch.b:
            written.add(g.pool.scratch_block * BS)
        _check_written(gr.pool, keep, saved, written)
        assert g.pool.scratch_block not in {b for _, sb in live for b in sb.blocks}
        # the static buffers keep their identity from tick to tick (a captured graph reads these addresses)
        cur = {k: t.data_ptr() for k, t in (("x", sbatch.x), ("ints", sbatch.ints), ("bt", sbatch.block_table),
                                             ("kv", sbatch.kv_lens), ("cu", sbatch.cu_q_lens), ("out", sbatch.out),
                                             ("plan_bt", sbatch.plan.block_table), ("plan_kv", sbatch.plan.kv_lens),
                                             ("plan_cu", sbatch.plan.cu_q_lens))}
        assert ptrs.setdefault(sbatch.b, cur) == cur
        # the plan sees this tick's metadata (updated in place)
        for i, (_, sb) in enumerate(live):
            assert sbatch.kv_lens[i] == sb.length
            assert sbatch.block_table[i, :len(sb.blocks)].tolist() == sb.blocks
        assert (sbatch.kv_lens[n:] == 1).all() and (sbatch.block_table[n:] == g.pool.scratch_block).all()

    join(5)
    for _ in range(3):
        tick()
    join(3, 9)           # 3 rows -> bucket 4
    for _ in range(5):
        tick()
    join(14, 1)          # 5 rows -> bucket 8
    for _ in range(3):
        tick()
    leave(0, 3)          # 3 rows -> bucket 4 again
    for _ in range(3):
        tick()
    leave(0, 1)          # 1 row -> bucket 1
    for _ in range(2):
        tick()
    assert seen_buckets == {1, 4, 8}
    assert g.runner.eager_runs == gr.graph_forwards == 16 and g.runner.replays == 0  # CPU: nothing captured


def test_decode_on_static_buffers_with_reference_ops(tiny_model, one_thread):  # noqa: F811
    llm = tiny_model.llm
    H = llm.config.hidden_size
    with llm.ops.reference():
        ea, gr, g = _pair(llm)
        assert all(sb.plan is None for sb in g.runner.batches.values())
        sa, sb = [ea.pool.new_sequence() for _ in range(3)], [gr.pool.new_sequence() for _ in range(3)]
        x = torch.randn(7, H)
        ea.forward([LLMWork(s, x[i:i + 2]) for i, s in enumerate(sa)])
        gr.forward([LLMWork(s, x[i:i + 2]) for i, s in enumerate(sb)])
        for _ in range(5):
            x = torch.randn(3, H)
            la = ea.forward([LLMWork(s, x[i:i + 1]) for i, s in enumerate(sa)])
            lb = gr.forward([LLMWork(s, x[i:i + 1]) for i, s in enumerate(sb)])
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    assert gr.graph_forwards == 5


def test_non_decode_forwards_stay_eager(tiny_model, one_thread):  # noqa: F811
    llm = tiny_model.llm
    ea, gr, g = _pair(llm, buckets=(1, 2))
    H = llm.config.hidden_size
    seqs = [gr.pool.new_sequence() for _ in range(3)]
    gr.forward([LLMWork(s, torch.randn(2, H)) for s in seqs])  # prefill
    gr.forward([LLMWork(seqs[0], torch.randn(1, H)), LLMWork(seqs[1], torch.randn(3, H))])  # mixed
    gr.forward([LLMWork(s, torch.randn(1, H)) for s in seqs])  # 3 decode rows > largest bucket 2
    gr.forward([LLMWork(seqs[0], torch.randn(1, H), want_logits=False)])  # no logits wanted
    assert gr.graph_forwards == 0 and gr.forwards == 4
    long = gr.pool.new_sequence()
    gr.forward([LLMWork(long, torch.randn(MAX_BLOCKS * BS, H))])  # fills the static table width
    gr.forward([LLMWork(long, torch.randn(1, H))])  # needs one page more than the table holds: eager
    assert gr.graph_forwards == 0
    gr.forward([LLMWork(seqs[2], torch.randn(1, H))])
    assert gr.graph_forwards == 1


# ---- TTS AR step on static buffers ---------------------------------------------------------------------

def _tts_poison(d):
    """NaN in every TTS KV page no active stream holds (the scratch page included)."""
    held = {b for sid in d.active() for b in d._streams[sid].blocks}
    free = torch.tensor([p for p in range(d.cache.k[0].shape[0]) if p not in held], dtype=torch.long, device=d.device)
    for t in d.cache.k + d.cache.v:
        t.index_fill_(0, free, float("nan"))


def _tts_same_steps(tts, buckets, captured=False):
    """Two decoders, eager and on static buffers (graph_buckets), give the same tokens step by step,
    with streams joining and leaving (bucket changes, one batch above the largest bucket)."""
    from vita_engine.model.tts_batch import TTSBatchDecoder

    a = TTSBatchDecoder(tts, max_streams=6, block_size=4, max_tokens=30)
    b = TTSBatchDecoder(tts, max_streams=6, block_size=4, max_tokens=30, graph_buckets=buckets)
    if captured:
        b.capture_graphs()
        assert set(b._graphs.graphs) == set(buckets)
    assert b.free_blocks == a.free_blocks == b.num_blocks and b.scratch_block == b.num_blocks
    assert b.scratch_block not in b.cache.free
    texts = [[5, 9, 11], [7], [3, 4, 5, 6, 7], [12, 13], [20, 21, 22]]
    for d in (a, b):
        d.start_many(texts[:3], [1, 2, 3])  # 3 rows: bucket 4 with a padded row
    padded = []  # static-buffer steps with padded rows
    replay = b._graphs.replay

    def counting_replay(n, **rows):
        if b._graphs.batch_for(n).b > n:
            padded.append(n)
        return replay(n, **rows)

    b._graphs.replay = counting_replay
    outs = []
    steps = 0
    while True:
        if steps == 3:
            for d in (a, b):
                d.start_many(texts[3:], [4, 5])  # 5 rows: above the largest bucket, eager
        _tts_poison(b)
        oa, ob = a.step(), b.step()
        assert oa == ob
        for sb in b._graphs.batches.values():
            if sb.out is not None:
                assert not torch.isnan(sb.out[sb.n:]).any()  # padded rows saw only their scratch slot (-inf: masked ids)
        outs.append(oa)
        steps += 1
        for sid in [sid for sid, t in oa.items() if t is None]:
            a.release(sid)
            b.release(sid)
        if not a.active() or steps > 40:
            break
        for sid in b.active():
            assert b.scratch_block not in b._streams[sid].blocks
    assert sum(t is not None for o in outs for t in o.values()) > 20
    assert len(padded) >= 3, padded
    assert b.free_blocks + sum(len(b._streams[s].blocks) for s in b.active()) == b.num_blocks
    assert b.scratch_block not in b.cache.free
    return b._graphs


def test_tts_step_on_static_buffers_matches_eager(tiny_model, one_thread):  # noqa: F811
    g = _tts_same_steps(tiny_model.tts, (1, 2, 4))
    assert g.eager_runs > 0 and g.replays == 0 and g.buckets == (1, 2, 4)


def _tts_head_dim_64(device):
    """A random TTS whose head dim (64) has CUDA attention kernels (the tiny model's is 16)."""
    from vita_engine.model._ops import OpsHandle
    from vita_engine.model.config import TTSConfig
    from vita_engine.model.tts import TTSDecoder
    from vita_engine.runtime.random_model import _rand

    tc = TTSConfig(idim=128, odim=64, hidden=128, intermediate=256, num_blocks=2, num_heads=2, out_dim=128)
    g = torch.Generator(device=device).manual_seed(0)
    embed = torch.randn(1024, 256, device=device, generator=g) * 0.02
    return TTSDecoder(tc, _rand(TTSDecoder.expected_shapes(tc), device, torch.float32, g), embed, OpsHandle())


def test_tts_head_dim_64_on_static_buffers(one_thread):  # noqa: F811
    g = _tts_same_steps(_tts_head_dim_64("cpu"), (1, 2, 4))
    assert g.eager_runs > 0


# ---- the engine: the same tokens with and without cuda_graphs -------------------------------------------



def test_engine_same_tokens_with_cuda_graphs(tiny_ckpt, one_thread):  # noqa: F811
    from runtime_util import make_engine

    res = {}
    for g in (False, True):
        e = make_engine(tiny_ckpt, cuda_graphs=g, max_new_tokens=12, tts_max_tokens=20)
        try:
            res[g] = run_sessions(e, [3, 4, 5], "Hello, how are you?", turns=1, timeout=120)
            llm = e._scheduler.llm
            if g:
                assert llm.graph_forwards > 0 and e.kv.scratch_block is not None
                assert e.tts._graphs.eager_runs > 0
                assert e.stats["llm_graph_forwards"] == llm.graph_forwards and e.stats["cuda_graphs_captured"] == 0
            else:
                assert llm.graph_forwards == 0 and llm.graphs is None
        finally:
            e.close()
    same_answers(res[False], res[True], atol=1e-5)


def test_engine_keeps_session_capacity_with_cuda_graphs(tiny_ckpt, one_thread):  # noqa: F811
    from runtime_util import make_engine

    e = make_engine(tiny_ckpt, cuda_graphs=True, max_sessions=2, session_max_tokens=64)
    try:
        assert e.kv.num_blocks == 2 * 4 + 1 and e.kv.usable_blocks == 8
        e.session()
        e.session()
        with pytest.raises(CapacityError):
            e.session()
    finally:
        e.close()


# ---- real capture / replay (GPU) ----------------------------------------------------------------------------

@pytest.mark.cuda
def test_capture_replay_matches_eager_cuda():
    from vita_engine.runtime.random_model import random_vita_model

    model, _ = random_vita_model("mini", device="cuda", dtype=torch.float32)
    llm = model.llm
    ea, gr, g = _pair(llm)
    assert g.capturable
    g.capture()
    assert set(g.runner.graphs) == {1, 2, 4, 8}
    H = llm.config.hidden_size
    live = []
    for n in (5, 3, 9, 14, 1):
        sa, sb = ea.pool.new_sequence(), gr.pool.new_sequence()
        x = torch.randn(n, H, device="cuda")
        ea.forward([LLMWork(sa, x)])
        gr.forward([LLMWork(sb, x)])
        live.append((sa, sb))
        for _ in range(3):
            x = torch.randn(len(live), H, device="cuda")
            keep, saved = _poison(gr.pool, [sb for _, sb in live])
            la = ea.forward([LLMWork(sa, x[i:i + 1]) for i, (sa, _) in enumerate(live)])
            torch.cuda.synchronize()
            mem = torch.cuda.memory_allocated()
            lb = gr.forward([LLMWork(sb, x[i:i + 1]) for i, (_, sb) in enumerate(live)])
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == mem  # replay allocates nothing
            assert torch.isfinite(lb).all()
            torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
            n_live = len(live)
            written = {_slots(sb, sb.length)[-1] for _, sb in live}
            if n_live < g.runner.batch_for(n_live).b:
                written.add(g.pool.scratch_block * BS)
            kb = [t.cpu() for t in gr.pool.k + gr.pool.v]
            for t, sv in zip(kb, saved):
                f = t.view(t.shape[0] * t.shape[1], -1)
                assert torch.equal(f[keep], sv.cpu())
                exp = ~keep
                exp[list(written)] = False
                assert torch.equal(torch.isnan(f).all(1), exp)
    assert g.runner.replays == gr.graph_forwards > 0 and g.runner.eager_runs == 0


@pytest.mark.cuda
def test_tts_capture_replay_matches_eager_cuda():
    g = _tts_same_steps(_tts_head_dim_64("cuda"), (1, 2, 4), captured=True)
    assert g.replays > 0


@pytest.mark.cuda
def test_engine_same_tokens_with_cuda_graphs_cuda():
    from vita_engine.runtime import Engine
    from vita_engine.runtime.random_model import random_vita_model

    model, path = random_vita_model("mini", device="cuda", dtype=torch.float32)
    res = {}
    for g in (False, True):
        e = Engine(model, path, {"cuda_graphs": g, "max_new_tokens": 12, "tts_max_tokens": 40})
        try:
            res[g] = run_sessions(e, [3, 4, 5], "Hello, how are you?", turns=2, timeout=180)
            if g:  # every per-token stage replayed: LLM decode, TTS AR step, the steady codec windows
                assert e._scheduler.llm.graphs.runner.replays > 0
                assert e.codec_graphs is not None and e.codec_graphs.replays > 0
        finally:
            e.close()
    same_answers(res[False], res[True], atol=1e-4)

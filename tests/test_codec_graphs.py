"""The steady codec window on static buffers (model/codec_graphs.py): the step that a CUDA graph
captures, run eagerly on CPU on the very same buffers. Its output must equal the slab push it replaces
(bit for bit) and the offline decode; padded rows (the scratch row, NaN-poisoned) never reach a live
row; no buffer moves across pushes and bucket changes; a full fixed-capacity slab leaves streams on
their own buffers (exact); the engine with cuda_graphs=True gives the same tokens and audio as without.
The `cuda`-marked tests capture and replay for real (skipped without a GPU: they have NOT run yet)."""
import random

import pytest
import torch

from runtime_util import one_thread, run_sessions, same_answers  # noqa: F401
from vita_engine.model.codec import Codec
from vita_engine.model.codec_graphs import CodecSlabGraphs

from test_codec import TINY, tiny_state_dict
from test_codec_real_config import real_codec, steady_len


def _tiny(device="cpu"):
    c = Codec(TINY, device=device).load_folded_state_dict(tiny_state_dict())
    c.poison_buffers = True
    return c


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return real_codec(tmp_path_factory, "codec_real_graphs")


def _poison_scratch(codec):
    for b in codec.slab.bufs:
        b[codec.slab.SCRATCH].fill_(float("nan"))


def _pairs(codec, n_streams, seed, extra):
    """Streams in pairs (a: pushed through the static steps, b: through the slab push), each pair
    started on the same random tokens, at different steady offsets."""
    n0 = steady_len(codec)
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, codec.n_codes, (n0 + 3 * i + extra,), generator=gen) for i in range(n_streams)]
    a = [codec.stream() for _ in seqs]
    b = [codec.stream() for _ in seqs]
    outs_a, outs_b = [], []
    for i, q in enumerate(seqs):
        outs_a.append([a[i].push(q[:n0 + 3 * i])])
        outs_b.append([b[i].push(q[:n0 + 3 * i])])
    return n0, seqs, a, b, outs_a, outs_b


def _run_pairs(codec, cg, schedule, n_streams, seed, check_rows=True):
    """schedule: [(live stream indices, n)] pushes. Checks a == b bit for bit at every push, that
    rows outside the push are untouched, and at the end a == b == decode."""
    extra = max(sum(n for idx, n in schedule if i in idx) for i in range(n_streams))
    n0, seqs, a, b, outs_a, outs_b = _pairs(codec, n_streams, seed, extra)
    pos = [n0 + 3 * i for i in range(n_streams)]
    for idx, n in schedule:
        lists = [seqs[i][pos[i]:pos[i] + n] for i in idx]
        _poison_scratch(codec)
        parked = [s._graph.row for s in a + b if s._graph.row is not None]
        others = [r for r in range(1, codec.slab.rows) if r in parked and r not in {a[i]._graph.row for i in idx}]
        before = [buf[others].clone() for buf in codec.slab.bufs] if check_rows else None
        ya = codec.push_many([a[i] for i in idx], lists, graphs=cg)
        if check_rows:  # the static step (padded rows included) wrote only its live rows
            for buf, bb in zip(codec.slab.bufs, before):
                assert torch.equal(buf[others].nan_to_num(7.0), bb.nan_to_num(7.0))
        yb = codec.push_many([b[i] for i in idx], lists)
        for i, u, v in zip(idx, ya, yb):
            assert u.shape == v.shape == (n * codec.hop_length,) and u.dtype == torch.float32
            assert not torch.isnan(u).any(), f"stream {i}: NaN (the scratch row leaked into a live row)"
            assert torch.equal(u, v), (i, n, (u - v).abs().max().item())
            outs_a[i].append(u)
            outs_b[i].append(v)
            pos[i] += n
    for i in range(n_streams):
        outs_a[i].append(a[i].flush())
        outs_b[i].append(b[i].flush())
        ya, yb = torch.cat(outs_a[i]), torch.cat(outs_b[i])
        assert torch.equal(ya, yb)
        ref = codec.decode(seqs[i][:pos[i]])
        assert ya.shape == ref.shape
        torch.testing.assert_close(ya, ref, rtol=0, atol=1e-5)
    return n0


def _ptrs(codec, cg):
    return ([t.data_ptr() for t in cg.bufs] + [cg.ints.data_ptr(), cg.staging.data_ptr(), cg.out.data_ptr()]
            + [t.data_ptr() for t in codec.slab.bufs])


# ---- the static step against the slab push and the offline decode ----------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_static_step_matches_slab_push_tiny(seed):
    codec = _tiny()
    cg = CodecSlabGraphs(codec, buckets=(1, 2, 4, 8), windows=(2, 3), rows=24)
    rng = random.Random(seed)
    n_streams = 7
    schedule = []
    for _ in range(12):  # live row counts 1..7: buckets 1, 2, 4 and 8 with padded rows
        k = rng.randint(1, n_streams)
        schedule.append((sorted(rng.sample(range(n_streams), k)), rng.choice([2, 3])))
    ptrs = _ptrs(codec, cg)
    before = dict(codec.push_stats)
    _run_pairs(codec, cg, schedule, n_streams, seed)
    assert _ptrs(codec, cg) == ptrs  # no buffer moved across pushes and bucket changes
    assert codec.push_stats["graph_pushes"] - before["graph_pushes"] == len(schedule)
    assert cg.eager_runs == len(schedule) and cg.replays == 0 and cg.graphs == {}


def test_static_step_window_not_captured_runs_the_slab_push():
    codec = _tiny()
    cg = CodecSlabGraphs(codec, buckets=(1, 4), windows=(2,), rows=8)
    before = dict(codec.push_stats)
    _run_pairs(codec, cg, [([0, 1, 2], 3), ([0, 1, 2], 2), ([1], 1), ([0, 2], 2)], 3, 0)
    st = {k: codec.push_stats[k] - before[k] for k in before}
    assert st["graph_pushes"] == 2 and st["graph_streams"] == 5  # n=2 only; n=3 and n=1 ran as before


def test_groups_larger_than_the_largest_bucket_are_split():
    codec = _tiny()
    cg = CodecSlabGraphs(codec, buckets=(1, 2), windows=(2,), rows=16)
    before = dict(codec.push_stats)
    _run_pairs(codec, cg, [(list(range(5)), 2)] * 3, 5, 1)
    assert codec.push_stats["graph_pushes"] - before["graph_pushes"] == 9  # 2 + 2 + 1 rows per push


def test_static_step_matches_slab_push_real_config(real, one_thread):  # noqa: F811
    cg = CodecSlabGraphs(real, buckets=(1, 4), windows=(2,), rows=8)
    ptrs = _ptrs(real, cg)
    n0 = _run_pairs(real, cg, [([0, 1, 2], 2), ([1], 2), ([0, 2], 2)], 3, 0)
    assert n0 <= 16 and _ptrs(real, cg) == ptrs
    assert cg.eager_runs == 3


# ---- slab capacity -------------------------------------------------------------------------------------

def test_full_fixed_slab_leaves_streams_on_their_own_buffers():
    codec = _tiny()
    cg = CodecSlabGraphs(codec, buckets=(1, 2, 4), windows=(2,), rows=2)
    assert codec.slab.fixed and codec.slab.capacity == 2
    ptrs = _ptrs(codec, cg)
    before = dict(codec.push_stats)
    _run_pairs(codec, cg, [([0, 1, 2, 3], 2)] * 3, 4, 2, check_rows=False)
    assert _ptrs(codec, cg) == ptrs  # the fixed slab never grew
    assert codec.push_stats["slab_full"] - before["slab_full"] > 0
    assert codec.push_stats["graph_pushes"] - before["graph_pushes"] == 3  # the parked pair of each push
    assert sorted(codec.slab.free) == [1, 2]  # the flushes gave the rows back
    ss = [codec.stream() for _ in range(3)]
    for s in ss:
        s.push(list(range(steady_len(codec) + 1)))
        assert s._graph.steady()
    codec.push_many(ss, [[1, 2]] * 3, graphs=cg)
    assert [s._graph.row is None for s in ss] == [False, False, True] and not codec.slab.room()
    with pytest.raises(RuntimeError, match="slab is full"):
        codec.slab.park(ss[2]._graph)


def test_slab_moved_after_the_steps_were_built():
    codec = _tiny()
    cg = CodecSlabGraphs(codec, buckets=(1, 2), windows=(2,), rows=2)
    gen = codec.slab.generation
    codec.slab.reserve(6)  # a second user asks for more rows: the slab moves once
    assert codec.slab.generation == gen + 1 and codec.slab.capacity == 6
    _run_pairs(codec, cg, [([0, 1], 2), ([0, 1, 2], 2)], 3, 3)


def test_options_validated():
    codec = _tiny()
    with pytest.raises(ValueError, match="buckets"):
        CodecSlabGraphs(codec, buckets=(0, 2), windows=(2,), rows=4)
    with pytest.raises(TypeError, match="windows"):
        CodecSlabGraphs(codec, buckets=(1,), windows="2", rows=4)
    with pytest.raises(ValueError, match="streams"):
        CodecSlabGraphs(codec, buckets=(1,), windows=(2,), rows=0)
    cg = CodecSlabGraphs(codec, buckets=(1, 2), windows=(2,), rows=4)
    with pytest.raises(TypeError, match="this codec"):
        _tiny().push_many([], [], graphs=cg)
    with pytest.raises(ValueError, match="graphs with"):
        cg.push([], [])
    assert cg.capture() == 0  # CPU: nothing captured, the steps run eagerly
    assert cg.step_for(3, 2) is None and cg.step_for(2, 3) is None and cg.step_for(2, 2).B == 2


# ---- the engine -------------------------------------------------------------------------------------------



def test_engine_same_tokens_and_audio_with_codec_graphs(tiny_ckpt, one_thread):  # noqa: F811
    from runtime_util import make_engine

    res = {}
    # off: the slab push; default on CPU (codec_static_windows=None): the static steps, as with cuda_graphs
    for name, opts in (("off", dict(codec_static_windows=False)), ("default", {}), ("graphs", dict(cuda_graphs=True))):
        e = make_engine(tiny_ckpt, max_new_tokens=16, tts_max_tokens=40, **opts)
        g = name != "off"
        try:
            res[name] = run_sessions(e, [3, 4, 5, 6], "Hello, how are you?", turns=2, timeout=180)
            st = e.codec.push_stats
            if g:
                cg = e.codec_graphs
                assert cg is not None and cg.windows == e._scheduler.policy.codec_steady_windows()
                assert e.codec.slab.fixed and e.codec.slab.capacity == 2 * e.options["max_sessions"]
                assert st["graph_pushes"] > 0 and cg.eager_runs == st["graph_pushes"] and cg.graphs == {}
                assert e.stats["cuda_graphs_captured"] == 0
            else:
                assert e.codec_graphs is None and st["graph_pushes"] == 0
        finally:
            e.close()
    with pytest.raises(TypeError, match="codec_static_windows"):
        make_engine(tiny_ckpt, codec_static_windows="yes")
    for other in ("default", "graphs"):  # the same codec tokens: the static codec step is bit-exact
        same_answers(res["off"], res[other])


# ---- real capture / replay (GPU): NOT yet run ---------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codec_capture_replay_matches_eager_cuda(dtype):
    """Captured steps == the same steps run eagerly (a second codec with the same weights) == the slab
    push, bit for bit; replay allocates nothing and syncs nothing; no buffer moves."""
    import vita_engine

    if not vita_engine.cuda_available():
        pytest.skip("vita_engine built without CUDA kernels")
    sd = tiny_state_dict()
    mk = lambda: Codec(TINY, device="cuda", dtype=dtype).load_folded_state_dict(sd)  # noqa: E731
    cap, eag = mk(), mk()
    cap.poison_buffers = eag.poison_buffers = True
    gc_ = CodecSlabGraphs(cap, buckets=(1, 2, 4, 8), windows=(2, 4), rows=16)
    ge = CodecSlabGraphs(eag, buckets=(1, 2, 4, 8), windows=(2, 4), rows=16)
    assert gc_.capture() == 8 and len(gc_.graphs) == 8 and ge.graphs == {}
    n0 = steady_len(cap)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 64, (n0 + 3 * i + 60,), generator=gen) for i in range(6)]
    sc = [cap.stream() for _ in seqs]
    se = [eag.stream() for _ in seqs]
    sl = [eag.stream() for _ in seqs]  # the slab push (no graphs), on the codec of the eager steps
    pos = [n0 + 3 * i for i in range(6)]
    for i, q in enumerate(seqs):
        for s in (sc[i], se[i], sl[i]):
            s.push(q[:pos[i]])
    cap.push_many(sc, [q[p:p + 2] for q, p in zip(seqs, pos)], graphs=gc_)  # parks every stream
    eag.push_many(se, [q[p:p + 2] for q, p in zip(seqs, pos)], graphs=ge)
    eag.push_many(sl, [q[p:p + 2] for q, p in zip(seqs, pos)])
    pos = [p + 2 for p in pos]
    ptrs = _ptrs(cap, gc_)
    replays = gc_.replays
    rng = random.Random(0)
    for r in range(12):
        idx = sorted(rng.sample(range(6), rng.randint(1, 6)))
        n = rng.choice([2, 4])
        lists = [seqs[i][pos[i]:pos[i] + n] for i in idx]
        _poison_scratch(cap)
        if r % 2:
            y = cap.push_many([sc[i] for i in idx], lists, graphs=gc_)
        else:  # the step alone: fill, then a replay that must neither allocate nor sync
            step = gc_.step_for(len(idx), n)
            gc_._fill(step, [sc[i]._graph.row for i in idx], lists)
            torch.cuda.synchronize()
            mem = torch.cuda.memory_allocated()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step.graph.replay()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == mem
            y = list(step.y[:len(idx)].clone())
            gc_.replays += 1
            for i in idx:
                sc[i]._graph.n_tokens += n
                sc[i]._graph.emitted += n * cap.hop_length
        ye = eag.push_many([se[i] for i in idx], lists, graphs=ge)
        yl = eag.push_many([sl[i] for i in idx], lists)
        for k, (u, v, w) in enumerate(zip(y, ye, yl)):
            assert torch.isfinite(u).all(), (r, k)
            assert torch.equal(u, v), (r, k, (u - v).abs().max().item())
            assert torch.equal(v, w)
        for i in idx:
            pos[i] += n
    assert _ptrs(cap, gc_) == ptrs
    assert gc_.replays - replays == 12 and gc_.eager_runs == 0


# the engine-level GPU check (codec steps replayed, same audio) is
# test_cuda_graphs.py::test_engine_same_tokens_with_cuda_graphs_cuda

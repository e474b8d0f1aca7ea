"""`Codec.push_many` across streams in different states: steady streams (past the start transient) at
different token positions run as one batch, shifted into the first one's coordinates. Every stream's
output must equal the same stream pushed alone (bit for bit) and the offline decode; fresh buffers are
NaN-filled (`poison_buffers`) so a read at a wrong offset cannot pass silently."""
import random

import pytest
import torch

from vita_engine.model.codec import Codec

from test_codec import TINY, tiny_state_dict
from test_codec_real_config import real_codec, steady_len


@pytest.fixture(scope="module")
def tiny():
    c = Codec(TINY).load_folded_state_dict(tiny_state_dict())
    c.poison_buffers = True
    return c


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return real_codec(tmp_path_factory, "codec_real_batching")


def _scenario(codec, seed, n_streams, max_len, ticks, windows):
    """Ragged streams started at different ticks, pushed in windows through push_many in random
    groupings (singletons included), flushed at different times. Returns the outputs per stream, the
    tokens, the windows each stream got, and the streams' stats."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, codec.n_codes, (rng.randint(0, max_len),), generator=gen) for _ in range(n_streams)]
    start = [rng.randrange(ticks // 2) for _ in range(n_streams)]
    streams = [codec.stream() for _ in range(n_streams)]
    pos, done = [0] * n_streams, [False] * n_streams
    outs = [[] for _ in range(n_streams)]
    splits = [[] for _ in range(n_streams)]
    shifted = 0  # push_many calls where same-n steady streams sat at different positions
    calls = {"streams": 0, "exact_groups": 0}  # what grouping by identical state alone would run
    for tick in range(ticks):
        n_tick = rng.choice(windows)  # most streams push the tick's window: they can batch
        live = [i for i in range(n_streams) if tick >= start[i] and not done[i]]
        todo = []
        for i in live:
            if pos[i] >= len(seqs[i]):
                if rng.random() < 0.4 or tick == ticks - 1:
                    outs[i].append(streams[i].flush())
                    done[i] = True
                continue
            n = n_tick if rng.random() < 0.8 else rng.choice(windows + [0])
            n = min(n, len(seqs[i]) - pos[i])
            todo.append((i, n))
        rng.shuffle(todo)
        while todo:  # random groupings: a few push_many calls per tick, singletons included
            k = rng.choice([1, 1, 2, len(todo), len(todo)])
            call, todo = todo[:k], todo[k:]
            seen = {}
            for i, n in call:
                g = streams[i]._graph
                if g.steady():
                    seen.setdefault(n, set()).add(g.n_tokens)
            shifted += any(len(v) > 1 for v in seen.values())
            calls["streams"] += len(call)
            calls["exact_groups"] += len({(streams[i]._graph.n_tokens, n) for i, n in call})
            ys = codec.push_many([streams[i] for i, _ in call], [seqs[i][pos[i]:pos[i] + n] for i, n in call])
            for (i, n), y in zip(call, ys):
                assert y.dim() == 1 and y.dtype == torch.float32
                outs[i].append(y)
                splits[i].append(n)
                pos[i] += n
    for i in range(n_streams):
        if not done[i]:
            if pos[i] < len(seqs[i]):
                outs[i].append(streams[i].push(seqs[i][pos[i]:]))
                splits[i].append(len(seqs[i]) - pos[i])
            outs[i].append(streams[i].flush())
    return [torch.cat(o) for o in outs], seqs, splits, shifted, calls


def _alone(codec, seq, split):
    s = codec.stream()
    parts, i = [], 0
    for n in split:
        parts.append(s.push(seq[i:i + n]))
        i += n
    if i < len(seq):
        parts.append(s.push(seq[i:]))
    parts.append(s.flush())
    return torch.cat(parts)


def _check(codec, got, seqs, splits, atol):
    for i, (y, seq, split) in enumerate(zip(got, seqs, splits)):
        assert not torch.isnan(y).any(), f"stream {i}: NaN (a read of an unwritten buffer)"
        alone = _alone(codec, seq, split)
        assert y.shape == alone.shape == (len(seq) * codec.hop_length,), (i, y.shape, alone.shape)
        assert torch.equal(y, alone), (i, (y - alone).abs().max().item())
        torch.testing.assert_close(y, codec.decode(seq), rtol=0, atol=atol)


@pytest.mark.parametrize("seed", range(5))
def test_push_many_ragged_streams_tiny(tiny, seed):
    before = dict(tiny.push_stats)
    got, seqs, splits, shifted, calls = _scenario(tiny, seed, n_streams=9, max_len=60, ticks=40, windows=[1, 2, 3])
    _check(tiny, got, seqs, splits, atol=1e-5)
    st = {k: tiny.push_stats[k] - before[k] for k in before}
    assert shifted > 0  # the scenario did exercise streams at different positions
    assert st["pushes"] - st["batched_pushes"] + st["batched_streams"] == calls["streams"], (st, calls)
    assert st["pushes"] < calls["exact_groups"], (st, calls)  # fewer pushes than same-state grouping runs


def test_steady_streams_at_different_offsets_run_as_one_push(tiny):
    n0 = steady_len(tiny)
    offs = [0, 1, 5, 12, 37]
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 64, (n0 + o + 9,), generator=gen) for o in offs]
    streams = [tiny.stream() for _ in offs]
    outs = [[s.push(q[:n0 + o])] for s, q, o in zip(streams, seqs, offs)]
    assert all(s._graph.steady() for s in streams)
    for a in range(0, 9, 3):
        before = dict(tiny.push_stats)
        ys = tiny.push_many(streams, [q[n0 + o + a:n0 + o + a + 3] for q, o in zip(seqs, offs)])
        assert tiny.push_stats["pushes"] - before["pushes"] == 1
        assert tiny.push_stats["batched_streams"] - before["batched_streams"] == len(offs)
        for o, y in zip(outs, ys):
            o.append(y)
    for s, o in zip(streams, outs):
        o.append(s.flush())
    splits = [[n0 + o, 3, 3, 3] for o in offs]
    _check(tiny, [torch.cat(o) for o in outs], seqs, splits, atol=1e-5)


def test_transient_streams_batch_only_in_the_same_state(tiny):
    streams = [tiny.stream() for _ in range(3)]
    tiny.push_many(streams[:1], [[1, 2]])
    before = dict(tiny.push_stats)
    tiny.push_many(streams, [[3], [4], [5]])  # states 2, 0, 0: the two fresh ones batch
    assert tiny.push_stats["pushes"] - before["pushes"] == 2
    assert not any(s._graph.steady() for s in streams)


def test_steady_flag_cleared_by_flush(tiny):
    s = tiny.stream()
    s.push(list(range(steady_len(tiny) + 2)))
    assert s._graph.steady()
    s.flush()
    assert not s._graph.steady()
    with pytest.raises(RuntimeError, match="after flush"):
        tiny.push_many([s, tiny.stream()], [[1], [1]])


def test_push_many_ragged_streams_real_config(real):
    n0 = steady_len(real)
    assert n0 <= 16
    before = dict(real.push_stats)
    got, seqs, splits, shifted, calls = _scenario(real, 5, n_streams=4, max_len=n0 + 8, ticks=14, windows=[2, 3])
    _check(real, got, seqs, splits, atol=1e-5)
    assert shifted > 0 and real.push_stats["pushes"] - before["pushes"] < calls["exact_groups"]


def test_push_many_refuses_a_stream_twice(tiny):
    s = tiny.stream()
    with pytest.raises(ValueError, match="more than once"):
        tiny.push_many([s, s], [[1], [2]])


def test_slab_rows_are_freed_by_flush_and_by_a_dropped_stream(tiny):
    import gc

    n0 = steady_len(tiny)
    streams = [tiny.stream() for _ in range(3)]
    for s in streams:
        s.push(list(range(n0)))
    tiny.push_many(streams, [[1, 2]] * 3)
    rows = [s._graph.row for s in streams]
    assert None not in rows and len(set(rows)) == 3
    free0 = set(tiny.slab.free)
    streams[0].flush()
    assert streams[0]._graph.row is None and rows[0] in tiny.slab.free
    del streams[1]
    gc.collect()
    assert rows[1] in tiny.slab.free and rows[2] not in tiny.slab.free
    assert set(tiny.slab.free) == free0 | {rows[0], rows[1]}

"""Micro-benchmark: `Codec.push_many` over S steady streams at different token positions (what the
engine's sessions look like: turns started at different times), each call pushing the same window of
2 or 3 tokens to every stream. Prints the median / p90 ms per call and per stream push.

    PYTHONPATH=<tree>/python python bench/codec_batch.py [--streams 16] [--calls 200] [--config tiny|real]

Before/after: run it alternately with PYTHONPATH set to each tree (the codec before this change runs
streams in different states one by one). `--graphs`: the steady pushes run on the static steps of
model/codec_graphs.py (buckets 1..32, windows 2 and 3; eager on CPU, captured on CUDA)."""
import argparse
import json
import random
import time

import numpy as np
import torch


def tiny_codec():
    from vita_engine.model.loading import load_codec
    from vita_engine.runtime.engine import tiny_checkpoint

    return load_codec(tiny_checkpoint() / "vita_tts_ckpt" / "codec", device="cpu", dtype=torch.float32)


def real_codec():
    """The real VITA-1.5 layer configuration with random weights (timing only)."""
    from vita_engine.model.codec import Codec

    cfg = dict(upsample_rates=[8, 5, 5, 3], upsample_kernel_sizes=[16, 11, 11, 5], upsample_initial_channel=512, resblock="1",
               resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3, n_codes=1024, n_code_groups=1,
               residul_layer=1, global_code_num=8, global_tokens=[473, 975, 419, 219, 565, 121, 550, 616])
    c = Codec(cfg)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(*s, generator=g) * 0.02 for k, s in c._expected_shapes().items()}
    return c.load_folded_state_dict(sd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--config", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graphs", action="store_true", help="steady pushes on the static steps (codec_graphs.py)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    codec = tiny_codec() if a.config == "tiny" else real_codec()
    graphs = None
    if a.graphs:
        from vita_engine.model.codec_graphs import CodecSlabGraphs

        graphs = CodecSlabGraphs(codec, (1, 2, 4, 8, 16, 32), (2, 3), rows=max(8, a.streams))
        graphs.capture()
    rng = random.Random(0)
    la = codec.lookahead_tokens
    streams = [codec.stream() for _ in range(a.streams)]
    for i, s in enumerate(streams):  # different offsets, all past the start transient
        s.push([rng.randrange(codec.n_codes) for _ in range(la + 3 + 5 * i)])
    times = []
    for c in range(a.calls + 10):
        n = rng.choice([2, 3])
        lists = [[rng.randrange(codec.n_codes) for _ in range(n)] for _ in streams]
        t0 = time.perf_counter()
        codec.push_many(streams, lists, graphs=graphs)
        if c >= 10:  # warm-up calls left out
            times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    print(json.dumps({"config": a.config, "graphs": a.graphs, "streams": a.streams, "calls": a.calls,
                      "ms_per_call_p50": round(float(np.percentile(t, 50)), 3), "ms_per_call_p90": round(float(np.percentile(t, 90)), 3),
                      "ms_per_stream_p50": round(float(np.percentile(t, 50)) / a.streams, 4),
                      "push_stats": getattr(codec, "push_stats", None)}))


if __name__ == "__main__":
    main()

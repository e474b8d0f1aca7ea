"""`vita-engine bench-kernels` and its harness: the statistics with fake timers, case selection, the
JSON schema, one real tiny run, and the one-off correctness checks of cheap cases. No timing is
asserted."""
import json
import statistics

import pytest

from vita_engine.benchmarks import cli as bcli
from vita_engine.benchmarks.cases import all_specs, select
from vita_engine.benchmarks.harness import Case, best_of, calibrate, contention, crowded, interleave, measure, peak_for


def _scripted(values, log, tag):
    it = iter(values)

    def f():
        log.append(tag)
        return next(it)
    return f


def test_interleave_statistics_and_order():
    log = []
    ours = [1.0, 2.0, 1.0, 4.0, 1.0]
    ref_a = [2.0, 2.0, 3.0, 2.0, 0.5]
    ref_b = [3.0, 1.0, 9.0, 9.0, 9.0]
    m = interleave(_scripted(ours, log, "o"), {"a": _scripted(ref_a, log, "a"), "b": _scripted(ref_b, log, "b")}, rounds=5)
    best = [min(a, b) for a, b in zip(ref_a, ref_b)]  # 2, 1, 3, 2, 0.5
    ratios = [r / o for o, r in zip(ours, best)]  # 2, 0.5, 3, 0.5, 0.5
    assert m.ratio == pytest.approx(statistics.median(ratios)) == pytest.approx(0.5)
    assert (m.ratio_min, m.ratio_max) == (pytest.approx(0.5), pytest.approx(3.0))
    assert m.ours_ms == pytest.approx(1.0) and m.ref_ms == pytest.approx(2.0)
    assert m.ref_variant == "a" and m.rounds == 5
    # interleaved: even rounds ours first, odd rounds the references first (reversed)
    assert log == ["o", "a", "b", "b", "a", "o", "o", "a", "b", "b", "a", "o", "o", "a", "b"]


def test_interleave_median_resists_one_disturbed_round():
    o = iter([1.0, 1.0, 1.0, 50.0, 1.0, 1.0, 1.0])  # ours preempted once
    r = iter([2.0, 2.1, 1.9, 2.0, 40.0, 2.0, 2.0])  # the reference preempted once
    m = interleave(lambda: next(o), {"r": lambda: next(r)}, rounds=7)
    assert m.ratio == pytest.approx(2.0)
    assert m.ratio_min == pytest.approx(2.0 / 50.0) and m.ratio_max == pytest.approx(40.0)


def test_interleave_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds"):
        interleave(lambda: 1.0, {"r": lambda: 1.0}, rounds=0)
    with pytest.raises(ValueError, match="reference"):
        interleave(lambda: 1.0, {}, rounds=3)


def test_calibrate_and_best_of_with_fake_timers():
    calls = []

    def timer(fn, n):
        calls.append(n)
        return per_call

    per_call = 0.1
    n, per = calibrate(timer, lambda: None, target_ms=30.0)
    assert (n, per) == (300, 0.1)
    assert calls[0] == 1 and calls[-1] * per_call >= 30.0 / 4  # grew until a quarter of the target
    per_call = 80.0  # longer than the target: one call per batch
    assert calibrate(timer, lambda: None, target_ms=30.0) == (1, 80.0)
    seq = iter([5.0, 3.0, 4.0])
    assert best_of(lambda fn, n: next(seq), None, n=30, parts=3) == 3.0
    sizes = []
    best_of(lambda fn, n: sizes.append(n) or 1.0, None, n=30, parts=3)
    assert sizes == [10, 10, 10]
    sizes.clear()
    best_of(lambda fn, n: sizes.append(n) or 1.0, None, n=1, parts=3)
    assert sizes == [1]


def test_measure_drops_hopeless_reference_variants():
    cost = {}

    def ours():
        pass

    def fast():
        pass

    def slow():
        pass

    cost.update({ours: 1.0, fast: 2.0, slow: 10.0})
    seen = []

    def timer(fn, n):
        seen.append(fn)
        return cost[fn]

    case = Case("x", "x", "float32", "[1]", ours, {"fast": fast, "slow": slow})
    m = measure(case, rounds=3, target_ms=4.0, timer=timer)
    assert m.ratio == pytest.approx(2.0) and m.ref_variant == "fast"
    assert set(m.calls[1]) == {"fast"}
    assert seen.count(slow) == 1  # its calibration only (the warm-up call is not timed)


def test_only_selects_names_families_and_globs():
    specs = all_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert [s.name for s in select(specs, ["rms_norm"])] == ["rms_norm"]
    fam = select(specs, ["paged_decode"])
    assert fam and all(s.family == "paged_decode" for s in fam)
    both = select(specs, ["rms_norm,store_kv_t16"])
    assert [s.name for s in both] == ["rms_norm", "store_kv_t16"]
    glob = select(specs, ["codec_ups*"])
    assert [s.name for s in glob] == ["codec_ups0", "codec_ups1", "codec_ups2", "codec_ups3"]
    assert select(specs, ["no_such_case"]) == []
    default = select(specs, None)
    full = select(specs, None, full=True)
    extra = {s.name for s in full} - {s.name for s in default}
    assert extra and all(s.full_only for s in full if s.name in extra)
    # a full_only case named exactly runs without --full
    hidden = next(s for s in specs if s.full_only)
    assert select(specs, [hidden.name]) == [hidden]
    # every family the issue names is in the default run
    fams = {s.family for s in default}
    assert {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "fuse_embeddings", "store_kv", "paged_decode",
            "paged_prefill", "varlen_attention", "sample_tokens", "codec_conv1d", "codec_conv_transpose1d", "codec_stream",
            "tts_step"} <= fams


def test_contention_probe():
    p = contention(probe_s=0.02)
    assert 0.0 < p["share"] <= 1.05
    assert crowded({"share": 0.5}) and crowded({"share": 0.95, "others_busy": 1.2})
    assert not crowded({"share": 0.95, "others_busy": 0.1}) and not crowded({"share": 0.99})


def test_explicit_threads_keep_the_wall_clock(capsys):
    assert bcli.main(["--json", "--rounds", "1", "--only", "store_kv_t16", "--dtype", "fp32", "--threads", "1", "--target-ms", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["clock"] == "wall" and d["threads"]["torch"] == 1 and "probe" not in d


def test_peak_table():
    assert peak_for("NVIDIA H200")["gbps"] == 4800
    assert peak_for("NVIDIA H100 80GB HBM3")["bf16"] == 989
    assert peak_for("NVIDIA H100 PCIe")["gbps"] == 2000
    assert peak_for("NVIDIA A100-SXM4-80GB")["bf16"] == 312
    assert peak_for("Some Future GPU") is None


def test_json_schema_of_a_real_tiny_run(capsys):
    rc = bcli.main(["--json", "--rounds", "2", "--only", "rms_norm", "--target-ms", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(out)
    assert d["device"] == "cpu" and isinstance(d["cpu"], str) and d["cpu"]
    assert [(r["name"], r["dtype"]) for r in d["results"]] == [("rms_norm", "float32"), ("rms_norm", "bfloat16")]
    for r in d["results"]:
        for k in ("name", "dtype", "shape", "ours_ms", "ref_ms", "ratio", "ratio_min", "ratio_max", "rounds", "ref", "gbps"):
            assert k in r, k
        assert r["ours_ms"] > 0 and r["ref_ms"] > 0 and r["rounds"] == 2
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["max_err"] < (1e-5 if r["dtype"] == "float32" else 2e-2)


def test_plain_table_and_dtype_choice(capsys):
    rc = bcli.main(["--rounds", "2", "--only", "rms_norm", "--dtype", "fp32", "--target-ms", "2", "--clock", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("rms_norm ")]
    assert len(rows) == 1 and "float32" in rows[0] and "|" in rows[0]
    assert "clock cpu" in out


@pytest.mark.parametrize("argv,msg", [
    (["--only", "nope"], "no case matches"),
    (["--rounds", "0", "--only", "rms_norm"], "--rounds"),
    (["--clock", "cpu", "--threads", "2", "--only", "rms_norm"], "--threads 1"),
])
def test_user_errors_exit_2(capsys, argv, msg):
    assert bcli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_registered_in_the_main_cli(capsys):
    from vita_engine.cli import main

    assert main(["bench-kernels", "--list", "--only", "codec_stream"]) == 0
    out = capsys.readouterr().out
    assert "codec_stream_push1" in out and "codec_stream_first" in out


CHEAP = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "fuse_embeddings", "store_kv_t16", "paged_decode_b1_kv4k",
         "paged_decode_tts_b16_kv128",
         "paged_prefill_c64_kv4k", "varlen_audio_t248", "sample_greedy_v152k", "codec_conv_pre", "codec_ups0", "codec_rb0_k7d1_res"]


@pytest.mark.parametrize("name", CHEAP)
def test_reference_does_the_same_work(name):
    """Each case's torch reference computes what our kernel computes (fp32), so a ratio compares like with like."""
    import torch

    spec = next(s for s in all_specs() if s.name == name)
    with torch.inference_mode():
        case = spec.build("cpu", torch.float32)
        assert case.check is not None
        assert case.check() < 1e-5

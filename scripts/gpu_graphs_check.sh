#!/usr/bin/env bash
# Device check for CUDA graphs (runtime/graphs.py), sized for one short device session (~8 min):
# CUDA build, the cuda-marked tests of tests/test_cuda_graphs.py (capture + replay == eager, no
# allocation in replay, NaN-poison isolation, engine tokens with/without) and tests/test_codec_graphs.py
# (the steady codec window: replay == eager step == slab push bit for bit, no allocation, no sync,
# buffers fixed; engine audio with/without), then the full-size bench at 1 and 16 sessions without
# and with --cuda-graphs. Output under ${OUT:-/tmp}.
set -u
OUT=${OUT:-/tmp}
export PYTHONPATH=python
if ! timeout 330 env VITA_CUDA_ARCHS=90a scripts/dev_build.sh > "$OUT/build.log" 2>&1; then
  echo "CUDA build failed or timed out"; tail -5 "$OUT/build.log"; exit 1
fi
python -c "import vita_engine as v; print('cuda kernels:', v.cuda_available())"
timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graphs.py tests/test_codec_graphs.py > "$OUT/graphs_tests.log" 2>&1
echo "cuda graph tests rc=$?"; tail -15 "$OUT/graphs_tests.log"
for g in "" "--cuda-graphs"; do
  tag=${g:-eager}; tag=${tag#--}
  timeout 150 python -m vita_engine.cli bench --dims full --device cuda --sessions 1,16 --turns 2 --json $g \
    > "$OUT/bench_$tag.json" 2> "$OUT/bench_$tag.err"; echo "bench $tag rc=$?"
  python - "$OUT/bench_$tag.json" "$tag" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[1], "unreadable", e); sys.exit()
for r in d.get("sweep", [d]):
    m, s, e = r["metrics"], r["scheduler"], r["engine"]
    f = lambda x, k: f"{x.get(k, {}).get('p50', '-')}/{x.get(k, {}).get('p90', '-')}"
    print(f"{sys.argv[2]:>11} {r['sessions']:>2} sessions {r['turns_done']} turns: ttfa p50/p90 {f(m, 'ttfa_ms')} ms, "
          f"tick {f(s, 'tick_ms')}, host {f(s, 'host_ms')}, llm {f(s, 'llm_ms')}, tts {f(s, 'tts_ms')}; "
          f"graph forwards {e.get('llm_graph_forwards')}/{e.get('llm_forwards')}, codec graph pushes {e.get('codec_graph_pushes')}, "
          f"captured {e.get('cuda_graphs_captured')}, codec {f(s, 'codec_ms')}")
PY
  tail -2 "$OUT/bench_$tag.err"
done

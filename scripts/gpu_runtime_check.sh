#!/usr/bin/env bash
# Device check for the runtime: CUDA build, then `vita-engine bench --dims full` (random weights at
# the real VITA-1.5 sizes, bf16) for 1 and 16 sessions. Falls back to the torch reference ops if the
# CUDA build fails. Output under ${OUT:-/tmp}.
set -u
OUT=${OUT:-/tmp}
export PYTHONPATH=python
REF=""
if ! timeout 330 env VITA_CUDA_ARCHS=90a scripts/dev_build.sh > "$OUT/build.log" 2>&1; then
  echo "CUDA build failed or timed out: benchmarking with --use-reference"; tail -5 "$OUT/build.log"; REF="--use-reference"
fi
python -c "import vita_engine as v; print('cuda kernels:', v.cuda_available())"
timeout 100 python -m vita_engine.cli bench --dims full --device cuda --sessions 1 --turns 3 --json $REF > "$OUT/bench1.json" 2> "$OUT/bench1.err"; echo "bench1 rc=$?"
timeout 120 python -m vita_engine.cli bench --dims full --device cuda --sessions 16 --turns 2 --json $REF > "$OUT/bench16.json" 2> "$OUT/bench16.err"; echo "bench16 rc=$?"
for f in bench1 bench16; do python - "$OUT/$f.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[1], "unreadable", e); sys.exit()
print(d["sessions"], "sessions", d["turns_done"], "turns", d["wall_s"], "s")
for k in ("ttfa_ms", "response_ms", "prefill_ms", "first_text_token_ms", "tts_nar_ms", "first_codec_token_ms", "first_codec_window_ms", "audio_encoder_ms", "fbank_ms"):
    if k in d["metrics"]:
        m = d["metrics"][k]; print(f"  {k:<24} p50 {m['p50']:>9} p90 {m['p90']:>9} p99 {m['p99']:>9}")
PY
done
tail -3 "$OUT/bench1.err" "$OUT/bench16.err"

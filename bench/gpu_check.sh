#!/usr/bin/env bash
# GPU verification in one call: build for this GPU's arch with all cores, run the CUDA tests and
# the benchmarks, print a short table last. Sized for < 8 minutes on an H200 (no network there:
# CUTLASS comes from a carried nvidia-cutlass wheel in .whl/ or from VITA_CUTLASS_DIR).
# Without a GPU it runs the CPU parts only (build, check, CPU bench ratios).
#   usage: bash bench/gpu_check.sh [--quick]     (logs go to $OUT or ./artifacts/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-artifacts/gpu_check}
out=$(mktemp -d)   # logs collect here; packed into $final/logs.tgz at the end (few files travel back)
mkdir -p "$final"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
stage() {  # stage NAME TIMEOUT_S CMD...: run with a time limit, log, never abort the script
  local name=$1 lim=$2
  shift 2
  local t0=$(date +%s)
  timeout "$lim" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  note "$(printf '%-18s rc=%-3s %4ss' "$name" "$rc" "$(($(date +%s) - t0))")"
  tail -n "${TAIL:-25}" "$out/$name.log"
  return $rc
}

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$summary"
  cap=$($py -c "import torch;c=torch.cuda.get_device_capability();print(f'{c[0]}{c[1]}')" 2>/dev/null || echo 90)
  [ "$cap" = 90 ] && cap=90a
  export VITA_CUDA_ARCHS=${VITA_CUDA_ARCHS:-$cap}
fi
note "date: $(date -u +%FT%TZ)  gpu: $has_gpu  archs: ${VITA_CUDA_ARCHS:-default}  torch: $($py -c 'import torch;print(torch.__version__)')"

if [ -z "${VITA_CUTLASS_DIR:-}" ] && ! $py -c "import cutlass_library" 2>/dev/null; then
  whl=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    rm -rf /tmp/vita_cutlass && $py -m zipfile -e "$whl" /tmp/vita_cutlass
    export VITA_CUTLASS_DIR=/tmp/vita_cutlass/cutlass_library/source/include
  fi
fi

# Python packages the tests need that a machine without a registry may lack: carried wheels.
missing=""
for m in silero_vad soxr; do $py -c "import $m" 2>/dev/null || missing="$missing $m"; done
if [ -n "$missing" ] && ls .whl/*.whl >/dev/null 2>&1; then
  wh=$(for m in $missing; do ls .whl/${m}-*.whl 2>/dev/null; done)
  [ -n "$wh" ] && $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/vita_site $wh && export PYTHONPATH=$PYTHONPATH:/tmp/vita_site
fi

mode=cpu
[ $has_gpu = 1 ] && mode=cuda
command -v nvcc >/dev/null 2>&1 && [ $has_gpu = 0 ] && mode=${GPU_CHECK_BUILD:-cpu}
VITA_BUILD_JOBS=$(nproc) PYTHON=$py stage build 900 scripts/dev_build.sh $mode || { note "BUILD FAILED"; cat "$summary"; exit 1; }
grep -E "registers|spill|bytes stack" "$out/build.log" | head -40 >"$out/ptxas.txt" 2>/dev/null

stage check 120 $py -m vita_engine.cli check
if [ $has_gpu = 1 ]; then
  TAIL=40 stage tests_cuda 240 $py -m pytest -q -m cuda -p no:cacheprovider tests --maxfail=20 --ignore-glob="*test_server*"
fi
if [ $has_gpu = 1 ] && [ "${1:-}" != "--tests-only" ]; then
  stage bench_ops 90 $py bench/ops_ratio.py --device cuda --json "$out/ops.json"
  [ -f bench/gpu_attention_check.py ] && TAIL=60 stage bench_attention 240 $py bench/gpu_attention_check.py
  [ -f bench/codec_rtf.py ] && stage bench_codec 90 $py bench/codec_rtf.py --device cuda
  [ -f bench/tts_step.py ] && stage bench_tts 60 $py bench/tts_step.py --device cuda
  if [ "${1:-}" != "--quick" ]; then
    stage runtime_1 100 $py -m vita_engine.cli bench --dims full --device cuda --sessions 1 --turns 3 --json
    stage runtime_16 120 $py -m vita_engine.cli bench --dims full --device cuda --sessions 16 --turns 2 --json
  fi
elif [ $has_gpu = 0 ]; then
  stage bench_ops 240 $py bench/ops_ratio.py --device cpu --json "$out/ops.json"
fi

echo
echo "================ summary ================"
cat "$summary"
for f in bench_ops bench_attention bench_codec bench_tts; do
  [ -f "$out/$f.log" ] && { echo "--- $f"; grep -E "ratio|GB/s|TFLOP|RTF|FAIL|SUMMARY|rms_norm|silu|rotary|fuse|decode|prefill|batch" "$out/$f.log" | tail -40; }
done
for f in runtime_1 runtime_16; do
  [ -f "$out/$f.log" ] && { echo "--- $f"; $py - "$out/$f.log" <<'PY'
import json, sys
txt = open(sys.argv[1]).read()
try:
    d = json.loads(txt[txt.index("{"):])
    print(d.get("sessions"), "sessions", d.get("turns_done"), "turns")
    for k, m in d.get("metrics", {}).items():
        print(f"  {k:<24} p50 {m['p50']:>9} p90 {m['p90']:>9} p99 {m['p99']:>9}")
except Exception as e:
    print("unreadable:", e, txt[-500:])
PY
  }
done
cp "$summary" "$final/summary.txt" 2>/dev/null
tar -C "$out" -czf "$final/logs.tgz" . 2>/dev/null

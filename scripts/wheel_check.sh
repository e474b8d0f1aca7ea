#!/usr/bin/env bash
# The wheel on its own, as a new user installs it: a fresh venv holding only torch and the wheel
# that scripts/setup.sh built in dist/ (its declared dependencies come from the package index),
# then, from an empty folder, `vita-engine demo --json`, `vita-engine check` and
# `vita-engine bench-kernels --json`. Builds nothing.
#   VITA_WHEEL_VENV         venv folder (default: inside a temp folder, removed afterwards)
#   VITA_WHEEL_MIN_AUDIO_S  shortest acceptable spoken answer of the demo, seconds (default 1.0)
#   TORCH_SPEC              default torch==2.13.0 (pip takes it from this machine's wheel files)
#   PYTHON                  interpreter for the venv (default python3; must match the wheel's tag)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
min_audio_s=${VITA_WHEEL_MIN_AUDIO_S:-1.0}

shopt -s nullglob
wheels=(dist/vita_engine-*.whl)
if [ ${#wheels[@]} -ne 1 ]; then
  echo "wheel_check: expected exactly one dist/vita_engine-*.whl (run scripts/setup.sh), found ${#wheels[@]}" >&2
  exit 1
fi
whl=$repo/${wheels[0]}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vita-wheel-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
venv=${VITA_WHEEL_VENV:-$tmp/venv}
t0=$(date +%s)
step() { echo "wheel_check: $* (+$(( $(date +%s) - t0 )) s)"; }

rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch and the wheel in ONE resolve: a torch range asked for alone would pull a CUDA build.
# --no-compile: byte-compiling all of torch costs more than compiling what the commands import.
# (The filter drops pip's notes about this machine's absent local index folders.)
"$venv/bin/python" -m pip install -q --no-compile "${TORCH_SPEC:-torch==2.13.0}" "$whl" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
step "installed torch + $(basename "$whl") into a fresh venv"

# A neutral folder, a fresh cache (the tiny model is written by the installed package), no
# PYTHONPATH and no activated venv: nothing from the source tree can leak in.
mkdir "$tmp/run" "$tmp/cache"
cd "$tmp/run"
env -u PYTHONPATH -u VIRTUAL_ENV XDG_CACHE_HOME="$tmp/cache" "$venv/bin/python" -c \
  "import vita_engine, sys; p = vita_engine.__file__; sys.exit(0 if p.startswith('$venv/') else 'vita_engine imported from ' + p)"
vita() { env -u PYTHONPATH -u VIRTUAL_ENV XDG_CACHE_HOME="$tmp/cache" "$venv/bin/vita-engine" "$@"; }

vita demo --json > demo.json
"$venv/bin/python" - demo.json "$min_audio_s" <<'EOF'
import json, math, sys
rep = json.load(open(sys.argv[1]))
need = float(sys.argv[2])
problems = [k for k in ("ttfa_ms", "response_ms", "stages", "audio_out_seconds", "text") if k not in rep]
if not problems:
    if not (math.isfinite(rep["ttfa_ms"]) and rep["ttfa_ms"] >= 0):
        problems.append(f"ttfa_ms {rep['ttfa_ms']}")
    if rep["audio_out_seconds"] < need:
        problems.append(f"answer audio {rep['audio_out_seconds']} s < {need} s")
    for st in ("audio_encoder_ms", "prefill_ms"):
        if st not in rep["stages"]:
            problems.append(f"no stage {st}")
print(f"wheel_check: demo: {rep.get('audio_out_seconds')} s of answer audio (need >= {need}), "
      f"ttfa_ms {rep.get('ttfa_ms')}, response_ms {rep.get('response_ms')}, text {rep.get('text')!r}")
sys.exit("wheel_check: demo --json: " + "; ".join(problems) if problems else 0)
EOF
step "vita-engine demo --json"

vita check > check.txt || { cat check.txt; echo "wheel_check: vita-engine check failed" >&2; exit 1; }
tail -1 check.txt
step "vita-engine check"

vita bench-kernels --json > bench.json || { echo "wheel_check: vita-engine bench-kernels failed" >&2; exit 1; }
"$venv/bin/python" -c "
import json, sys
r = json.load(open('bench.json'))
assert r['results'], 'bench-kernels --json: no results'
for x in r['results']:
    assert {'name', 'dtype', 'shape', 'ours_ms', 'ref_ms', 'ratio', 'ratio_min', 'ratio_max'} <= set(x), f'bench-kernels --json: result without timings: {x}'
print('wheel_check: bench-kernels:', len(r['results']), 'results on', r['device'])"
step "vita-engine bench-kernels --json"
step "OK"

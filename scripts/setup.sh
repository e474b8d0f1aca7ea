#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a venv with torch, the build tools, and vita-engine built
# as a wheel (CPU kernels always; CUDA kernels when nvcc is found) and installed from it.
#   VITA_VENV   venv folder (default .venv)      VITA_CUDA_ARCHS  e.g. "90a" (default "80;90a")
#   VITA_ENABLE_CUDA=OFF   CPU-only build          TORCH_SPEC       default torch==2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VITA_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.13" "nvidia-cutlass>=4.2,<5" "cmake>=3.26" ninja numpy
python -m pip install -q -r requirements-test.txt
# Build the wheel users install; the build dir is kept so a re-run only recompiles what changed.
tag=$(python -c "import sys,platform;print(f'cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}')")
rm -f dist/vita_engine-*.whl
start=$(date +%s)
python -m pip wheel -q --no-build-isolation --no-deps -w dist -Cbuild-dir="build/wheel-$tag" .
echo "vita-engine: wheel built in $(( $(date +%s) - start )) s: $(ls dist/vita_engine-*.whl)"
python -m pip install -q --force-reinstall --no-deps dist/vita_engine-*.whl
python -c "import vita_engine as v; print('vita-engine', v.__version__, '| CUDA kernels:', v.built_with_cuda(), v.cuda_arch_list(), '| GPU:', v.cuda_available())"

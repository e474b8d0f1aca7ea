#!/usr/bin/env bash
# Fast in-tree developer build: compiles vita_engine._C into python/vita_engine/ so that
# `PYTHONPATH=python pytest` uses it. Usage: scripts/dev_build.sh [cpu|cuda] (default: cuda if nvcc exists)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-auto}
py=${PYTHON:-python}
cuda=ON
[ "$mode" = cpu ] && cuda=OFF
dir=build/dev-$([ $cuda = ON ] && echo cuda || echo cpu)
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVITA_ENABLE_CUDA=$cuda \
  -DPython_EXECUTABLE="$(command -v $py)" -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" \
  ${VITA_CUDA_ARCHS:+-DVITA_CUDA_ARCHS=$VITA_CUDA_ARCHS} >/dev/null
cmake --build "$dir" -j "${VITA_BUILD_JOBS:-$(nproc)}"
cp -f "$dir"/_C*.so python/vita_engine/
echo "built $(ls python/vita_engine/_C*.so) ($dir)"

#!/usr/bin/env bash
# CI entry point for the C++ side (no GPU needed):
#   1. configure CMake (kernels for DISTATTN_CUDA_ARCHS, default "90a;80"),
#   2. compile every kernel translation unit with nvcc (compile-only static library),
#   3. build and run the host unit tests with ctest, and the compile gate on ptxas's report
#      (tests/cpp/ptxas_gate.py: no spills or stack at head_dim 64/128, no advisory C7510).
# Exits non-zero on any failure. Needs: cmake >= 3.22, ninja (or make), nvcc (CUDA >= 12),
# g++, and the CUTLASS/CuTe headers of the `nvidia-cutlass` pip package (installed here if
# the current python lacks it).
#
# Environment: DISTATTN_CUDA_ARCHS (e.g. "80" for a faster check), DISTATTN_CI_BUILD_DIR
# (default build/cmake-ci), CUDACXX / PATH to pick nvcc (default /usr/local/cuda/bin/nvcc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${DISTATTN_CI_BUILD_DIR:-$ROOT/build/cmake-ci}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null 2>&1; then
  echo "ci.sh: nvcc not found (set CUDACXX or PATH)" >&2
  exit 1
fi

if ! "$PYTHON" -c "import cutlass_library" >/dev/null 2>&1; then
  echo "ci.sh: installing nvidia-cutlass (CUTLASS/CuTe headers) for $PYTHON"
  "$PYTHON" -m pip install --quiet "nvidia-cutlass==4.2.0"
fi

# The SASS gate disassembles the Hopper TUs; a toolkit without cuobjdump gets NVIDIA's wheels.
if ! "$PYTHON" -c "import sys; sys.path.insert(0, '$ROOT/tests/cpp'); import sass_gate; \
sys.exit(sass_gate.find_cuobjdump()[0] is None)" >/dev/null 2>&1; then
  echo "ci.sh: installing cuobjdump and nvdisasm (nvidia-cuda-cuobjdump/-nvdisasm) for $PYTHON"
  "$PYTHON" -m pip install --quiet "nvidia-cuda-cuobjdump==13.2.78" "nvidia-cuda-nvdisasm==13.2.78"
fi

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

start=$(date +%s)
cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
  -DDISTATTN_CUDA_ARCHS="${DISTATTN_CUDA_ARCHS:-90a;80}"
cmake --build "$BUILD" --parallel "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure
echo "ci.sh: kernels compiled and host tests passed in $(( $(date +%s) - start )) s"

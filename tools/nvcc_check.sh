#!/usr/bin/env bash
# Compile every csrc/*.cu to an sm_90 object against the installed torch's headers, so the CUDA
# kernels cannot rot on machines without a GPU. Prints one line per file; exits non-zero on any
# compile error. Uses the python on PATH (run from the project venv).
set -euo pipefail

cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found on PATH; skipping the CUDA compile check"
  exit 0
fi

# torch's own include dirs plus Python's (torch/extension.h pulls in Python.h).
mapfile -t INCLUDES < <(python - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-I" + p)
PY
)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# torch's CPU wheel ships the c10/cuda headers but not the one CMake generates for CUDA builds;
# supply its (one-line) content so the check also runs against a CPU-only torch.
TORCH_INC="$(python -c 'from torch.utils.cpp_extension import include_paths; print(include_paths()[0])')"
if [ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$TMP/shim/c10/cuda/impl"
  echo '#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS' > "$TMP/shim/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDES+=("-I$TMP/shim")
fi

shopt -s nullglob
files=(csrc/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "nvcc_check: no csrc/*.cu files"
  exit 0
fi

status=0
for f in "${files[@]}"; do
  obj="$TMP/$(basename "${f%.cu}").o"
  start=$(date +%s)
  # The same defines torch's CUDAExtension passes, so the check sees what a real build sees.
  if nvcc -arch=sm_90 -std=c++17 -O3 -c "$f" -o "$obj" "${INCLUDES[@]}" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -DTORCH_EXTENSION_NAME=_C \
      -DTORCH_API_INCLUDE_EXTENSION_H -Xcompiler -fPIC > "$TMP/log" 2>&1; then
    echo "nvcc_check: OK   $f ($(( $(date +%s) - start ))s)"
  else
    echo "nvcc_check: FAIL $f"
    cat "$TMP/log"
    status=1
  fi
done
exit $status

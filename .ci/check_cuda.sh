#!/usr/bin/env bash
# Compile-check the cuda backend without a GPU (and without a CUDA build of torch):
#  1. nvcc -c csrc/synth_cuda_kernels.cu (CUDA headers only), with torch's half/bf16 flags;
#  2. a syntax-only host compile of csrc/synth_cuda.cpp against torch's headers
#     (a CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h: a stub stands in).
# DNI_FAST_TORCH_INCLUDE=/path/to/torch/include checks every csrc/*.cpp (CUDA part
# on) against another torch's headers instead, e.g. the GPU machine's:
#   unzip -q torch-2.11.0-*.whl 'torch/include/*' -d /tmp/t211
#   DNI_FAST_TORCH_INCLUDE=/tmp/t211/torch/include bash .ci/check_cuda.sh
#  3. where torch has CUDA, a full build of the extension with its CUDA part on a copy of the sources,
#     and the module loads.
# Skips (exit 0) with a message when nvcc or torch is missing. Takes ~15 s (~60 s with step 3).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
PY="${PYTHON:-python3}"
CUDA_INC=""
# nvcc may be a wrapper script (exec /usr/local/cuda-X/bin/nvcc "$@") rather than a link: try the versioned
# toolkits too
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda /usr/local/cuda-*; do
  if [[ -n "$d" && -f "$d/include/cuda_runtime_api.h" ]]; then CUDA_INC="$d/include"; break; fi
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

ARCHS="${DNI_FAST_CHECK_ARCHS:-80 90}"
gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
echo "check_cuda: $("$NVCC" --version | tail -1)"
"$NVCC" -c -std=c++17 -O3 -Xcompiler -fPIC -Xptxas -warn-spills "${gencode[@]}" \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ csrc/synth_cuda_kernels.cu -o "$tmp/synth_cuda_kernels.o"
echo "check_cuda: csrc/synth_cuda_kernels.cu compiles (sm_${ARCHS// /, sm_})"

inc_py='from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))'
sources=(csrc/synth_cuda.cpp)
if [[ -n "${DNI_FAST_TORCH_INCLUDE:-}" ]]; then
  t="$DNI_FAST_TORCH_INCLUDE"
  inc="-I$t -I$t/torch/csrc/api/include -I$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  sources=(csrc/*.cpp)
elif ! inc="$("$PY" -c "$inc_py" 2>/dev/null)"; then
  echo "check_cuda: torch not importable; skipping the host-side check of csrc/synth_cuda.cpp"
  exit 0
fi
if [[ -z "$CUDA_INC" ]]; then
  echo "check_cuda: cuda_runtime_api.h not found (set CUDA_HOME); skipping the host-side check"
  exit 0
fi
mkdir -p "$tmp/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
# shellcheck disable=SC2086
"${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -DDNI_FAST_WITH_CUDA \
  $inc -idirafter "$tmp/stub" -I"$CUDA_INC" "${sources[@]}"
echo "check_cuda: host syntax check passed${DNI_FAST_TORCH_INCLUDE:+ against $DNI_FAST_TORCH_INCLUDE}: ${sources[*]}"

# 3. Where this torch has CUDA (the README's bare `pip install torch` gives a CUDA wheel), a full build of the
#    extension with its CUDA part, on a copy of the sources: every file compiles and links against this
#    torch and the toolkit, and the module loads (no GPU needed to load it). ~45 s on 2 cores.
if [[ -z "${DNI_FAST_TORCH_INCLUDE:-}" ]] && "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
    2>/dev/null; then
  mkdir -p "$tmp/src"
  cp -r csrc kernels dni_fast setup.py pyproject.toml README.md "$tmp/src/"
  rm -f "$tmp/src/dni_fast/"_C*.so
  if ! (cd "$tmp/src" && CUDA_HOME="$(dirname "$CUDA_INC")" DNI_FAST_FORCE_CUDA=TRUE TORCH_CUDA_ARCH_LIST="9.0" \
        CFLAGS=-g0 "$PY" setup.py -q build_ext --inplace >"$tmp/build.log" 2>&1); then
    tail -40 "$tmp/build.log"
    echo "check_cuda: the CUDA build of the extension failed" >&2
    exit 1
  fi
  SO="$(ls "$tmp/src/dni_fast/"_C*.so)" "$PY" -c '
import importlib.util, os, torch
spec = importlib.util.spec_from_file_location("dni_fast._C", os.environ["SO"])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
assert m.WITH_CUDA, "the extension was built without its CUDA part"'
  echo "check_cuda: the extension builds and links with its CUDA part (sm_90) against torch $("$PY" -c 'import torch; print(torch.__version__)') and loads"
else
  echo "check_cuda: this torch has no CUDA (or other headers were given): no full CUDA build"
fi

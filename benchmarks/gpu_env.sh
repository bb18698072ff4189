# Sourced by the GPU jobs (gpu_run.sh, gpu_local.sh, gpu_decoupled.sh): strict mode, $OUT (default: the
# first argument), the repository root as the working folder, `python` and CUDA_HOME found, the machine's GPU
# and versions in $OUT/env.txt, and build_extension (below).
set -uo pipefail
OUT=${OUT:-$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Every command below says `python`; an image with only `python3` gets a shim (timeout runs a binary, not a
# shell function).
if ! command -v python >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
  mkdir -p /tmp/dni_fast_pyshim && ln -sf "$(command -v python3)" /tmp/dni_fast_pyshim/python
  export PATH="/tmp/dni_fast_pyshim:$PATH"
fi

# torch guesses the CUDA toolkit as two folders above `which nvcc`: wrong when nvcc is a wrapper script (as in
# /usr/local/bin), and setup.py then builds no CUDA code (DNI_FAST_FORCE_CUDA=TRUE makes that an error). Take
# the first candidate that has the runtime headers.
if [[ -z "${CUDA_HOME:-}" || ! -f "${CUDA_HOME:-}/include/cuda_runtime_api.h" ]]; then
  nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")
  for d in "$nvcc_dir" /usr/local/cuda /usr/local/cuda-*; do
    if [[ -f "$d/include/cuda_runtime_api.h" ]]; then export CUDA_HOME="$d"; break; fi
  done
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "nvcc: $(command -v nvcc) ($(nvcc --version 2>/dev/null | tail -1)); CUDA_HOME=${CUDA_HOME:-unset}"
} 2>&1 | tee "$OUT/env.txt"

# build_extension SECONDS: the C++/CUDA extension, with CUDA (DNI_FAST_FORCE_CUDA=TRUE), unless a CUDA build
# is already importable. `pip install -e .` first; where that fails (no pip, PEP 668, a timeout), in place,
# with the repository on PYTHONPATH (exported: it lasts for the sourcing script) and dni_fast/kernels linked
# to the top-level kernels/ folder (which only the editable install maps). Log: $OUT/build.log.
build_extension() {
  local slot=$1 t=$(date +%s)
  if python -c "import sys, dni_fast._C as C; sys.exit(0 if getattr(C, 'WITH_CUDA', False) else 1)" 2>/dev/null; then
    echo "extension already built with CUDA" | tee -a "$OUT/build.log"; return 0
  fi
  { python -m pip --version; python -c "import setuptools; print('setuptools', setuptools.__version__)"; } \
    >>"$OUT/build.log" 2>&1
  # PIP_BREAK_SYSTEM_PACKAGES: an image whose Python is marked externally managed (PEP 668) refuses pip otherwise
  if ! PIP_BREAK_SYSTEM_PACKAGES=1 DNI_FAST_FORCE_CUDA=TRUE CFLAGS=-g0 timeout "$slot" \
      python -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1; then
    echo "pip build failed; building in place" | tee -a "$OUT/build.log"; tail -20 "$OUT/build.log"
    [[ -e dni_fast/kernels ]] || ln -s ../kernels dni_fast/kernels
    local rest=$(( slot - ($(date +%s) - t) )); (( rest < 60 )) && rest=60
    DNI_FAST_FORCE_CUDA=TRUE CFLAGS=-g0 timeout "$rest" python setup.py build_ext --inplace \
      >>"$OUT/build.log" 2>&1 || { echo "in-place build failed"; tail -20 "$OUT/build.log"; }
  fi
  # whichever way it went, the repository's own dni_fast (and its kernels) must import from any folder
  if ! python -c "import dni_fast.kernels" 2>/dev/null || ! (cd /tmp && python -c "import dni_fast") 2>/dev/null; then
    [[ -e dni_fast/kernels ]] || ln -s ../kernels dni_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "build took $(( $(date +%s) - t )) s" | tee -a "$OUT/build.log"
}

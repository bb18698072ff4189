#!/usr/bin/env bash
# dni_fast.local on a GPU, in one device command (about 5 minutes): the
# InfoNCE tests with the Triton kernels compiled (one fixed tile config, so
# that each odd test shape compiles once), then the benchmarks with
# autotuning, writing everything under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_local.sh
#
# Results to commit afterwards: $OUT/infonce_cuda.csv and
# $OUT/local_memory_cuda.csv -> benchmarks/results/, and the tables in
# docs/local.md.
set -uo pipefail
OUT=${OUT:-/tmp/dni_fast_local_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
DNI_FAST_TRITON_AUTOTUNE=0 timeout 200 python -m pytest -q -x tests/test_infonce.py tests/test_local.py \
  2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 240 python benchmarks/bench_infonce.py --device cuda --min-run-time 1 --csv "$OUT/infonce_cuda.csv" \
  2>&1 | tee "$OUT/bench_infonce.txt"
timeout 90 python benchmarks/bench_local_memory.py --device cuda --min-run-time 1 --csv "$OUT/local_memory_cuda.csv" \
  2>&1 | tee "$OUT/bench_local_memory.txt"

#!/usr/bin/env bash
# One call on a GPU machine: build the extension with CUDA, run the test suite
# on the GPU, run the benchmarks, and write everything under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh            # anywhere
#   (device tool) command: bash benchmarks/gpu_run.sh  # $OUT is set there
#
# Results to commit afterwards: $OUT/bench_gpu.csv -> benchmarks/results/,
# $OUT/autotable.json -> dni_fast/_autotable.json, and the README table.
set -uo pipefail
OUT=${OUT:-/tmp/dni_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build" | tee "$OUT/build.log"
start=$(date +%s)
DNI_FAST_FORCE_CUDA=TRUE CFLAGS=-g0 python -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 \
  || { echo "build failed"; tail -40 "$OUT/build.log"; }
echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
python -m dni_fast info 2>&1 | tee "$OUT/info.txt"

echo "== tests on the GPU"
timeout 300 python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/tests.log"

echo "== launch counts"
timeout 60 python benchmarks/profile_launches.py --dtype bfloat16 2>&1 | tee "$OUT/launches.txt"

echo "== benchmarks"
timeout 360 python -m dni_fast bench --dtype float32 bfloat16 --tf32 --csv "$OUT/bench_gpu.csv" \
  --write-auto-table 2>&1 | tee "$OUT/bench.txt"
cp dni_fast/_autotable.json "$OUT/autotable.json" 2>/dev/null
echo "done: $(ls "$OUT")"

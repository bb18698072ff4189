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
source "$(dirname "$0")/gpu_env.sh" /tmp/dni_fast_local_gpu
build_extension 170  # the tests import dni_fast (and its kernels) from the repository either way
DNI_FAST_TRITON_AUTOTUNE=0 timeout -s INT -k 15 200 python -m pytest -q -x tests/test_infonce.py tests/test_local.py \
  2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 240 python benchmarks/bench_infonce.py --device cuda --min-run-time 1 --csv "$OUT/infonce_cuda.csv" \
  2>&1 | tee "$OUT/bench_infonce.txt"
timeout 90 python benchmarks/bench_local_memory.py --device cuda --min-run-time 1 --csv "$OUT/local_memory_cuda.csv" \
  2>&1 | tee "$OUT/bench_local_memory.txt"

#!/usr/bin/env bash
# DecoupledSequential on a GPU, in one device command (about 7 minutes on a
# fresh machine, where it builds the extension itself; 4 after gpu_run.sh):
#   1. the decoupled tests, with the real-CUDA ones (streams and CUDA graphs
#      against sequential on the device);
#   2. issue 10's benchmark 3: `streams` against `sequential` on four equal
#      stages that under-fill the GPU (target: at most 0.7x the time);
#   3. issue 10's benchmark 4: the MLP with drop-in overlap and the whole
#      step in a CUDA graph against eager backprop, fp32 and bf16 autocast,
#      B=256 (and the overlap tests, CUDA graph capture included).
#
#   OUT=/tmp/out bash benchmarks/gpu_decoupled.sh
#
# Results to commit afterwards: $OUT/bench_decoupled_cuda.csv and
# $OUT/bench_mlp_overlap_cuda.csv -> benchmarks/results/, the figures in
# docs/decoupled.md.
source "$(dirname "$0")/gpu_env.sh" /tmp/dni_fast_decoupled_gpu
# Budget (one device command, 600 s): build 170 (only on a fresh machine) + tests 100 + 130 + 150 = 550 s.
build_extension 170
export DNI_FAST_TRITON_AUTOTUNE=0  # fixed tiles: autotuning each new shape would eat the slots
timeout -s INT -k 15 100 python -m pytest -q -rfEs -p no:cacheprovider tests/test_decoupled.py tests/test_overlap.py >"$OUT/tests.txt" 2>&1
tail -30 "$OUT/tests.txt"
timeout 130 python benchmarks/bench_decoupled.py --device cuda --out "$OUT/bench_decoupled_cuda.csv" \
  2>&1 | tee "$OUT/bench_decoupled.txt"
# every MLP provider eager and with the whole step in one CUDA graph (<p>+graph), fp32 and under bf16 autocast;
# issue 10's target: <backend>+overlap+graph at most 1.0x eager `backprop`
timeout 150 python -m dni_fast bench --device cuda --sizes 256,256 --mlp-batch 256 --no-compile --overlap --graphs \
  --mlp-autocast --mlp-adam fused --csv "$OUT/bench_mlp_overlap_cuda.csv" 2>&1 | tee "$OUT/bench_mlp_overlap.txt"

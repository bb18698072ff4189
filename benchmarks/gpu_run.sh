#!/usr/bin/env bash
# One call on a GPU machine: build the extension with CUDA, run the test suite
# on the GPU, run the benchmarks, and write everything under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh            # anywhere
#   (device tool) command: bash benchmarks/gpu_run.sh  # $OUT is set there
#
# It must fit one device command (10 minutes), so the phases run against a
# deadline, most valuable first, and each writes its results as it goes:
#   1. build (DNI_FAST_FORCE_CUDA=TRUE);
#   2. the headline benchmark, docs/design.md §5: B=256, D=H=1024 in fp32, TF32 and
#      bf16, every provider with torch.compile and the floor, then the MLP
#      (each backend also with drop-in overlap, <backend>+overlap);
#   3. the tests that exercise the GPU (test_cpp_ext, test_ops, test_triton,
#      test_overlap, test_decoupled, test_infonce; no -x, the full log kept),
#      after a check of the kernels against the reference at the headline size;
#   4. kernel launch counts per step (torch.profiler);
#   5. the rest of the size grid (no torch.compile) until the deadline;
#   6. the autotuned Triton kernels at the headline size, if time is left;
#   7. the `auto` table from every row measured (bench --auto-table-from).
# Phases 2-5 use one fixed Triton tile config (DNI_FAST_TRITON_AUTOTUNE=0):
# autotuning compiles up to 18 configs per shape and dtype, more than a slot.
# If `pip install -e .` fails (no pip, PEP 668), the extension is built in
# place and the repository put on PYTHONPATH.
# Budget: DNI_FAST_GPU_BUDGET seconds in all (default 540).
#
# Results to commit afterwards: $OUT/bench_gpu.csv -> benchmarks/results/,
# $OUT/autotable.json -> dni_fast/_autotable.json, and the README table.
# $OUT holds 8 files (the device tool brings back at most 8).
OUT=${OUT:-/tmp/dni_fast_gpu}
t0=$(date +%s)
source "$(dirname "$0")/gpu_env.sh"  # strict mode, the repository root, python, CUDA_HOME, env.txt
BUDGET=${DNI_FAST_GPU_BUDGET:-540}
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
# timeout for a phase: what is left minus a reserve for the phases after it, at least 10 s
slot() { local s=$(( $(left) - $1 )); (( s < 10 )) && s=10; echo "$s"; }
# pytest under SIGINT first: killed by SIGTERM it would die before printing its failures
ptimeout() { timeout -s INT -k 15 "$@"; }
CSV="$OUT/bench_gpu.csv"

echo "== build" | tee "$OUT/build.log"
build_extension "$(slot 380)"
python -m dni_fast info 2>&1 | tee "$OUT/info.txt"

# Fixed Triton tiles for everything timed within the budget (DNI_FAST_TRITON_AUTOTUNE=0): autotuning compiles
# and times up to 10 + 8 configs per new shape and dtype (0.6-12 s each), more than a phase's slot. The
# autotuned kernels run last, on the headline size only, if time is left.
export DNI_FAST_TRITON_AUTOTUNE=0
echo "== headline benchmark ($(left) s left)" | tee "$OUT/bench.txt"
timeout "$(slot 260)" python -m dni_fast bench --sizes 256,1024 --dtype float32 bfloat16 --tf32 --overlap --csv "$CSV" \
  2>&1 | tee -a "$OUT/bench.txt"

echo "== tests on the GPU ($(left) s left)" | tee "$OUT/tests.log"
timeout 60 python - <<'PY' 2>&1 | tee -a "$OUT/tests.log"
# the Triton kernels (and cuda) against the reference at the headline size; each case on its own, so that one
# failing backend or dtype does not hide the others
import traceback

import torch
from torch import nn
import dni_fast as dni
from dni_fast.testing import compare_backends

B, D = 256, 1024
for backend in [b for b in ("triton", "cuda") if dni.backend_status(b, "cuda")[0]]:
    for dtype, tol in ((torch.float32, dict(rtol=1e-3, atol=1e-4)), (torch.bfloat16, dict(rtol=3e-2, atol=3e-2))):
        try:
            def make():
                m = nn.Sequential(nn.Linear(D, D), dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1)))
                with torch.no_grad():
                    m[1].synthesizer.layers[-1].weight.normal_(0, 0.01)
                return m.to("cuda", dtype)
            x = torch.randn(B, D, device="cuda", dtype=dtype)
            rep = compare_backends(make, lambda m: m(x), backend, **tol)
            print(f"headline check {backend} {dtype}: {'ok' if not rep.failures else 'FAILED'} "
                  f"({len(rep.compared)} tensors)")
            for f in rep.failures[:5]:
                print("  ", f)
        except Exception:
            print(f"headline check {backend} {dtype}: ERROR")
            traceback.print_exc()
PY
# The tests that exercise the GPU first (no -x: every failure is listed), the full log in tests.log
ptimeout "$(slot 110)" python -m pytest -q -rfEs -p no:cacheprovider tests/test_cpp_ext.py tests/test_ops.py \
  tests/test_triton.py tests/test_overlap.py tests/test_decoupled.py tests/test_infonce.py >>"$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log"

echo "== launch counts ($(left) s left)"
timeout "$(slot 80)" python benchmarks/profile_launches.py --dtype bfloat16 2>&1 | tee "$OUT/launches.txt"

echo "== size grid ($(left) s left)" | tee -a "$OUT/bench.txt"
timeout "$(slot 45)" python -m dni_fast bench --no-compile --no-mlp --dtype float32 bfloat16 --tf32 --csv "$CSV" \
  --time-budget "$(slot 90)" --sizes 64,256 256,256 64,1024 1024,1024 256,4096 64,4096 1024,256 1024,4096 \
  2>&1 | tee -a "$OUT/bench.txt"

echo "== autotuned Triton kernels at the headline size ($(left) s left)" | tee -a "$OUT/bench.txt"
DNI_FAST_TRITON_AUTOTUNE=1 timeout "$(slot 15)" python -m dni_fast bench --no-compile --no-mlp --sizes 256,1024 \
  --dtype bfloat16 float32 --providers reference triton --csv "$CSV" 2>&1 | tee -a "$OUT/bench.txt"

[[ -f "$CSV" ]] && python -m dni_fast bench --auto-table-from "$CSV" 2>&1 | tee -a "$OUT/bench.txt"
cp dni_fast/_autotable.json "$OUT/autotable.json" 2>/dev/null
echo "done in $(( $(date +%s) - t0 )) s: $(ls "$OUT")"

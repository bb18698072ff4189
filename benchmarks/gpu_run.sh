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
#   3. the test suite on the GPU. The Triton kernels use one fixed tile config
#      (DNI_FAST_TRITON_AUTOTUNE=0): autotuning every odd test shape would
#      compile ~10 configs per shape. A check of the autotuned kernels against
#      the reference at the headline size runs first;
#   4. kernel launch counts per step (torch.profiler);
#   5. the rest of the size grid (no torch.compile) until the deadline;
#   6. the `auto` table from every row measured (bench --auto-table-from).
# Budget: DNI_FAST_GPU_BUDGET seconds in all (default 540).
#
# Results to commit afterwards: $OUT/bench_gpu.csv -> benchmarks/results/,
# $OUT/autotable.json -> dni_fast/_autotable.json, and the README table.
# $OUT holds 8 files (the device tool brings back at most 8).
set -uo pipefail
OUT=${OUT:-/tmp/dni_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
t0=$(date +%s)
BUDGET=${DNI_FAST_GPU_BUDGET:-540}
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
# timeout for a phase: what is left minus a reserve for the phases after it, at least 10 s
slot() { local s=$(( $(left) - $1 )); (( s < 10 )) && s=10; echo "$s"; }
CSV="$OUT/bench_gpu.csv"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build" | tee "$OUT/build.log"
DNI_FAST_FORCE_CUDA=TRUE CFLAGS=-g0 timeout "$(slot 360)" \
  python -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 \
  || { echo "build failed"; tail -40 "$OUT/build.log"; }
echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
python -m dni_fast info 2>&1 | tee "$OUT/info.txt"

echo "== headline benchmark ($(left) s left)" | tee "$OUT/bench.txt"
timeout "$(slot 300)" python -m dni_fast bench --sizes 256,1024 --dtype float32 bfloat16 --tf32 --overlap --csv "$CSV" \
  2>&1 | tee -a "$OUT/bench.txt"

echo "== tests on the GPU ($(left) s left)" | tee "$OUT/tests.log"
timeout 60 python - <<'PY' 2>&1 | tee -a "$OUT/tests.log"
# the autotuned Triton kernels (and cuda) against the reference at the headline size
import torch
from torch import nn
import dni_fast as dni
from dni_fast.testing import compare_backends

B, D = 256, 1024
for backend in [b for b in ("triton", "cuda") if dni.backend_status(b, "cuda")[0]]:
    for dtype, tol in ((torch.float32, dict(rtol=1e-3, atol=1e-4)), (torch.bfloat16, dict(rtol=3e-2, atol=3e-2))):
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
PY
DNI_FAST_TRITON_AUTOTUNE=0 timeout "$(slot 120)" python -m pytest tests -q -x -p no:cacheprovider 2>&1 \
  | tail -40 | tee -a "$OUT/tests.log"

echo "== launch counts ($(left) s left)"
timeout "$(slot 90)" python benchmarks/profile_launches.py --dtype bfloat16 2>&1 | tee "$OUT/launches.txt"

echo "== size grid ($(left) s left)" | tee -a "$OUT/bench.txt"
timeout "$(slot 15)" python -m dni_fast bench --no-compile --no-mlp --dtype float32 bfloat16 --tf32 --csv "$CSV" \
  --time-budget "$(slot 75)" --sizes 64,256 256,256 64,1024 1024,1024 256,4096 64,4096 1024,256 1024,4096 \
  2>&1 | tee -a "$OUT/bench.txt"

[[ -f "$CSV" ]] && python -m dni_fast bench --auto-table-from "$CSV" 2>&1 | tee -a "$OUT/bench.txt"
cp dni_fast/_autotable.json "$OUT/autotable.json" 2>/dev/null
echo "done in $(( $(date +%s) - t0 )) s: $(ls "$OUT")"

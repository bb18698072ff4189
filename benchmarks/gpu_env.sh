# Sourced by the GPU jobs (gpu_local.sh, gpu_decoupled.sh): strict mode, $OUT
# (default: the first argument), the repository root as the working folder,
# and the machine's GPU and versions in $OUT/env.txt.
set -uo pipefail
OUT=${OUT:-$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

#!/usr/bin/env bash
# The training benchmark on one GPU (e.g. an H100 through the device tool), JAX and PyTorch
# (eager and torch.compile, TF32 on: the like-for-like partner of JAX's default f32 precision)
# side by side, one JSON object per line. Finishes in a few minutes.
#
#   bash tools/gpu_benchmark.sh                    # the figures for the README
#   bash tools/gpu_benchmark.sh --dtype=bfloat16   # extra flags go to tools/benchmark.py
#
# Needs jax with CUDA and torch in the running Python (a GPU image: jax 0.11, torch, no grain);
# the repository itself need not be installed. Results also go to $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."

export XLA_PYTHON_CLIENT_PREALLOCATE=false # leave GPU memory to the torch reference too
export TF_CPP_MIN_LOG_LEVEL=2

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python - <<'EOF'
import jax
print("jax", jax.__version__, jax.devices())
EOF

out="${OUT:-/tmp}/gpu_benchmark.jsonl"
python tools/benchmark.py --what=train --batches=8192,65536 --compare=torch --json \
  --seconds=1.0 --repeats=3 "$@" | tee "$out"
echo "results: $out" >&2

#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with one NVIDIA GPU and JAX with CUDA
# (Python 3.12, jax, flax, transformers and torch with CUDA preinstalled) and no network:
# packages missing there travel as wheels in .whl/, filled beforehand on a connected machine:
#   pip download diffusers importlib_metadata zipp --no-deps -d .whl
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (about 8 minutes; writes OUT_DIR/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out}"
python -c "import diffusers" 2>/dev/null || python -m pip install --quiet --no-index --no-deps .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# JAX would take 75% of the GPU's memory up front, leaving too little for PyTorch afterwards.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHONPATH=. python benchmarks/gpu_check.py --out "$out"

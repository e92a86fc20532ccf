#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with one NVIDIA GPU and JAX with CUDA
# (Python 3.12, jax, flax, transformers and torch with CUDA preinstalled) and no network:
# packages missing there travel as wheels in .whl/, filled beforehand on a connected machine:
#   pip download diffusers importlib_metadata zipp --no-deps -d .whl
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR [options of gpu_check.py]]
# Writes OUT_DIR/gpu_check.json after every measurement and OUT_DIR/log.txt as it goes, and
# skips what would start after --budget-s (420 s), so a run cut short keeps its results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out}"
python -c "import diffusers" 2>/dev/null || python -m pip install --quiet --no-index --no-deps .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# JAX would take 75% of the GPU's memory up front, leaving too little for PyTorch afterwards.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$out"
PYTHONPATH=. python -u benchmarks/gpu_check.py --out "$out" "${@:2}" 2>&1 | tee "$out/log.txt"

#!/usr/bin/env bash
# Rebuilds the built-in model (jaxfusion/builtin_model) from nothing: the four
# `jaxfusion train` runs it was made by, each continuing a snapshot of the run before.
# About 5.5 hours on a 2-core CPU. Here stage 1 was run one round at a time (`--from`, as
# the README's section "The built-in model" tells), stages 2-4 as written; that section
# gives what each stage reads on the accuracy benchmark.
#
#   scripts/train_builtin_model.sh WORK     # the model ends in WORK/4
set -euo pipefail
work=${1:?usage: scripts/train_builtin_model.sh WORK (a new folder for the four stages)}
if [ -e "$work" ]; then
  echo "error: $work exists; give a new folder" >&2
  exit 2
fi

# 1. The VAE, the UNet and 2-layer text encoders at 64x64, then four multi-scale rounds on
#    pyramid noise: the model shipped before is 2,000 steps into the fourth round.
jaxfusion train --snapshots "$work/1-snapshots" --out "$work/1"

# 2. New text encoders (3 layers, 4 heads, sinusoidal position embeddings) on that UNet and
#    VAE, on scenes of two shapes half the time; its 64x64 phase ends at step 6,000.
jaxfusion train --from "$work/1-snapshots/step-16000" --new-text-encoders \
  --text-encoder-layers 3 --text-encoder-heads 4 --sinusoidal-positions \
  --object-counts 0.3 0.5 0.2 --unet-steps 6000 --scale-rounds 1 --scale-steps 2500 \
  --snapshots "$work/2-snapshots" --out "$work/2"

# 3. More 64x64 steps: the colours bind to their places by step 3,000.
jaxfusion train --from "$work/2-snapshots/step-6000" --unet-steps 4000 --scale-rounds 0 \
  --object-counts 0.3 0.5 0.2 --snapshots "$work/3-snapshots" --out "$work/3"

# 4. One multi-scale round, which brings 256x256 back and keeps the binding.
jaxfusion train --from "$work/3-snapshots/step-3000" --unet-steps 0 --scale-rounds 1 \
  --scale-steps 2500 --object-counts 0.3 0.5 0.2 --snapshots "$work/4-snapshots" --out "$work/4"

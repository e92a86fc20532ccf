"""Median CPU (or GPU) time of one UNet forward pass: jaxfusion (JAX, jit-compiled) against
diffusers (PyTorch), same random weights, same inputs, measured side by side in one run.

    python benchmarks/unet_forward.py [--size 64] [--batch 2] [--runs 5] [--json FILE]

The model is a mid-size SDXL-architecture UNet (three levels, text_time conditioning,
transformer depth 1/2/2) with random weights, written by diffusers and loaded by
`jaxfusion.models.load_unet`. Also prints the two outputs' relative L2 difference.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from jaxfusion.models import load_unet

MID_SIZE = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=256,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=128 + 6 * 32,
)


def median_seconds(run, runs: int) -> float:
    run()  # warm-up (compilation for JAX)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((args.batch, args.size, args.size, 4), np.float32)
    text = rng.standard_normal((args.batch, 77, 256), np.float32)
    pooled = rng.standard_normal((args.batch, 128), np.float32)
    time_ids = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (args.batch, 1))
    timestep = np.float32(500.0)

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        torch_unet = TorchUNet(**MID_SIZE).eval()
        torch_unet.save_pretrained(folder)
        unet = load_unet(folder)
    parameters = sum(p.numel() for p in torch_unet.parameters())

    graphdef, state = nnx.split(unet)
    forward = jax.jit(lambda state, *xs: nnx.merge(graphdef, state)(*xs))
    jax_inputs = [jax.device_put(x) for x in (sample, timestep, text, pooled, time_ids)]

    def run_jax():
        return forward(state, *jax_inputs).block_until_ready()

    torch_inputs = {
        "sample": torch.from_numpy(sample).permute(0, 3, 1, 2).contiguous(),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.from_numpy(text),
        "added_cond_kwargs": {
            "text_embeds": torch.from_numpy(pooled),
            "time_ids": torch.from_numpy(time_ids),
        },
    }

    def run_torch():
        with torch.inference_mode():
            return torch_unet(**torch_inputs).sample

    jax_seconds = median_seconds(run_jax, args.runs)
    torch_seconds = median_seconds(run_torch, args.runs)
    ours = np.asarray(run_jax())
    theirs = run_torch().permute(0, 2, 3, 1).numpy()
    difference = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    result = {
        "parameters": parameters,
        "latent": [args.batch, args.size, args.size, 4],
        "jax_platform": jax.devices()[0].platform,
        "jax_seconds": jax_seconds,
        "torch_seconds": torch_seconds,
        "torch_threads": torch.get_num_threads(),
        "torch_over_jax": torch_seconds / jax_seconds,
        "relative_l2": difference,
    }
    print(
        f"UNet {parameters / 1e6:.1f} M parameters, latent {args.batch}x{args.size}x{args.size}x4, "
        f"median of {args.runs}: JAX ({result['jax_platform']}) {jax_seconds * 1e3:.0f} ms | "
        f"PyTorch ({torch.get_num_threads()} threads) {torch_seconds * 1e3:.0f} ms | "
        f"PyTorch/JAX {result['torch_over_jax']:.2f} | outputs differ by {difference:.1e} (rel. L2)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

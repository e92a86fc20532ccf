"""Patch parallelism on simulated CPU devices, one small config: PSNR of every mode against
the single-device image, the collectives of one displaced step with the bytes each device
receives, and the stale-buffer memory per device.

    python benchmarks/patch_parallel.py [--model DIR] [--devices 4] [--size 128] [--steps 10]

Without --model it uses the built-in model (random weights: the PSNRs then measure the
approximation on noise-like activations, not on a trained model's).
"""

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)

from jaxfusion.bench.analyze import abstract_inputs  # noqa: E402
from jaxfusion.builtin import builtin_model_path  # noqa: E402
from jaxfusion.images import psnr  # noqa: E402
from jaxfusion.pipelines import load_pipeline  # noqa: E402
from sharding.analysis import trace_step  # noqa: E402
from sharding.names import GROUP_NORM_RULES  # noqa: E402
from sharding.parallel import ParallelConfig  # noqa: E402

PROMPT = "a red circle at the top left and a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="diffusers pipeline folder (default: built-in)")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    pipe = load_pipeline(args.model or builtin_model_path())
    options = dict(height=args.size, width=args.size, num_inference_steps=args.steps, seed=0)

    print(f"{args.size}x{args.size}, {args.steps} steps, P = {args.devices}: PSNR against single")
    single = pipe(PROMPT, **options)
    configs = {"sync": ParallelConfig(args.devices, mode="sync")}
    for rule in GROUP_NORM_RULES:
        configs[f"displaced, GN {rule}"] = ParallelConfig(args.devices, group_norm=rule)
    configs["naive (rows)"] = ParallelConfig(args.devices, mode="naive")
    for name, parallel in configs.items():
        print(f"  {name:24s} {psnr(pipe(PROMPT, parallel=parallel, **options), single):7.2f} dB")

    latent = args.size // pipe.downscale_factor
    unet, sampling, latents = abstract_inputs(pipe.unet.config, latent, latent, pipe.dtype)
    traced = trace_step(unet, sampling, latents, ParallelConfig(args.devices), "displaced")
    print("\ncollectives of one displaced step (CFG batch 2, C = 1), per device:")
    total = 0
    for c in traced.collectives():
        print(
            f"  {c.kind:11s} {'/'.join(c.axes):6s} {c.shape!s:22s} {c.dtype:8s} "
            f"{c.received_bytes:>10,d} B received"
        )
        total += c.received_bytes
    print(f"  {len(traced.collectives())} collectives, {total:,d} bytes received per device")
    for kind in sorted({c.kind for c in traced.collectives()}):
        of_kind = [c for c in traced.collectives() if c.kind == kind]
        received = sum(c.received_bytes for c in of_kind)
        print(f"    {kind:11s} x{len(of_kind):3d} {received:>12,d} B")
    print(f"stale buffers: {traced.stale_bytes_per_device():,d} bytes per device")


if __name__ == "__main__":
    main()

"""GPU check for one NVIDIA GPU: the SDXL UNet denoising step in JAX (with each attention
kernel of --attention: cuDNN's flash attention and the portable chunked one by default) and
in diffusers (PyTorch), the work one device does in a displaced step for P = 2, 4, 8, and
the P-device step time projected from it. Random weights, bfloat16, the CFG batch of 2.
A kernel that does not apply (cuDNN's compile failing on some CUDA and jax versions) is
recorded with the kernel that ran instead.

    bash benchmarks/gpu_check.sh [OUT_DIR]      # on the GPU machine (installs the wheels)
    python benchmarks/gpu_check.py --tiny       # a small UNet on CPU, to try the script

Projected P-device step = the measured per-device compute + the modelled exchange time (the
bytes one device receives per displaced step, from the traced program, at --link-gbs). That
assumes no overlap at all; with full overlap the step would be the larger of the two.
Prints a table last and writes OUT_DIR/gpu_check.json.
"""

import argparse
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxfusion import schedulers
from jaxfusion.bench import analyze
from jaxfusion.models import Conditioning, UNet2DConditionModel, UNetConfig
from jaxfusion.models.configs import UNET_CONFIGS
from jaxfusion.models.names import ATTENTION_BACKENDS
from jaxfusion.models.scaled_dot_product import (
    cudnn_problem,
    set_attention,
)
from sharding.analysis import local_step, trace_step
from sharding.loops import NO_BUFFERS, SINGLE, Loop, Sampling
from sharding.parallel import ParallelConfig

TINY = dict(
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    norm_num_groups=8,
    projection_class_embeddings_input_dim=32 + 6 * 256,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="folder for gpu_check.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--per-device-sizes", type=int, nargs="+", default=[2048], help="sizes for the P rows"
    )
    parser.add_argument("--budget-s", type=float, default=420, help="skip what starts later")
    parser.add_argument("--runs", type=int, default=10, help="timed runs after 2 warm-up runs")
    parser.add_argument("--link-gbs", type=float, default=300.0, help="GB/s into each device")
    parser.add_argument("--torch-compile-size", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="a small UNet (CPU trial)")
    parser.add_argument(
        "--attention", nargs="+", choices=ATTENTION_BACKENDS, default=["cudnn", "chunked"]
    )
    args = parser.parse_args()
    config = dict(UNET_CONFIGS["sdxl"], **(TINY if args.tiny else {}))
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "unet": "tiny" if args.tiny else "sdxl",
        "dtype": "bfloat16",
        "batch": 2,
        "link_gbs": args.link_gbs,
        "rows": [],
        "errors": [],
        "start": time.perf_counter(),
        "budget_s": args.budget_s,
        "out": Path(args.out),
    }
    record["out"].mkdir(parents=True, exist_ok=True)
    print(f"{record['device']}, jax {jax.__version__}", flush=True)
    print("drawing random weights ...", flush=True)
    unet = random_unet(UNetConfig.from_diffusers(config))
    print(f"random weights ready ({time.perf_counter() - record['start']:.0f} s)", flush=True)
    sizes = [s // 4 for s in args.sizes] if args.tiny else args.sizes
    for size in sizes:
        for backend in args.attention:
            attempt(
                record,
                f"jax single {size} attention={backend}",
                lambda s=size, b=backend: jax_rows(unet, s, b, args, record),
            )
    attempt(record, "torch", lambda: torch_rows(config, sizes, args, record))
    record["seconds"] = round(time.perf_counter() - record["start"], 1)
    save(record)
    print_table(record)


def attempt(record: dict, name: str, run) -> None:
    """Runs one measurement; a failure is recorded and the others go on. Past the time
    budget, measurements are skipped (and listed as such)."""
    if time.perf_counter() - record["start"] > record["budget_s"]:
        record["errors"].append(f"{name}: skipped, over the time budget")
        return
    elapsed = time.perf_counter() - record["start"]
    print(f"[{elapsed:5.0f} s] {name} ...", flush=True)  # the log shows where time goes
    try:
        run()
    except Exception as error:  # one broken measurement must not stop the others
        traceback.print_exc()
        record["errors"].append(f"{name}: {type(error).__name__}: {error}")
    save(record)


def save(record: dict) -> None:
    """Writes what is measured so far (a run cut short still leaves its results)."""
    fields = {k: v for k, v in record.items() if k not in ("start", "out")}
    (record["out"] / "gpu_check.json").write_text(json.dumps(fields, indent=2) + "\n")


def random_unet(config: UNetConfig) -> UNet2DConditionModel:
    """The UNet with N(0, 0.02) bfloat16 weights drawn on the device: one draw for all of
    them, cut into the parameters (a draw per parameter would make a program of thousands
    of random-number generators, slow to compile)."""
    abstract = UNet2DConditionModel.abstract(config, dtype=jnp.bfloat16)
    graphdef, shapes = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(shapes)
    offsets = np.cumsum([0] + [leaf.size for leaf in leaves])

    @jax.jit
    def draw(key):
        flat = 0.02 * jax.random.normal(key, (int(offsets[-1]),), jnp.bfloat16)
        return [
            flat[start:end].reshape(leaf.shape).astype(leaf.dtype)
            for start, end, leaf in zip(offsets[:-1], offsets[1:], leaves, strict=True)
        ]

    return nnx.merge(graphdef, jax.tree.unflatten(treedef, draw(jax.random.key(0))))


def sampling_inputs(config: UNetConfig) -> Sampling:
    schedule = schedulers.make_schedule(
        schedulers.SchedulerConfig.from_diffusers(analyze.SCHEDULER), 50
    )
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    key = jax.random.key(1)
    conditioning = Conditioning(
        jax.random.normal(key, (2, 77, config.cross_attention_dim), jnp.bfloat16),
        jax.random.normal(key, (2, pooled), jnp.bfloat16),
        jnp.tile(jnp.float32([1024, 1024, 0, 0, 1024, 1024]), (2, 1)),
    )
    return Sampling(schedule, conditioning, jnp.float32(5.0))


def timed(run, runs: int) -> tuple[float, float]:
    """(seconds to compile and run once, median seconds per run after 2 more warm-up runs)."""
    start = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - start
    for _ in range(2):
        jax.block_until_ready(run())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def jax_rows(unet: UNet2DConditionModel, size: int, attention: str, args, record: dict) -> None:
    """The single-device step at `size` pixels with the `attention` kernel, then (for the
    first kernel of --attention) one device's displaced step per P."""
    set_attention(unet, attention)
    graphdef, weights = nnx.split(unet)
    sampling = sampling_inputs(unet.config)
    latent = size // 8
    latents = jax.random.normal(jax.random.key(2), (1, latent, latent, 4), jnp.bfloat16)
    sdxl_heads = jax.ShapeDtypeStruct((1, 1, 1, 64), jnp.bfloat16)  # head_dim 64 at every level
    fallback = cudnn_problem(sdxl_heads) if attention == "cudnn" else None
    state = schedulers.init_state(sampling.schedule, latents)

    @jax.jit
    def single(weights, sampling, latents, state):
        loop = Loop.start(graphdef, weights, sampling, SINGLE)
        return loop.step(None, latents, state, NO_BUFFERS, 10)[:2]

    compile_s, step_s = timed(lambda: single(weights, sampling, latents, state), args.runs)
    kind = f"jax {attention}" + (" (fell back to chunked)" if fallback else "")
    record["rows"].append(
        dict(
            kind=kind,
            size=size,
            devices=1,
            compile_s=compile_s,
            step_s=step_s,
            attention=attention,
            fallback=fallback,
        )
    )
    print(f"{kind} {size}: {step_s * 1e3:.1f} ms (first call {compile_s:.1f} s)", flush=True)
    if attention != args.attention[0]:
        return
    per_device_sizes = (
        [s // 4 for s in args.per_device_sizes] if args.tiny else args.per_device_sizes
    )
    for patches in args.patches if size in per_device_sizes else []:
        name = f"jax displaced {size} P={patches}"
        attempt(
            record,
            name,
            lambda p=patches: per_device_row(unet, sampling, latents, p, step_s, args, record),
        )


def per_device_row(unet, sampling, latents, patches: int, single_s: float, args, record) -> None:
    parallel = ParallelConfig(patches)
    _, weights = nnx.split(unet)
    shapes = jax.ShapeDtypeStruct(latents.shape, latents.dtype)
    traced = trace_step(unet, sampling, shapes, parallel, "displaced")
    received = sum(c.received_bytes for c in traced.collectives())
    per_device = jax.tree.map(
        lambda s: jnp.zeros((s.shape[0] // patches, *s.shape[1:]), s.dtype) + 0.01,
        traced.buffers,
    )
    slab = latents[:, : latents.shape[1] // patches]
    state = schedulers.init_state(sampling.schedule, slab)
    step = jax.jit(local_step(unet, parallel))
    compile_s, compute_s = timed(
        lambda: step(weights, per_device, sampling, slab, state, 10), args.runs
    )
    exchange_s = received / (args.link_gbs * 1e9)
    projected = compute_s + exchange_s
    record["rows"].append(
        dict(
            kind="jax displaced (per device)",
            size=latents.shape[1] * 8,
            devices=patches,
            compile_s=compile_s,
            step_s=compute_s,
            received_bytes=received,
            stale_bytes=traced.stale_bytes_per_device(),
            exchange_s_modelled=exchange_s,
            projected_step_s=projected,
            projected_speedup=single_s / projected,
        )
    )
    print(
        f"  P={patches}: compute {compute_s * 1e3:.1f} ms, receives {received / 1e6:.1f} MB "
        f"({exchange_s * 1e3:.1f} ms at {args.link_gbs:g} GB/s), projected "
        f"{projected * 1e3:.1f} ms ({single_s / projected:.2f}x)",
        flush=True,
    )


def torch_rows(config: dict, sizes: list[int], args, record: dict) -> None:
    """diffusers' UNet step (SDPA attention), eager, and with torch.compile at one size."""
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    keys = {k for k in config if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**{k: config[k] for k in keys})
    unet = unet.to(device=device, dtype=torch.bfloat16).eval()
    compiled = None
    for size in sizes:
        latent = size // 8
        sample = torch.randn(2, 4, latent, latent, device=device, dtype=torch.bfloat16)
        text = torch.randn(
            2, 77, config["cross_attention_dim"], device=device, dtype=torch.bfloat16
        )
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        added = {
            "text_embeds": torch.randn(2, pooled, device=device, dtype=torch.bfloat16),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device),
        }
        variants = [("torch eager", unet)]
        if size == (args.torch_compile_size // (4 if args.tiny else 1)):
            compiled = compiled or torch.compile(unet)
            variants.append(("torch.compile", compiled))
        for kind, model in variants:

            def run(model=model, sample=sample, text=text, added=added):
                with torch.inference_mode():
                    out = model(sample, 500, text, added_cond_kwargs=added).sample
                if device == "cuda":
                    torch.cuda.synchronize()
                return out

            compile_s, step_s = timed(run, args.runs)
            record["rows"].append(
                dict(kind=kind, size=size, devices=1, compile_s=compile_s, step_s=step_s)
            )
            print(
                f"{kind} {size}: {step_s * 1e3:.1f} ms (first call {compile_s:.1f} s)", flush=True
            )


def print_table(record: dict) -> None:
    print(
        f"\n{record['device']}, {record['unet']} UNet, bfloat16, CFG batch 2, jax {record['jax']}"
    )
    print(
        f"{'what':34s} {'size':>5s} {'P':>2s} {'step ms':>9s} {'projected ms':>13s} {'speedup':>8s}"
    )
    for row in record["rows"]:
        projected = row.get("projected_step_s")
        print(
            f"{row['kind']:34s} {row['size']:5d} {row['devices']:2d} {row['step_s'] * 1e3:9.1f} "
            + (f"{projected * 1e3:13.1f} {row['projected_speedup']:7.2f}x" if projected else "")
        )
    print(
        f"(projected = per-device compute + received bytes at {record['link_gbs']:g} GB/s, "
        "no overlap; PROJECTED, not measured on P devices)"
    )
    for error in record["errors"]:
        print("error:", error)


if __name__ == "__main__":
    main()

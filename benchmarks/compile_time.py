"""Compile time of the whole SDXL denoising program (patch parallel, one image), from shapes.

    PYTHONPATH=/path/to/checkout python benchmarks/compile_time.py --label after
        [--size 1024] [--devices 8] [--mode displaced] [--warmup-steps 4] [--steps 50]
        [--attention xla] [--json docs/results/compile_time.json]

Built for comparing commits: run it once per checkout (a git worktree on PYTHONPATH, one
run after the other), each with its --label; every run replaces its own label's record in
the JSON and keeps the others. It uses only what every commit since c6fe3c7 has:
`sharding.loops.denoise`, `Sampling`, `Conditioning` (in `sharding.loops` before it moved to
`jaxfusion.models`), `jaxfusion.schedulers` and the
abstract UNet (`UNet2DConditionModel.abstract`: `jax.ShapeDtypeStruct` parameters).

The program: `jax.jit` of `denoise` for the SDXL UNet in bfloat16 on `--devices` simulated
CPU devices (`jax_num_cpu_devices`), classifier-free guidance (CFG batch 2: text
(2, 77, 2048), pooled (2, 1280), time ids (2, 6)), a (1, size/8, size/8, 4) latent, a DDIM
schedule of --steps steps; every input a shape. Measured: tracing and lowering
(`jitted.lower`), compiling (`lowered.compile()`), each in wall and CPU seconds (the
machine may be shared: the 1-minute load average is recorded too); how many times the
UNet's `__call__` was traced (counted by wrapping it here); how many convolutions the
lowered program holds (the UNet copies in it: each copy has the same convolutions); the
peak resident memory of the process after each phase (`ru_maxrss`); the compiled program's
temporaries per device. Where the checkout has attention kernels (`set_attention`),
--attention chooses one; "xla" is the behaviour before them.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from machine_info import machine

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "compile_time.json"
# SDXL's own scheduler settings (stabilityai/stable-diffusion-xl-base-1.0), run as DDIM.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
TEXT_TOKENS = 77


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def commit_of(path: Path) -> dict:
    """The git commit of the checkout holding `path`, and whether its tracked files differ."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    return dict(
        commit=git("rev-parse", "HEAD"),
        subject=git("log", "-1", "--format=%s"),
        checkout=git("rev-parse", "--show-toplevel"),
        dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
    )


def write_json_atomically(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, by a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(f.name, path)


def count_unet_traces(cls) -> list[int]:
    """Wraps `cls.__call__` to count its calls (each one a trace inside `jit`)."""
    calls = [0]
    call = cls.__call__

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return call(self, *args, **kwargs)

    cls.__call__ = counted
    return calls


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def unet_convolutions(graphdef, weights, conditioning, channels: int) -> int:
    """The convolutions of one UNet call (single device, a small latent), lowered."""

    def call(weights, latents, conditioning):
        return nnx.merge(graphdef, weights)(latents, jnp.float32(1), *conditioning)

    latents = jax.ShapeDtypeStruct((2, 32, 32, channels), jnp.bfloat16)
    lowered = jax.jit(call).lower(weights, latents, conditioning)
    return lowered.as_text().count("stablehlo.convolution")


def measure(args) -> dict:
    # Imported once the devices are configured (in main), in case importing touches them.
    import jaxfusion
    import sharding
    from jaxfusion import schedulers
    from jaxfusion.models import UNet2DConditionModel, UNetConfig
    from jaxfusion.models.configs import UNET_CONFIGS
    from sharding.loops import Sampling, denoise

    try:
        from jaxfusion.models import Conditioning
    except ImportError:  # before the loops took any denoiser: the UNet's conditioning
        from sharding.loops import Conditioning
    from sharding.parallel import ParallelConfig

    code = {m.__name__: str(Path(m.__file__).parent) for m in (jaxfusion, sharding)}
    print(f"code: {code}", flush=True)
    devices = jax.devices()
    if len(devices) < args.devices:
        raise SystemExit(f"{len(devices)} devices, {args.devices} asked")

    config = UNetConfig.from_diffusers(UNET_CONFIGS["sdxl"])
    unet = UNet2DConditionModel.abstract(config, dtype=jnp.bfloat16)
    try:
        from jaxfusion.models.scaled_dot_product import set_attention
    except ImportError:  # before the attention kernels: one attention, as "xla" now
        attention = "none (no attention kernels at this commit: the xla path)"
    else:
        set_attention(unet, args.attention)
        attention = args.attention
    traces = count_unet_traces(UNet2DConditionModel)
    graphdef, weights = nnx.split(unet)

    scheduler = schedulers.SchedulerConfig.from_diffusers(SDXL_SCHEDULER, "ddim")
    schedule = shapes(schedulers.make_schedule(scheduler, args.steps))
    dtype = jnp.bfloat16
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    conditioning = Conditioning(
        jax.ShapeDtypeStruct((2, TEXT_TOKENS, config.cross_attention_dim), dtype),
        jax.ShapeDtypeStruct((2, pooled), dtype),
        jax.ShapeDtypeStruct((2, 6), jnp.float32),
    )
    sampling = Sampling(schedule, conditioning, jax.ShapeDtypeStruct((), jnp.float32))
    side = args.size // 8
    latents = jax.ShapeDtypeStruct((1, side, side, config.in_channels), dtype)
    parallel = ParallelConfig(
        devices=args.devices, cfg=args.cfg, mode=args.mode, warmup_steps=args.warmup_steps
    )

    def generate(weights, sampling, latents):
        return denoise(nnx.merge(graphdef, weights), sampling, latents, parallel)

    rss_start, load_start = peak_rss_bytes(), os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = jax.jit(generate).lower(weights, sampling, latents)
    lowered_at, cpu_lowered = time.perf_counter(), time.process_time()
    rss_lowered = peak_rss_bytes()
    unet_traces = traces[0]
    convolutions = lowered.as_text().count("stablehlo.convolution")
    per_unet = unet_convolutions(graphdef, weights, conditioning, config.in_channels)
    print(
        f"traced and lowered in {lowered_at - start:.1f} s: {unet_traces} UNet traces, "
        f"{convolutions} convolutions ({convolutions / per_unet:g} UNets of {per_unet})",
        flush=True,
    )
    record = dict(
        code=code,
        **commit_of(Path(code["jaxfusion"])),
        attention=attention,
        unet_traces=unet_traces,
        lowered_convolutions=convolutions,
        unet_copies_in_program=convolutions / per_unet,
        trace_lower_seconds=round(lowered_at - start, 1),
        compile_seconds=None,
        trace_lower_cpu_seconds=round(cpu_lowered - cpu_start, 1),
        compile_cpu_seconds=None,
        load_average_1min_at_start=round(load_start[0], 2),
        load_average_1min_at_end=None,
        peak_rss_bytes_before=rss_start,
        peak_rss_bytes_after_lower=rss_lowered,
        peak_rss_bytes_after_compile=None,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
    )
    if args.lower_only:
        return record
    save(args, record | dict(note="compiling (interrupted if this stays)"))
    print("compiling ...", flush=True)
    cpu_compile = time.process_time()
    compiled = lowered.compile()
    compiled_at, cpu_compiled = time.perf_counter(), time.process_time()
    memory = compiled.memory_analysis()
    record.update(
        compile_seconds=round(compiled_at - lowered_at, 1),
        compile_cpu_seconds=round(cpu_compiled - cpu_compile, 1),
        load_average_1min_at_end=round(os.getloadavg()[0], 2),
        peak_rss_bytes_after_compile=peak_rss_bytes(),
        temp_bytes_per_device=None if memory is None else memory.temp_size_in_bytes,
    )
    print(f"compiled in {compiled_at - lowered_at:.1f} s", flush=True)
    return record


def save(args, record: dict) -> None:
    """`record` under its label in the JSON, the other labels kept."""
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    result.update(
        benchmark="compile_time",
        command="PYTHONPATH=<checkout> python benchmarks/compile_time.py --label <label>",
    )
    program = dict(
        model="sdxl",
        size=args.size,
        devices=args.devices,
        cfg=args.cfg,
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        scheduler="ddim",
        dtype="bfloat16",
        cfg_batch=2,
        note="jax.jit(denoise) traced, lowered and compiled from shapes (no weights) for "
        "simulated CPU devices",
    )
    result.setdefault("runs", {})[args.label] = dict(program=program, **record)
    write_json_atomically(args.json, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the record's name, e.g. before, after")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--cfg", type=int, default=1, choices=[1, 2])
    parser.add_argument("--mode", default="displaced", choices=["sync", "displaced", "naive"])
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--attention", default="xla", help="where the checkout has kernels")
    parser.add_argument("--lower-only", action="store_true", help="skip compiling")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    record = measure(args)
    save(args, record)
    print(json.dumps(record, indent=2), flush=True)
    print(f"wrote {args.json} ({args.label})", flush=True)


if __name__ == "__main__":
    main()

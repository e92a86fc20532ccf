"""`jaxfusion generate`: images from prompts (from a starting image, or handed to the SDXL
refiner for the last steps), written by process 0."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxfusion.cli.options import (
    add_generation_options,
    add_image_options,
    generation_kwargs,
    image_kwargs,
    load,
    loading_options,
)
from jaxfusion.cli.running import add_distributed_options

if TYPE_CHECKING:
    from jaxfusion.compilation_cache import CacheHits
    from jaxfusion.display import StageDisplay
    from jaxfusion.pipelines import TextToImagePipeline
    from sharding.parallel import ParallelConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion generate` to `commands`."""
    generate = commands.add_parser("generate", help="generate an image from a prompt")
    add_generation_options(generate)
    generate.add_argument(
        "--out", required=True, help="output .png, or .npy (float32 (H, W, 3) in [0, 1])"
    )
    add_image_options(generate)
    add_distributed_options(generate)
    generate.set_defaults(command=run_generate)


def run_generate(args: argparse.Namespace, display: StageDisplay) -> int:
    from jaxfusion.display import escape
    from jaxfusion.images import check_output_path, save_image
    from sharding.distributed import agree, is_main_process

    # Only process 0 writes; every process reads its inputs, and all end if one cannot.
    writes = is_main_process()

    def inputs():
        out = check_output_path(args.out) if writes else Path(args.out)
        return out, dict(generation_kwargs(args), **image_kwargs(args))

    out, kwargs = agree(inputs)
    if args.refiner is None:
        if args.high_noise_frac is not None:
            raise ValueError("--high-noise-frac is for the hand-off to --refiner: pass --refiner")
        pipe, cache_hits = load(args, display, check=lambda abstract: abstract.prepare(**kwargs))
        images = generate(pipe, kwargs, cache_hits, display)
    else:
        from jaxfusion.pipelines import ensemble, load_pipeline

        ensemble.check_refiner_folder(args.refiner)
        frac = ensemble.HIGH_NOISE_FRAC if args.high_noise_frac is None else args.high_noise_frac
        base_call, refiner_call = ensemble.split_call(kwargs, frac)
        refiner = load_pipeline(args.refiner, abstract=True, **loading_options(args))
        base, cache_hits = load(
            args,
            display,
            check=lambda abstract: ensemble.check_hand_off(
                abstract, refiner, base_call, refiner_call
            ),
        )
        latents = generate(base, base_call, cache_hits, display)
        refiner = load_pipeline(args.refiner, stage=display, **loading_options(args))
        images = generate(refiner, dict(refiner_call, image_latents=latents), cache_hits, display)
    if not writes:
        return 0
    paths = output_paths(out, len(images))
    for image, path in zip(images, paths, strict=True):
        save_image(image, path)
    display.note(escape(f"wrote {', '.join(map(str, paths))}"))
    return 0


def generate(
    pipe: TextToImagePipeline, kwargs: dict[str, Any], cache_hits: CacheHits, display: StageDisplay
) -> Any:
    """`pipe(**kwargs)`, saying how it runs over devices and whether its program came from
    the disk cache."""
    inputs, options = pipe.prepare(**kwargs)
    display.note(describe_parallel(options.parallel, len(inputs.schedule.timesteps)))
    hits = cache_hits.count

    def compiling(name: str) -> AbstractContextManager:
        def outcome() -> str | None:
            if cache_hits.count > hits:
                return "traced; the compiled program came from the disk cache"
            return None

        return display(name, outcome)

    pipe.compile(inputs, options, compiling)
    return pipe.run(inputs, options, display)


def describe_parallel(parallel: ParallelConfig, steps: int) -> str:
    """How a run of `steps` steps uses the devices, in a line: "displaced on 4 devices, steps
    0-4 synchronous", "single device", ..."""
    if parallel.mode == "single":
        return "single device"
    layout = [f"{parallel.data} prompt groups"] if parallel.data > 1 else []
    layout += ["2 guidance halves"] if parallel.cfg > 1 else []
    if layout:
        layout.append(f"{parallel.patches} patches")
    line = f"{parallel.mode} on {parallel.devices} devices"
    line += f" ({' x '.join(layout)})" if layout else ""
    if parallel.mode == "naive":
        return f"{line}, {parallel.naive_split} slabs"
    if parallel.mode == "sync":
        return line
    warm = dict(parallel.schedule(steps))["warm-up"]
    synchronous = f"step {warm[0]}" if len(warm) == 1 else f"steps {warm[0]}-{warm[-1]}"
    line += f", {synchronous} synchronous"
    if parallel.compress != "none":
        line += f", exchange compressed {parallel.compress}"
    if parallel.kv_refresh > 1:
        line += f", K/V every {parallel.kv_refresh} steps"
    return line


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` for one image; `name-0.png`, `name-1.png`, ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]

"""`jaxfusion compare`: diffusers (PyTorch) and jaxfusion from the same initial latents, their
images' difference and wall times."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxfusion.cli.generate import generate
from jaxfusion.cli.options import (
    add_generation_options,
    add_image_options,
    generation_kwargs,
    image_kwargs,
    load,
    model_path,
)

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion compare` to `commands`."""
    compare = commands.add_parser(
        "compare", help="run diffusers (PyTorch) and jaxfusion from the same initial latents"
    )
    add_generation_options(compare)
    compare.add_argument("--runs", type=int, default=3, help="timed runs after a warm-up run")
    compare.add_argument(
        "--out", help="a .png with jaxfusion's image, diffusers' and their difference (x10)"
    )
    add_image_options(compare)  # --refiner and --high-noise-frac are refused
    compare.set_defaults(command=run_compare)


def run_compare(args: argparse.Namespace, display: StageDisplay) -> int:
    import numpy as np

    from jaxfusion import diffusers_backend
    from jaxfusion.display import escape
    from jaxfusion.images import check_output_path, psnr, save_image, side_by_side

    out = check_output_path(args.out) if args.out else None
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    diffusers_backend.check_installed()
    for option, value in (("--refiner", args.refiner), ("--high-noise-frac", args.high_noise_frac)):
        if value is not None:
            raise ValueError(
                f"compare runs one pipeline, not the base -> refiner hand-off: leave out "
                f"{option} (to compare the refiner alone, pass it as --model with --image)"
            )
    kwargs = dict(generation_kwargs(args), **image_kwargs(args))
    pipe, cache_hits = load(args, display, check=lambda abstract: abstract.prepare(**kwargs))
    image = kwargs.get("image")
    height, width = pipe.size(args.height, args.width) if image is None else image.shape[:2]
    if kwargs["latents"] is None:
        kwargs["latents"] = pipe.initial_latents(len(kwargs["prompt"]), height, width, args.seed)
    with display("loading the diffusers (PyTorch) pipeline"):
        torch_pipe = diffusers_backend.load_diffusers_pipeline(
            model_path(args),
            dtype=args.dtype,
            scheduler=args.scheduler,
            image_to_image=image is not None,
            loras=args.lora,
        )
    if image is not None:  # one starting image for every prompt, as jaxfusion takes it
        image = np.repeat(image[None], len(kwargs["prompt"]), axis=0)
    torch_kwargs = dict(
        prompt=kwargs["prompt"],
        negative_prompt=kwargs["negative_prompt"],
        height=height,
        width=width,
        image=image,
        strength=pipe.default_strength if kwargs["strength"] is None else kwargs["strength"],
        num_inference_steps=args.steps,
        guidance_scale=pipe.default_guidance_scale if args.guidance is None else args.guidance,
        latents=kwargs["latents"],
        # Ours, the noise euler_a and lcm add at each step (trailing spacing may add a step).
        step_noise=pipe.step_noises(
            len(kwargs["prompt"]), height, width, args.seed, args.steps + 1
        ),
    )
    with display("jaxfusion: warm-up run"):
        ours = generate(pipe, kwargs, cache_hits, display)
    jax_times = timed_runs(lambda: pipe(**kwargs), args.runs, "jaxfusion", display)
    with display("diffusers: warm-up run"):
        theirs = diffusers_backend.run_diffusers(torch_pipe, **torch_kwargs)
    torch_times = timed_runs(
        lambda: diffusers_backend.run_diffusers(torch_pipe, **torch_kwargs),
        args.runs,
        "diffusers",
        display,
    )
    jax_median, torch_median = statistics.median(jax_times), statistics.median(torch_times)
    display.note(
        f"PSNR {psnr(ours, theirs):.2f} dB, max abs difference "
        f"{float(np.abs(ours - theirs).max()):.3g} (images in [0, 1])\n"
        f"median wall time per call ({len(ours)} image(s), {args.runs} runs after warm-up): "
        f"jaxfusion {jax_median:.3f} s, diffusers {torch_median:.3f} s, "
        f"diffusers / jaxfusion = {torch_median / jax_median:.2f}"
    )
    if out is not None:
        difference = np.clip(np.abs(ours[0] - theirs[0]) * 10, 0, 1)
        save_image(side_by_side([ours[0], theirs[0], difference]), out)
        display.note(escape(f"wrote {out} (jaxfusion | diffusers | difference x10)"))
    return 0


def timed_runs(
    run: Callable[[], object], runs: int, name: str, display: StageDisplay
) -> list[float]:
    times = []
    with display(f"{name}: {runs} timed run(s)"):
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return times

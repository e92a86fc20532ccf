"""The ensemble of experts (diffusers' SDXL base + refiner): the base denoises the high-noise
steps, up to `denoising_end`, and hands its latents to the refiner, which denoises the rest
from `denoising_start`, the same fraction of the schedule.

    base_call, refiner_call = split_call(dict(prompt="a cat", num_inference_steps=40), 0.8)
    latents = base(**base_call)
    images = refiner(**refiner_call, image_latents=latents)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convert.files import read_model_index
from jaxfusion.pipelines.base import TextToImagePipeline
from jaxfusion.pipelines.stable_diffusion_xl import SDXLImg2ImgPipeline

HIGH_NOISE_FRAC = 0.8  # diffusers' example of the hand-off
# The arguments of the base's call that the refiner's takes too; the others (the size, the
# initial noise, a starting image, SDXL's micro-conditioning) are the base's alone.
SHARED = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "clip_skip",
    "parallel",
    "attention",
)


def check_refiner_folder(path: str | Path) -> None:
    """Refuses (ValueError) a folder (or hub id) whose model_index.json names another
    pipeline than the refiner's; reads that file alone."""
    name = read_model_index(path).get("_class_name")
    if name != SDXLImg2ImgPipeline.pipeline_class:
        raise ValueError(
            f"the refiner {path} holds a {name}: a refiner is a "
            f"{SDXLImg2ImgPipeline.pipeline_class} folder (as "
            "stabilityai/stable-diffusion-xl-refiner-1.0)"
        )


def split_call(
    call: dict[str, Any], high_noise_frac: float = HIGH_NOISE_FRAC
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the base's call: `call` to denoising_end=high_noise_frac, returning latents; the
    refiner's: from denoising_start=high_noise_frac, to be given the base's latents as
    image_latents). Refuses a fraction outside (0, 1)."""
    if not 0 < high_noise_frac < 1:
        raise ValueError(
            f"high_noise_frac={high_noise_frac} must be strictly between 0 and 1 (the "
            "fraction of the steps the base denoises; 0.8 is usual)"
        )
    base = dict(call, denoising_end=high_noise_frac, output="latents")
    refiner = {name: call[name] for name in SHARED if name in call}
    return base, dict(refiner, denoising_start=high_noise_frac)


def check_hand_off(
    base: TextToImagePipeline,
    refiner: TextToImagePipeline,
    base_call: dict[str, Any],
    refiner_call: dict[str, Any],
) -> None:
    """Refuses (ValueError) what either call of `split_call` would refuse, the refiner's on
    latents shaped as the base's; nothing compiles (the pipelines may be loaded with
    abstract=True)."""
    inputs, _ = base.prepare(**base_call)
    batch, height, width, channels = inputs.latents.shape
    latents = np.zeros((batch, channels, height, width), np.float32)
    refiner.prepare(**refiner_call, image_latents=latents)

"""The PyTorch side: a diffusers pipeline loaded from a local folder and run on given latents,
to compare jaxfusion's pipelines with. torch and diffusers are imported only when called."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.files import read_json
from jaxfusion.schedulers.config import SCHEDULERS

# (the refiner's class, StableDiffusionXLImg2ImgPipeline, runs image-to-image only)
PIPELINE_CLASSES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "FluxPipeline",
)
# Each pipeline class's image-to-image counterpart, on the same components (`from_pipe`).
IMG2IMG_CLASSES = {
    "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLImg2ImgPipeline",
    "FluxPipeline": "FluxImg2ImgPipeline",
}
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
DTYPES = ("float32", "float16", "bfloat16")


REQUIRED = ("torch", "diffusers", "transformers")


def check_installed() -> None:
    """Refuses (ImportError naming the fix) when torch, diffusers or transformers is missing;
    imports none of them."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"the diffusers backend needs {', '.join(missing)}: pip install 'jaxfusion[test]'"
        )


def load_diffusers_pipeline(
    path: str | Path,
    *,
    dtype: str = "float32",
    scheduler: str | None = None,
    device: str | None = None,
    image_to_image: bool = False,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> Any:
    """The diffusers pipeline of a local folder (the class its model_index.json names, or its
    image-to-image counterpart), without safety checker and progress bar.

    Args:
      path: a diffusers pipeline folder of one of `PIPELINE_CLASSES`.
      dtype: "float32" | "float16" | "bfloat16", the weights' torch dtype.
      scheduler: a jaxfusion scheduler kind (`SCHEDULERS`: "euler", "ddim", ...)
        replaces the folder's scheduler by that diffusers class (`SCHEDULERS`), built
        from the folder's scheduler config (`from_config`); None keeps it.
      device: torch device; default "cuda" when available, else "cpu".
      image_to_image: the folder's components in its `IMG2IMG_CLASSES` pipeline instead.
      loras: (path, scale) pairs: each LoRA loaded (`load_lora_weights`: a safetensors file,
        or a folder or hub id holding one), weighted by its scale (`set_adapters`), and all
        fused into the weights (`fuse_lora`): they add up.
    """
    check_installed()
    import diffusers
    import torch
    import transformers

    folder = Path(path)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json)"
        )
    class_name = read_json(index).get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{folder} holds a {class_name!r}; only {list(PIPELINE_CLASSES)} are supported"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported (use one of {list(DTYPES)})")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(
            f"scheduler={scheduler!r} is not supported (use one of {list(SCHEDULERS)})"
        )
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    elif class_name in SDXL_CLASSES:  # jaxfusion adds no invisible watermark
        kwargs.update(add_watermarker=False)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        # diffusers >= 0.42 renames torch_dtype to dtype, which older releases do not take.
        warnings.filterwarnings("ignore", message=".*use `dtype`", category=FutureWarning)
        pipe = getattr(diffusers, class_name).from_pretrained(folder, **kwargs)
    if scheduler is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler].class_name)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, (lora, _) in zip(names, loras, strict=True):
        if Path(lora).is_file():
            file = Path(lora)
            pipe.load_lora_weights(file.parent, weight_name=file.name, adapter_name=name)
        else:  # a folder, or a hub id (a str)
            pipe.load_lora_weights(str(lora), adapter_name=name)
    if loras:  # all at once: loading an adapter unmerges those fused before it
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        pipe.fuse_lora(adapter_names=names)
    if image_to_image and IMG2IMG_CLASSES[class_name] != class_name:
        pipe = getattr(diffusers, IMG2IMG_CLASSES[class_name]).from_pipe(pipe)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(
    pipe: Any,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    latents: np.ndarray | None = None,
    step_noise: np.ndarray | None = None,
    seed: int = 0,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    image: np.ndarray | None = None,
    strength: float | None = None,
) -> np.ndarray:
    """Runs a diffusers pipeline -> (B, height, width, 3) float32 images in [0, 1].

    Args:
      latents: (B, C, height / s, width / s) initial noise (s: the VAE's downscale), as
        diffusers takes it: before the scheduler's init_noise_sigma scales it; with `image`,
        the noise added to its latents (`given_image_noise`). None: drawn by diffusers from
        a torch.Generator seeded with `seed`.
      step_noise: (S, B, C, height / s, width / s): the fresh noise step i of the run adds,
        for the schedulers that draw some (EulerAncestralDiscreteScheduler, LCMScheduler),
        in place of what they would draw (jaxfusion's `step_noises` gives its own); None:
        drawn by diffusers.
      original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning, passed to
        SDXL pipelines only.
      image: image-to-image (a pipeline of `image_to_image=True`): the (B, height, width, 3)
        float32 image in [0, 1] to start from, VAE-encoded to its latents' mean as jaxfusion
        encodes it; strength: how much of the schedule runs (None: the pipeline's default).
    """
    import torch

    if isinstance(negative_prompt, str) and not isinstance(prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)  # (img2img refuses a str here)
    kwargs: dict[str, Any] = {}
    noise: contextlib.AbstractContextManager = contextlib.nullcontext()
    if image is not None:
        kwargs.update(image=np.asarray(image, np.float32))
        if strength is not None:
            kwargs.update(strength=strength)
        if latents is not None:
            noise = given_image_noise(pipe, np.asarray(latents, np.float32))
        else:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    else:
        kwargs.update(height=height, width=width)
        if latents is not None:
            kwargs["latents"] = torch.from_numpy(np.array(latents, np.float32)).to(
                device=pipe.device, dtype=pipe.dtype
            )
        else:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    if type(pipe).__name__ in SDXL_CLASSES:
        kwargs.update(
            original_size=None if original_size is None else tuple(original_size),
            crops_coords_top_left=tuple(crops_coords_top_left),
            target_size=None if target_size is None else tuple(target_size),
        )
    fresh: contextlib.AbstractContextManager = contextlib.nullcontext()
    if step_noise is not None:
        fresh = given_step_noise(pipe.scheduler, step_noise)
    with torch.inference_mode(), noise, fresh:
        images = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
            **kwargs,
        ).images
    return np.asarray(images, dtype=np.float32)


@contextlib.contextmanager
def given_step_noise(scheduler: Any, step_noise: np.ndarray) -> Iterator[None]:
    """Inside: the noise a diffusers `scheduler` draws in its step i of a run (its module's
    `randn_tensor`) is step_noise[i] (NCHW), i counted from the run's first step (its begin
    index)."""
    import torch

    module = sys.modules[type(scheduler).__module__]
    drawn = module.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        noise = step_noise[scheduler.step_index - (scheduler.begin_index or 0)]
        if tuple(shape) != noise.shape:
            raise ValueError(f"step noise of shape {noise.shape}, the scheduler draws {shape}")
        return torch.from_numpy(np.array(noise, np.float32)).to(device=device, dtype=dtype)

    module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        module.randn_tensor = drawn


@contextlib.contextmanager
def given_image_noise(pipe: Any, noise: np.ndarray | None) -> Iterator[None]:
    """Inside: a diffusers img2img `pipe` adds `noise` (NCHW) to the image's latents (its
    module's `randn_tensor`, which draws nothing else; with noise None, as with
    denoising_start, drawing raises) and encodes images to the mean of the VAE's latent
    distribution (its `retrieve_latents` in "argmax" mode) as jaxfusion does, instead of
    drawing a sample of it."""
    import torch

    module = sys.modules[type(pipe).__module__]
    drawn, retrieve = module.randn_tensor, module.retrieve_latents

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        if noise is None:
            raise ValueError("diffusers drew noise where none was given")
        if tuple(shape) != noise.shape:
            raise ValueError(f"added noise of shape {noise.shape}, diffusers draws {shape}")
        return torch.from_numpy(noise).to(device=device, dtype=dtype)

    def mean_latents(encoder_output, generator=None, sample_mode="sample"):
        return retrieve(encoder_output, generator, sample_mode="argmax")

    module.randn_tensor, module.retrieve_latents = randn_tensor, mean_latents
    try:
        yield
    finally:
        module.randn_tensor, module.retrieve_latents = drawn, retrieve

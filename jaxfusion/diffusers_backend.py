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

from jaxfusion.convert.files import read_json
from jaxfusion.schedulers.config import CLASS_NAMES

PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")
SCHEDULER_CLASSES = {kind: name for name, kind in CLASS_NAMES.items()}
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
) -> Any:
    """The diffusers pipeline of a local folder (the class its model_index.json names), without
    safety checker and progress bar.

    Args:
      path: a diffusers pipeline folder of a StableDiffusionXLPipeline or StableDiffusionPipeline.
      dtype: "float32" | "float16" | "bfloat16", the weights' torch dtype.
      scheduler: a jaxfusion scheduler kind ("euler", "ddim", "dpmpp", "euler_a", "lcm")
        replaces the folder's scheduler by that diffusers class (`SCHEDULER_CLASSES`), built
        from the folder's scheduler config (`from_config`); None keeps it.
      device: torch device; default "cuda" when available, else "cpu".
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
    if scheduler is not None and scheduler not in SCHEDULER_CLASSES:
        raise ValueError(
            f"scheduler={scheduler!r} is not supported (use one of {list(SCHEDULER_CLASSES)})"
        )
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    else:  # jaxfusion adds no invisible watermark
        kwargs.update(add_watermarker=False)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        # diffusers >= 0.42 renames torch_dtype to dtype, which older releases do not take.
        warnings.filterwarnings("ignore", message=".*use `dtype`", category=FutureWarning)
        pipe = getattr(diffusers, class_name).from_pretrained(folder, **kwargs)
    if scheduler is not None:
        scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[scheduler])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
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
) -> np.ndarray:
    """Runs a diffusers pipeline -> (B, height, width, 3) float32 images in [0, 1].

    Args:
      latents: (B, C, height / s, width / s) initial noise (s: the VAE's downscale), as
        diffusers takes it: before the scheduler's init_noise_sigma scales it. None: drawn by
        diffusers from a torch.Generator seeded with `seed`.
      step_noise: (S, B, C, height / s, width / s): the fresh noise step i of the run adds,
        for the schedulers that draw some (EulerAncestralDiscreteScheduler, LCMScheduler),
        in place of what they would draw (jaxfusion's `step_noises` gives its own); None:
        drawn by diffusers.
      original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning, passed to
        SDXL pipelines only.
    """
    import torch

    kwargs: dict[str, Any] = {}
    if latents is not None:
        kwargs["latents"] = torch.from_numpy(np.array(latents, np.float32)).to(
            device=pipe.device, dtype=pipe.dtype
        )
    else:
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        kwargs.update(
            original_size=None if original_size is None else tuple(original_size),
            crops_coords_top_left=tuple(crops_coords_top_left),
            target_size=None if target_size is None else tuple(target_size),
        )
    noise = contextlib.nullcontext()
    if step_noise is not None:
        noise = given_step_noise(pipe.scheduler, step_noise)
    with torch.inference_mode(), noise:
        images = pipe(
            prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
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

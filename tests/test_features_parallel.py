"""SDXL's everyday features together under patch parallelism, in one generation of the tiny
random SDXL pipeline: a LoRA fused into its weights, started from an image, with LCM's
sampler (fresh noise at every step) and guidance on. On 4 devices sync gives the
single-device image and displaced differs. One generation serves every feature: each
parallel program compiles once. Each feature against diffusers: tests/test_lora.py,
tests/test_img2img.py, tests/test_few_step.py."""

import numpy as np
import pytest
from loras import random_adapters, write_kohya
from pipelines import NEGATIVE, PROMPT, added_noise, save_random_pipeline, starting_image

import jaxfusion
from jaxfusion.images import psnr
from sharding.parallel import ParallelConfig


@pytest.mark.slow
def test_lora_image_to_image_lcm_sync_equals_single_and_displaced_differs(tmp_path):
    pipe = jaxfusion.load_pipeline(save_random_pipeline(tmp_path / "sdxl", "sdxl-light"))
    write_kohya(tmp_path / "lora.safetensors", random_adapters(4))
    pipe.load_lora(tmp_path / "lora.safetensors", scale=0.3)
    call = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, image=starting_image(), strength=0.75,
        latents=added_noise(), num_inference_steps=4, guidance_scale=1.5, scheduler="lcm",
        seed=5,
    )  # fmt: skip
    single = pipe(**call)
    sync = pipe(**call, parallel=ParallelConfig(4, mode="sync"))
    displaced = pipe(**call, parallel=ParallelConfig(4, warmup_steps=1))
    assert np.abs(sync - single).max() < 1e-4
    assert np.isfinite(displaced).all()
    assert np.abs(displaced - single).max() > 1e-3
    assert psnr(pipe(**dict(call, seed=6)), single) < 40  # the seed draws the step noise

"""Image-to-image: jaxfusion's SD and SDXL pipelines started from an image against diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline on the same tiny random
folders, the added noise given to both sides; under sync on 4 devices as on one."""

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from commands import jaxfusion_command
from pipelines import LATENT_SIZE, SIZE
from test_pipelines import MIN_PSNR, NEGATIVE, PROMPT, Backends

from jaxfusion.images import psnr, read_image
from sharding.parallel import ParallelConfig

STEPS = 4
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    return Backends(tmp_path_factory)


def starting_image(seed: int = 0) -> np.ndarray:
    """(1, SIZE, SIZE, 3) float32 in [0, 1]: a smooth gradient with some noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)
    rows, columns = np.meshgrid(ramp, ramp, indexing="ij")
    image = np.stack([rows * columns, columns, 1 - rows], axis=-1)
    image = image + 0.1 * rng.standard_normal((SIZE, SIZE, 3))
    return np.clip(image, 0, 1).astype(np.float32)[None]


def image_file(folder: Path) -> Path:
    """`starting_image` as a 40x48 PNG file (height x width): the command resizes it."""
    from PIL import Image

    path = folder / "start.png"
    pixels = np.round(starting_image()[0] * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((48, 40), Image.Resampling.BICUBIC).save(path)
    return path


def added_noise(seed: int = 1) -> np.ndarray:
    """(1, 4, h, w) float32 NCHW: the unit noise added to the image's latents."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32)


@contextlib.contextmanager
def given_noise(pipe, noise: np.ndarray | None) -> Iterator[None]:
    """Inside: a diffusers img2img `pipe` adds `noise` (NCHW) to the image's latents (its
    module's `randn_tensor`, which draws nothing else) and encodes images to the mean of the
    VAE's latent distribution (its `retrieve_latents` in "argmax" mode) as jaxfusion does,
    instead of drawing a sample of it."""
    module = sys.modules[type(pipe).__module__]
    drawn, retrieve = module.randn_tensor, module.retrieve_latents

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        assert noise is not None, "diffusers drew noise where none was given"
        assert tuple(shape) == noise.shape, (shape, noise.shape)
        return torch.from_numpy(noise).to(device=device, dtype=dtype)

    def mean_latents(encoder_output, generator=None, sample_mode="sample"):
        return retrieve(encoder_output, generator, sample_mode="argmax")

    module.randn_tensor, module.retrieve_latents = randn_tensor, mean_latents
    try:
        yield
    finally:
        module.randn_tensor, module.retrieve_latents = drawn, retrieve


def run_img2img(pipe, prompt, noise: np.ndarray | None, **options) -> np.ndarray:
    """A diffusers img2img pipeline's output (images (B, H, W, 3), or latents (B, C, h, w)
    with output_type="latent") for `options`, adding `noise`."""
    options = {"output_type": "np", **options}
    with torch.inference_mode(), given_noise(pipe, noise):
        result = pipe(prompt, **options).images
    return np.asarray(result, np.float32)


def img2img_class(kind: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    return {"sdxl": StableDiffusionXLImg2ImgPipeline, "sd": StableDiffusionImg2ImgPipeline}[kind]


@pytest.mark.parametrize(
    ("kind", "strength"),
    [
        ("sdxl", 0.5),
        pytest.param("sdxl", 0.75, marks=pytest.mark.slow),
        pytest.param("sd", 0.5, marks=pytest.mark.slow),
        pytest.param("sd", 0.75, marks=pytest.mark.slow),
    ],
)
def test_matches_diffusers_img2img(backends, kind, strength):
    """The base folder as diffusers' img2img pipeline: the image VAE-encoded, noised to the
    strength's first step, the remaining int(STEPS * strength) steps denoised."""
    torch_pipe = img2img_class(kind).from_pipe(backends.torch(kind, None))
    image, noise = starting_image(), added_noise()
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    expected = run_img2img(torch_pipe, PROMPT, noise, image=image, strength=strength, **common)
    actual = backends.jax(kind)(PROMPT, image=image, strength=strength, latents=noise, **common)
    assert actual.shape == expected.shape == (1, SIZE, SIZE, 3)
    value = psnr(actual, expected)
    print(f"PSNR {kind} img2img strength {strength}: {value:.1f} dB")
    assert value >= MIN_PSNR, value
    # The start shows: from another image, another result (far beyond float32 rounding; at
    # high strength a random model keeps little of it).
    other = backends.jax(kind)(
        PROMPT, image=starting_image(seed=2)[:, ::-1], strength=strength, latents=noise, **common
    )
    assert psnr(other, actual) < 80


@pytest.mark.slow
def test_sync_equals_single_and_displaced_differs(backends):
    pipe = backends.jax("sdxl")
    call = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, image=starting_image(), strength=0.75,
        latents=added_noise(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
    )  # fmt: skip
    single = pipe(**call)
    sync = pipe(**call, parallel=ParallelConfig(4, mode="sync"))
    displaced = pipe(**call, parallel=ParallelConfig(4, warmup_steps=1))
    assert np.abs(sync - single).max() < 1e-4
    assert np.isfinite(displaced).all()
    assert np.abs(displaced - single).max() > 1e-3


@pytest.mark.slow
def test_command_starts_from_an_image(backends, tmp_path):
    """`jaxfusion generate --image IN.png --strength S --height --width`: the file read and
    resized, as diffusers' img2img from that image and the initial noise of --seed."""
    path = image_file(tmp_path)
    image = read_image(path, (SIZE, SIZE))
    noise = backends.jax("sd").initial_latents(1, SIZE, SIZE, seed=2)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    torch_pipe = img2img_class("sd").from_pipe(backends.torch("sd", None))
    expected = run_img2img(torch_pipe, PROMPT, noise, image=image[None], strength=0.75, **common)
    out = tmp_path / "image.npy"
    jaxfusion_command(
        tmp_path / "cache", "generate", "--model", str(backends.folder("sd")),
        "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", str(STEPS),
        "--guidance", str(GUIDANCE), "--seed", "2", "--image", str(path), "--strength", "0.75",
        "--height", str(SIZE), "--width", str(SIZE), "--out", str(out),
    )  # fmt: skip
    value = psnr(np.load(out)[None], expected)
    print(f"PSNR jaxfusion generate --image: {value:.1f} dB")
    assert value >= MIN_PSNR, value


def test_refusals(backends):
    pipe = backends.jax("sd")
    with pytest.raises(ValueError, match="strength is for image-to-image: pass image="):
        pipe.prepare(PROMPT, strength=0.5)
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
        pipe.prepare(PROMPT, image=starting_image(), strength=1.5)
    with pytest.raises(ValueError, match="no denoising step is left of 4"):
        pipe.prepare(PROMPT, image=starting_image(), strength=0.1, num_inference_steps=4)
    with pytest.raises(ValueError, match="height=64 but the starting image is 32 pixels"):
        pipe.prepare(PROMPT, image=starting_image(), height=64)

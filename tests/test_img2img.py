"""Image-to-image: jaxfusion's SD and SDXL pipelines started from an image against diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline on the same tiny random
folders, the added noise given to both sides (under patch parallelism:
tests/test_features_parallel.py)."""

import re
from pathlib import Path

import numpy as np
import pytest
from commands import jaxfusion_command
from loras import save_kohya_sgm_lora, save_kohya_unet_lora
from pipelines import (
    MIN_PSNR,
    NEGATIVE,
    PROMPT,
    SIZE,
    added_noise,
    image_file,
    run_img2img,
    starting_image,
)

from jaxfusion.images import psnr, read_image

STEPS = 4
GUIDANCE = 5.0


def img2img_class(kind: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    return {"sdxl": StableDiffusionXLImg2ImgPipeline, "sd": StableDiffusionImg2ImgPipeline}[kind]


@pytest.mark.parametrize(
    ("kind", "strength"),
    # Each family and each strength once: the strength's arithmetic is shared code.
    [("sdxl", 0.5), pytest.param("sd", 0.75, marks=pytest.mark.slow)],
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
def test_img2img_at_a_size_that_does_not_halve_evenly(backends):
    """24x40 pixels through SD's 4-level UNet (latent 12x20 -> 6x10 -> 3x5 -> 2x3)."""
    torch_pipe = img2img_class("sd").from_pipe(backends.torch("sd", None))
    image, noise = starting_image(height=24, width=40), added_noise(height=24, width=40)
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, strength=0.75)
    expected = run_img2img(torch_pipe, PROMPT, noise, image=image, **common)
    actual = backends.jax("sd")(PROMPT, image=image, latents=noise, **common)
    assert actual.shape == expected.shape == (1, 24, 40, 3)
    assert psnr(actual, expected) >= MIN_PSNR


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


def compare_command(tmp_path: Path, folder: Path, *options: str) -> float:
    """`jaxfusion compare` of `folder` from `image_file` (--strength 0.6) with `options` ->
    the PSNR it printed (jaxfusion against diffusers' img2img pipeline of the folder, given
    the noise jaxfusion adds); its --out image written to tmp_path / "compare.png"."""
    result = jaxfusion_command(
        tmp_path / "cache", "compare", "--model", str(folder), "--prompt", PROMPT,
        "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
        "--image", str(image_file(tmp_path)), "--strength", "0.6", "--height", str(SIZE),
        "--width", str(SIZE), "--runs", "1", "--out", str(tmp_path / "compare.png"), *options,
    )  # fmt: skip
    match = re.search(r"PSNR ([\d.]+|inf) dB", result.stderr)
    assert match, result.stderr
    return float(match.group(1))


@pytest.mark.slow
def test_compare_command_image_to_image_with_two_loras(backends, tmp_path):
    """`jaxfusion compare --image IN.png --strength 0.6 --lora FOLDER:0.8 --lora FILE:0.5` on
    SDXL: diffusers' StableDiffusionXLImg2ImgPipeline of the same folder, both LoRAs fused on
    both sides (diffusers' load_lora_weights, set_adapters + fuse_lora), agrees to the parity
    bound, and the image is not the one without the LoRAs; --refiner is refused at once."""
    from PIL import Image

    save_kohya_unet_lora(None, tmp_path / "a")
    save_kohya_sgm_lora(None, tmp_path / "b")
    loras = ["--lora", f"{tmp_path / 'a'}:0.8"]
    loras += ["--lora", f"{tmp_path / 'b' / 'pytorch_lora_weights.safetensors'}:0.5"]
    value = compare_command(tmp_path, backends.folder("sdxl"), *loras)
    print(f"PSNR jaxfusion compare --image, two --lora (sdxl): {value:.1f} dB")
    assert value >= MIN_PSNR, value
    ours = np.asarray(Image.open(tmp_path / "compare.png"))[:, :SIZE] / 255
    image = read_image(image_file(tmp_path), (SIZE, SIZE))
    base = backends.jax("sdxl")(
        PROMPT, negative_prompt=NEGATIVE, image=image, strength=0.6, seed=0,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE,
    )[0]  # fmt: skip
    print(f"PSNR against the image without the LoRAs: {psnr(ours, base):.1f} dB")
    assert psnr(ours, base) < 40  # (the PNG's rounding alone: about 59 dB)
    refused = jaxfusion_command(
        tmp_path / "cache", "compare", "--model", str(backends.folder("sdxl")), "--prompt",
        PROMPT, "--image", str(image_file(tmp_path)), "--refiner", "refiner", expect=2,
    )  # fmt: skip
    assert "leave out --refiner" in refused.stderr and "loading" not in refused.stderr


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

"""The SDXL refiner (StableDiffusionXLImg2ImgPipeline: the second text encoder only,
aesthetic-score time ids) and the base + refiner hand-off (the base to denoising_end, the
refiner from denoising_start on its latents) against diffusers on tiny random folders."""

import re
import shutil

import numpy as np
import pytest
import torch
from commands import jaxfusion_command, refused
from diffusers_models import SDXL_LIKE, randomize, relative_l2
from pipelines import (
    MIN_PSNR,
    NEGATIVE,
    PROMPT,
    SIZE,
    WORDS,
    added_noise,
    build_random_pipeline,
    image_file,
    run_img2img,
    starting_image,
)

import jaxfusion
from jaxfusion.images import psnr
from jaxfusion.tokenizer import write_tokenizer
from sharding.parallel import ParallelConfig

STEPS, GUIDANCE = 4, 5.0
HIGH_NOISE_FRAC = 0.8  # 4 steps: the base runs timesteps 751, 501, 251, the refiner 1


def save_random_refiner(folder):
    """A refiner folder as stabilityai's: the base's second text encoder, tokenizer, VAE and
    scheduler, a UNet conditioned on the 32-wide pooled embedding and 5 time ids,
    `requires_aesthetics_score`."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = build_random_pipeline("sdxl")
    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        **dict(
            SDXL_LIKE,
            cross_attention_dim=32,
            projection_class_embeddings_input_dim=32 + 5 * SDXL_LIKE["addition_time_embed_dim"],
        )
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=randomize(unet, seed=4),
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    refiner.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer_2")  # as save_random_pipeline writes it
    write_tokenizer(folder / "tokenizer_2", WORDS, pad_token=base.tokenizer_2.pad_token)
    return folder


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    return save_random_refiner(tmp_path_factory.mktemp("refiner"))


@pytest.fixture(scope="module")
def refiners(refiner_folder):
    """(jaxfusion's refiner, diffusers' refiner) of the folder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    torch_refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_folder, torch_dtype=torch.float32
    )
    torch_refiner.set_progress_bar_config(disable=True)
    return jaxfusion.load_pipeline(refiner_folder, dtype="float32"), torch_refiner


COMMON = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)


def test_refiner_matches_diffusers(refiners):
    """Image-to-image with the refiner: aesthetic scores 6 and 2.5 (diffusers' defaults) and
    a chosen pair, the second text encoder's embeddings."""
    refiner, torch_refiner = refiners
    assert type(refiner) is jaxfusion.SDXLImg2ImgPipeline
    image, noise = starting_image(), added_noise()
    results = []
    for scores in ({}, dict(aesthetic_score=7.5, negative_aesthetic_score=1.0)):
        call = dict(COMMON, image=image, strength=0.5, **scores)
        expected = run_img2img(torch_refiner, PROMPT, noise, **call)
        results.append(refiner(PROMPT, latents=noise, **call))
        value = psnr(results[-1], expected)
        print(f"PSNR refiner img2img {scores or 'default scores'}: {value:.1f} dB")
        assert value >= MIN_PSNR, (scores, value)
    assert psnr(*results) < 80  # the scores condition the UNet


@pytest.mark.slow
def test_refiner_at_a_size_that_does_not_halve_evenly(refiners):
    """A 22x38 image (img2img takes the image's size: the VAE needs multiples of 2 here): an
    11x19 latent, odd at every level of the refiner's UNet."""
    refiner, torch_refiner = refiners
    image, noise = starting_image(height=22, width=38), added_noise(height=22, width=38)
    call = dict(COMMON, image=image, strength=0.5)
    expected = run_img2img(torch_refiner, PROMPT, noise, **call)
    actual = refiner(PROMPT, latents=noise, **call)
    assert actual.shape == expected.shape == (1, 22, 38, 3)
    assert psnr(actual, expected) >= MIN_PSNR


@pytest.mark.slow
def test_refiner_sync_equals_single(refiners):
    """The refiner's conditioning (aesthetic-score time ids) reaches every patch; displaced
    image-to-image is tested on the base in test_features_parallel.py."""
    refiner = refiners[0]
    call = dict(COMMON, image=starting_image(), strength=0.75, latents=added_noise())
    single = refiner(PROMPT, **call)
    sync = refiner(PROMPT, **call, parallel=ParallelConfig(4, mode="sync"))
    assert np.abs(sync - single).max() < 1e-4


def diffusers_hand_off(torch_base, torch_refiner, noise: np.ndarray):
    """diffusers' ensemble of experts from initial `noise`: (the base's latents after
    denoising_end, output_type="latent"; the refiner's images from them, denoising_start)."""
    with torch.inference_mode():
        latents = torch_base(
            PROMPT, latents=torch.from_numpy(noise), denoising_end=HIGH_NOISE_FRAC,
            output_type="latent", **COMMON,
        ).images.numpy()  # fmt: skip
    images = run_img2img(
        torch_refiner, PROMPT, None, image=torch.from_numpy(latents),
        denoising_start=HIGH_NOISE_FRAC, **COMMON,
    )  # fmt: skip
    return latents, images


@pytest.mark.slow
def test_base_to_refiner_hand_off_matches_diffusers(backends, refiners):
    """diffusers' base(denoising_end, output_type="latent") then refiner(image=latents,
    denoising_start) against output="latents" and image_latents."""
    refiner, torch_refiner = refiners
    noise = added_noise()
    torch_latents, expected = diffusers_hand_off(backends.torch("sdxl", None), torch_refiner, noise)
    latents = backends.jax("sdxl")(
        PROMPT, latents=noise, denoising_end=HIGH_NOISE_FRAC, output="latents", **COMMON
    )
    assert latents.shape == torch_latents.shape == noise.shape
    assert relative_l2(latents, torch_latents) < 1e-5
    actual = refiner(PROMPT, image_latents=latents, denoising_start=HIGH_NOISE_FRAC, **COMMON)
    value = psnr(actual, expected)
    print(f"PSNR base -> refiner at {HIGH_NOISE_FRAC}: {value:.1f} dB")
    assert value >= MIN_PSNR, value


@pytest.mark.slow
def test_command_hands_off_to_the_refiner(backends, refiners, refiner_folder, tmp_path):
    """`jaxfusion generate --refiner R --high-noise-frac 0.8`: diffusers' hand-off from the
    initial noise of --seed; one image written."""
    base = backends.jax("sdxl")
    noise = base.initial_latents(1, SIZE, SIZE, seed=3)
    _, expected = diffusers_hand_off(backends.torch("sdxl", None), refiners[1], noise)
    out = tmp_path / "out" / "image.npy"
    out.parent.mkdir()
    jaxfusion_command(
        tmp_path / "cache", "generate", "--model", str(backends.folder("sdxl")),
        "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", str(STEPS),
        "--guidance", str(GUIDANCE), "--seed", "3", "--refiner", str(refiner_folder),
        "--high-noise-frac", str(HIGH_NOISE_FRAC), "--out", str(out),
    )  # fmt: skip
    assert [path.name for path in out.parent.iterdir()] == ["image.npy"]
    value = psnr(np.load(out)[None], expected)
    print(f"PSNR jaxfusion generate --refiner: {value:.1f} dB")
    assert value >= MIN_PSNR, value


@pytest.mark.slow
def test_command_refuses_before_loading(backends, refiner_folder, tmp_path, capsys):
    base = ["generate", "--model", str(backends.folder("sdxl")), "--prompt", PROMPT,
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    refusals = {
        "no such image file": ["--image", str(tmp_path / "missing.png")],
        r"1\.5 is not in \(0, 1\]": ["--image", str(image_file(tmp_path)),
                                     "--strength", "1.5"],
        "strength is for image-to-image": ["--strength", "0.5"],
        "must be strictly between 0 and 1": ["--refiner", str(refiner_folder),
                                             "--high-noise-frac", "1"],
        "holds a StableDiffusionXLPipeline: a refiner is a StableDiffusionXLImg2ImgPipeline":
            ["--refiner", str(backends.folder("sdxl"))],
        "pass --refiner": ["--high-noise-frac", "0.8"],
    }  # fmt: skip
    for message, options in refusals.items():
        error = refused(capsys, *base, *options)
        assert re.search(message, error), (message, error)
        assert "loading" not in error, error


def test_refusals(backends, refiner_folder):
    refiner = jaxfusion.load_pipeline(refiner_folder, abstract=True)
    with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline starts from an image"):
        refiner.prepare(PROMPT)
    with pytest.raises(ValueError, match="not a target size: leave out target_size"):
        refiner.prepare(PROMPT, image=starting_image(), target_size=(32, 32))
    base = jaxfusion.load_pipeline(backends.folder("sdxl"), abstract=True)
    with pytest.raises(ValueError, match="strength is for image-to-image: pass image="):
        base.prepare(PROMPT, strength=0.5)
    with pytest.raises(ValueError, match="denoising_start is for image-to-image"):
        base.prepare(PROMPT, denoising_start=0.8)
    with pytest.raises(ValueError, match=r"denoising_end=1.0 must be strictly between 0 and 1"):
        base.prepare(PROMPT, denoising_end=1.0)

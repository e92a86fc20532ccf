"""End to end: jaxfusion's SDXL and SD pipelines against diffusers' on the same tiny random
pipeline folders, from the same initial latents (PSNR of the final images), and the checks a
request goes through before anything compiles."""

import shutil

import jax
import numpy as np
import pytest
from pipelines import (
    JAX_CLASSES,
    LATENT_SIZE,
    MIN_PSNR,
    NEGATIVE,
    PROMPT,
    SIZE,
    WORDS,
    Backends,
    count_compiles,
    initial_latents,
)

import jaxfusion
from jaxfusion.diffusers_backend import load_diffusers_pipeline, run_diffusers
from jaxfusion.images import psnr

KINDS = ("sdxl", "sd")
SCHEDULERS = ("euler", "ddim", "dpmpp")
# Every generation has this size and step count, so that compiled programs are reused.
COMMON = dict(height=SIZE, width=SIZE, num_inference_steps=4)


def compare(
    backends: Backends,
    kind: str,
    scheduler: str | None,
    prompt,
    negative_prompt=None,
    *,
    label: str,
    guidance_scale: float = 5.0,
    seed: int = 0,
    height: int = SIZE,
    width: int = SIZE,
    **conditioning,
) -> float:
    """Both backends from the same latents; asserts PSNR >= MIN_PSNR and returns it."""
    batch = 1 if isinstance(prompt, str) else len(prompt)
    factor = SIZE // LATENT_SIZE
    latents = initial_latents(batch, 4, height // factor, width // factor, seed)
    options = dict(
        COMMON, height=height, width=width, guidance_scale=guidance_scale, latents=latents
    )
    options.update(conditioning)
    expected = run_diffusers(backends.torch(kind, scheduler), prompt, negative_prompt, **options)
    actual = backends.jax(kind)(prompt, negative_prompt, scheduler=scheduler, **options)
    assert expected.shape == (batch, height, width, 3)
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    value = psnr(actual, expected)
    print(f"PSNR {label}: {value:.1f} dB")
    assert value >= MIN_PSNR, (label, value)
    return value


@pytest.mark.parametrize(
    ("kind", "scheduler"),
    [
        (k, s) if (k, s) == ("sdxl", "euler") else pytest.param(k, s, marks=pytest.mark.slow)
        for k in KINDS
        for s in SCHEDULERS
    ],
)
def test_matches_diffusers(backends, kind, scheduler):
    compare(backends, kind, scheduler, PROMPT, NEGATIVE, label=f"{kind} {scheduler}")


def test_sizes_that_do_not_halve_evenly(backends):
    """24x40 pixels (diffusers' pipelines take multiples of 8): a 12x20 latent, which SD's
    4-level UNet halves to 6x10, 3x5 and 2x3, then upsamples to the skips' sizes."""
    compare(backends, "sd", "euler", PROMPT, NEGATIVE, label="sd 24x40", height=24, width=40)


@pytest.mark.slow
def test_sdxl_without_negative_prompt(backends):
    """force_zeros_for_empty_prompt: all-zero negative embeddings, not the embedding of ""."""
    compare(backends, "sdxl", None, PROMPT, label="sdxl no negative prompt")


def test_sdxl_micro_conditioning(backends):
    compare(
        backends,
        "sdxl",
        None,
        PROMPT,
        NEGATIVE,
        original_size=(48, 64),
        crops_coords_top_left=(4, 8),
        target_size=(32, 32),
        label="sdxl micro-conditioning",
    )


@pytest.mark.slow
@pytest.mark.parametrize("negative", ["one", "each"])
def test_sdxl_batch(backends, negative):
    prompts = [PROMPT, "a green triangle at the bottom right"]
    negative_prompt = NEGATIVE if negative == "one" else [NEGATIVE, "red circle"]
    compare(
        backends, "sdxl", None, prompts, negative_prompt, seed=1, label=f"sdxl batch {negative}"
    )


@pytest.mark.slow
def test_sdxl_without_guidance(backends):
    compare(backends, "sdxl", None, PROMPT, NEGATIVE, guidance_scale=1.0, label="sdxl no CFG")


@pytest.mark.slow
def test_sd_without_negative_prompt(backends):
    """SD encodes "" for the unconditional half."""
    compare(backends, "sd", None, PROMPT, label="sd no negative prompt")


def test_truncated_prompt_warns(backends):
    """A prompt longer than 77 tokens is cut, as diffusers cuts it, with a warning."""
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(100))
    with pytest.warns(UserWarning, match="truncated"):
        compare(backends, "sdxl", None, prompt, NEGATIVE, label="sdxl truncated prompt")


@pytest.mark.slow
def test_seed(backends):
    pipe = backends.jax("sdxl")
    options = dict(COMMON, guidance_scale=5.0)
    first = pipe(PROMPT, seed=3, **options)
    again = pipe(PROMPT, seed=3, **options)
    other = pipe(PROMPT, seed=4, **options)
    assert first.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, again)
    assert psnr(first, other) < 40


def test_load_pipeline_picks_class(backends):
    for kind in KINDS:
        pipe = jaxfusion.load_pipeline(backends.folder(kind), dtype="float32")
        assert type(pipe) is JAX_CLASSES[kind]


def test_bad_requests_fail_before_compiling(backends):
    pipe = backends.jax("sdxl")
    options = dict(COMMON, guidance_scale=5.0)
    with count_compiles() as compiles:
        with pytest.raises(ValueError, match="height"):
            pipe(PROMPT, **dict(options, height=31))
        with pytest.raises(ValueError) as error:
            pipe(PROMPT, scheduler="pndm", **options)
        assert not compiles
        jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the listener sees compilations
        assert compiles
    for kind in SCHEDULERS:
        assert kind in str(error.value)


def test_missing_component(backends, tmp_path):
    folder = shutil.copytree(
        backends.folder("sdxl"),
        tmp_path / "sdxl",
        ignore=shutil.ignore_patterns("text_encoder_2"),
    )
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        jaxfusion.SDXLPipeline.from_pretrained(folder, dtype="float32")


def test_diffusers_backend_refuses(backends, tmp_path):
    folder = backends.folder("sd")
    with pytest.raises(ValueError, match="dpmpp"):
        load_diffusers_pipeline(folder, scheduler="pndm")
    other = shutil.copytree(folder, tmp_path / "other")
    index = other / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionPipeline", "KandinskyPipeline"))
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        load_diffusers_pipeline(other)

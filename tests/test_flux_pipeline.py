"""The Flux.1 pipeline (`jaxfusion.pipelines.flux`) against diffusers' FluxPipeline on the
same tiny random folders ([dev]: guidance embedding and dynamic shift; [schnell]: neither),
from the same packed latents; its patch-parallel runs against one device; its folder written
back; and what it refuses, before anything compiles."""

import json
import re

import diffusers
import numpy as np
import pytest
import torch
from commands import jaxfusion_command
from diffusers_models import relative_l2
from pipelines import FLUX_KINDS, MIN_PSNR, PROMPT, save_random_pipeline

import jaxfusion
from jaxfusion.diffusers_backend import load_diffusers_pipeline, run_diffusers
from jaxfusion.images import psnr
from sharding import ParallelConfig

# 40 x 48 pixels: latents 20 x 24 (the VAE halves), 10 x 12 tokens: 10 token rows split
# evenly over 2 patches and unevenly over 4 and 8.
HEIGHT, WIDTH, STEPS, GUIDANCE = 40, 48, 4, 4.0
PROMPTS = [PROMPT, "a blue square at the bottom"]
ROUNDING = 1e-5  # sync on P devices vs one device, float32: reordered sums only


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: save_random_pipeline(tmp_path_factory.mktemp(kind), kind) for kind in FLUX_KINDS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: jaxfusion.load_pipeline(folder) for kind, folder in folders.items()}


def diffusers_pipeline(folder):
    return load_diffusers_pipeline(folder, dtype="float32", device="cpu")


@pytest.mark.parametrize("kind", FLUX_KINDS)
def test_matches_diffusers(folders, pipes, kind):
    """Two prompts from the same packed latents: 136-138 dB on these models (float32
    rounding), as the SD pipelines'."""
    pipe = pipes[kind]
    assert type(pipe).__name__ == "FluxPipeline"
    latents = pipe.initial_latents(len(PROMPTS), HEIGHT, WIDTH, seed=0)
    assert latents.shape == (2, (HEIGHT // 4) * (WIDTH // 4), 16)  # FluxPipeline's packing
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    ours = pipe(PROMPTS, latents=latents, **call)
    theirs = run_diffusers(diffusers_pipeline(folders[kind]), PROMPTS, latents=latents, **call)
    assert ours.shape == (2, HEIGHT, WIDTH, 3)
    assert psnr(ours, theirs) >= MIN_PSNR


def test_t5_options_and_latents_output_match_diffusers(folders, pipes):
    """prompt_2 (T5's own prompt) and max_sequence_length as FluxPipeline takes them, and the
    final latents (output="latents") in its packed layout (`output_type="latent"`)."""
    pipe = pipes["flux-dev"]
    latents = pipe.initial_latents(1, HEIGHT, WIDTH, seed=1)
    options = dict(prompt_2="a green triangle", max_sequence_length=24)
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    ours = pipe(PROMPT, latents=latents, output="latents", **options, **call)
    torch_pipe = diffusers_pipeline(folders["flux-dev"])
    with torch.inference_mode():
        theirs = torch_pipe(
            PROMPT, latents=torch.from_numpy(latents), output_type="latent", **options, **call
        ).images.numpy()
    assert ours.shape == theirs.shape == latents.shape
    assert relative_l2(ours, theirs) < ROUNDING
    without_prompt_2 = pipe(
        PROMPT, latents=latents, output="latents", max_sequence_length=24, **call
    )
    assert relative_l2(without_prompt_2, ours) > 1e-3  # prompt_2 reached T5


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_sync_patches_equal_one_device(pipes, devices):
    """Sync patch parallelism over 10 token rows (4 and 8 devices: unequal slabs, 3 + 3 +
    2 + 2 and 2 + 2 + 1 x 6) is one device's image to float32 rounding; the row-split VAE
    decode included."""
    pipe = pipes["flux-dev"]
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, seed=3)
    single = pipe(PROMPTS, **call)
    parallel = pipe(PROMPTS, parallel=ParallelConfig(devices, mode="sync"), **call)
    assert relative_l2(parallel, single) < ROUNDING


def test_save_pretrained_round_trip(folders, pipes, tmp_path):
    """The folder jaxfusion writes is one diffusers loads (every weight as read: the same
    image bit for bit) and jaxfusion loads back."""
    pipe = pipes["flux-dev"]
    pipe.save_pretrained(tmp_path / "flux")
    latents = pipe.initial_latents(1, HEIGHT, WIDTH, seed=2)
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, latents=latents)
    original = run_diffusers(
        diffusers_pipeline(folders["flux-dev"]), PROMPT, **call, guidance_scale=3.5
    )
    written = run_diffusers(
        diffusers_pipeline(tmp_path / "flux"), PROMPT, **call, guidance_scale=3.5
    )
    np.testing.assert_array_equal(written, original)
    reloaded = jaxfusion.load_pipeline(tmp_path / "flux")
    np.testing.assert_array_equal(reloaded(PROMPT, **call), pipe(PROMPT, **call))
    assert isinstance(
        diffusers.FluxPipeline.from_pretrained(tmp_path / "flux").scheduler,
        diffusers.FlowMatchEulerDiscreteScheduler,
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(image=np.zeros((HEIGHT, WIDTH, 3))), "image-to-image is not supported"),
        (dict(negative_prompt="blue"), "true classifier-free guidance"),
        (dict(true_cfg_scale=4.0), "true classifier-free guidance"),
        (dict(max_sequence_length=600), "use 1 to 512"),
        (dict(clip_skip=1), r"takes no option \['clip_skip'\]"),
        (dict(prompt_2=["a", "b", "c"]), "3 prompt_2 for 1 prompts"),
        (dict(latents=np.zeros((1, 16, 20, 24))), "as FluxPipeline packs them"),
        (dict(parallel=ParallelConfig(4, 2)), "guidance is off"),
        (dict(scheduler="euler"), r"runs the schedulers \['flow_match'\]"),
        (dict(height=42), "not a positive multiple of 4"),
    ],
)
def test_refusals(pipes, arguments, message):
    """What Flux does not take is refused by name in `prepare`, before any compile."""
    call = dict(dict(height=HEIGHT, width=WIDTH), **arguments)
    with pytest.raises(ValueError, match=message):
        pipes["flux-dev"].prepare(PROMPT, **call)


def test_lora_refused(pipes):
    with pytest.raises(ValueError, match="LoRAs for Flux are not supported"):
        pipes["flux-dev"].load_lora("any/flux-lora.safetensors")


def test_compare_command_with_packed_latents(folders, tmp_path):
    """`jaxfusion compare --model FLUX_FOLDER --latents FILE.npy`: the file holds what
    FluxPipeline takes as latents (packed tokens), and both backends draw the same image."""
    latents = np.random.default_rng(5).standard_normal((1, 10 * 12, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    result = jaxfusion_command(
        tmp_path / "cache", "compare", "--model", str(folders["flux-dev"]), "--prompt", PROMPT,
        "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS),
        "--latents", str(tmp_path / "latents.npy"), "--runs", "1",
    )  # fmt: skip
    match = re.search(r"PSNR ([\d.]+|inf) dB", result.stderr)
    assert match, result.stderr
    assert float(match.group(1)) >= MIN_PSNR


@pytest.mark.parametrize("pipeline_class", ["FluxKontextPipeline", "Flux2Pipeline"])
def test_other_flux_pipelines_refused_by_name(tmp_path, pipeline_class):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    with pytest.raises(ValueError, match=rf"names '{pipeline_class}'.*FluxPipeline runs"):
        jaxfusion.load_pipeline(tmp_path)

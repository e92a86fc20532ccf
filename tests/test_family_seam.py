"""The pipeline core runs a model family that is not Stable Diffusion, written here as a
family module would be: the DiT-like transformer of `tiny_transformer.py` (joint attention
on text tokens) as the denoiser, a small VAE, and prompts embedded byte by byte. Nothing of
the core changes for it. Oracle: diffusers' EulerDiscreteScheduler stepping the same
networks in a plain Python loop (guidance, noise and decoding as diffusers' pipelines do
them); `sync` on two devices equals one device."""

from pathlib import Path
from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers_models import SD_NOISE_SCHEDULE, relative_l2
from flax import nnx
from tiny_transformer import TinyTransformer

from jaxfusion.models import AutoencoderKL, VAEConfig
from jaxfusion.models.layers import Embed, Linear
from jaxfusion.pipelines import Request
from jaxfusion.pipelines.base import LoraAdapters, PromptInputs, Stage, TextToImagePipeline
from sharding import ParallelConfig
from sharding.loops import concat_batches

TOKENS, TEXT_DIM, LABEL = 6, 8, 8  # prompt bytes kept; their embedding; the pooled label
SIZE, STEPS, GUIDANCE = 32, 4, 5.0
SCHEDULER = dict(SD_NOISE_SCHEDULE, _class_name="EulerDiscreteScheduler")
PROMPT, NEGATIVE = "a fox", "blurry"
ROUNDING = 1e-5  # float32 against float32, ordered differently (measured 1.5e-7)


class TinyModels(nnx.Module):
    """The family's networks: `denoiser` and `vae`, as the core asks, and its text encoder
    (`embed`: byte ids -> text tokens; `pool`: their mean -> the transformer's label)."""

    def __init__(self, rngs: nnx.Rngs):
        self.denoiser = TinyTransformer(label_dim=LABEL, text_dim=TEXT_DIM, rngs=rngs)
        blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
        config = VAEConfig(block_out_channels=(8, 8), norm_num_groups=4, **blocks)
        self.vae = AutoencoderKL(config, rngs=rngs)  # downscales by 2
        self.embed = Embed(256, TEXT_DIM, rngs=rngs)
        self.pool = Linear(TEXT_DIM, LABEL, rngs=rngs)

    def encode(self, ids: jax.Array) -> dict[str, jax.Array]:
        """(B, TOKENS) byte ids -> the transformer's conditioning."""
        text = self.embed(ids)
        return {"text": text, "label": self.pool(text.mean(axis=1))}


def byte_ids(prompts: list[str]) -> jax.Array:
    """(B, TOKENS) int32: each prompt's first TOKENS bytes, zero-padded."""
    rows = [list(p.encode()[:TOKENS].ljust(TOKENS, b"\0")) for p in prompts]
    return jnp.asarray(rows, jnp.int32)


class TinyPipeline(TextToImagePipeline):
    """A family of its own parts; it has no folder to load or save."""

    pipeline_class = "TinyPipeline"
    scheduler_kinds = ("euler", "ddim")
    default_guidance_scale = GUIDANCE
    default_strength = 0.5

    @classmethod
    def component_folders(cls, model_index: dict[str, Any]) -> list[str]:
        return ["scheduler"]

    @classmethod
    def load_components(cls, folder: Path, model_index, scheduler_config, *, attention: Any,
                        stage: Stage, **weights: Any) -> "TinyPipeline":  # fmt: skip
        raise NotImplementedError("the test family has no folder")

    def save_components(self, folder: Path, *, dtype: Any, flax: bool) -> dict[str, list]:
        raise NotImplementedError("the test family has no folder")

    def check_components(self) -> None:
        assert self.models.denoiser.channels == self.models.vae.config.latent_channels

    @property
    def latent_channels(self) -> int:
        return self.models.denoiser.channels

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float32)

    @property
    def size_multiple(self) -> int:
        """Latents of whole transformer patches."""
        return self.downscale_factor * self.models.denoiser.patch

    def default_size(self) -> tuple[int, int]:
        return SIZE, SIZE

    def prompt_inputs(self, request: Request, height, width, guidance) -> PromptInputs:
        if request.conditioning:
            raise TypeError(f"no options of this family: {sorted(request.conditioning)}")
        negative = byte_ids(request.negative_prompts) if guidance else None
        return PromptInputs(byte_ids(request.prompts), negative, None)

    def abstract_prompts(self, batch: int, height: int, width: int) -> PromptInputs:
        ids = jax.ShapeDtypeStruct((batch, TOKENS), jnp.int32)
        return PromptInputs(ids, ids, None)

    def encode_prompts(self, models: TinyModels, text, negative_text, encoding) -> dict:
        conditioning = models.encode(text)
        if negative_text is None:
            return conditioning
        return concat_batches(models.encode(negative_text), conditioning)

    def lora_networks(self) -> dict[str, nnx.Module]:
        return {"transformer": self.models.denoiser}

    def lora_modules(self, adapters: LoraAdapters) -> LoraAdapters:
        return adapters


@pytest.fixture(scope="module")
def pipe() -> TinyPipeline:
    return TinyPipeline(TinyModels(nnx.Rngs(0)), SCHEDULER)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """(1, C, h, w) NCHW initial noise, as diffusers takes it."""
    return np.random.default_rng(0).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)


def diffusers_loop(models: TinyModels, noise: np.ndarray) -> np.ndarray:
    """The image, (1, H, W, 3) in [0, 1]: diffusers' Euler scheduler around the networks,
    classifier-free guidance on (negative, prompt), as `StableDiffusionPipeline.__call__`."""
    scheduler = diffusers.EulerDiscreteScheduler(**SD_NOISE_SCHEDULE)
    scheduler.set_timesteps(STEPS)
    conditioning = models.encode(byte_ids([NEGATIVE, PROMPT]))
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(latents, t).numpy().transpose(0, 2, 3, 1)
        both = np.concatenate([scaled, scaled])
        prediction = models.denoiser.predict(jnp.asarray(both), jnp.float32(float(t)), conditioning)
        uncond, cond = np.split(np.asarray(prediction, np.float32).transpose(0, 3, 1, 2), 2)
        guided = torch.from_numpy(uncond + GUIDANCE * (cond - uncond))
        latents = scheduler.step(guided, t, latents).prev_sample
    vae = models.vae
    decoded = vae.decode(vae.unscale_latents(jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))))
    return np.clip(np.asarray(decoded) / 2 + 0.5, 0, 1)


def test_the_core_runs_a_family_that_is_not_stable_diffusion(pipe, noise):
    images = pipe(PROMPT, NEGATIVE, num_inference_steps=STEPS, latents=noise)
    assert images.shape == (1, SIZE, SIZE, 3)
    assert relative_l2(images, diffusers_loop(pipe.models, noise)) < ROUNDING


def test_sync_equals_one_device(pipe):
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=1)
    single = pipe(**call)
    sync = pipe(Request(**call, parallel=ParallelConfig(2, mode="sync")))
    assert relative_l2(sync, single) < ROUNDING


def test_the_family_rules_hold(pipe):
    with pytest.raises(ValueError, match=r"runs the schedulers \['euler', 'ddim'\], not 'dpmpp'"):
        pipe.prepare(PROMPT, scheduler="dpmpp")
    with pytest.raises(ValueError, match="height=30 is not a positive multiple of 4"):
        pipe.prepare(PROMPT, height=30)
    with pytest.raises(TypeError, match=r"no options of this family: \['clip_skip'\]"):
        pipe.prepare(PROMPT, clip_skip=1)  # an option of the SD family, not of this one

"""Tiny random diffusers pipelines (SDXL and SD 1.x shaped) written with `save_pretrained`, and
helpers to compare generated images. A 4-step 32x32 generation takes well under a second."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from diffusers_models import SD15_LIKE, SD_NOISE_SCHEDULE, SDXL_LIGHT, SDXL_LIKE, randomize

from jaxfusion.tokenizer import write_tokenizer

# Prompt words: each one token of the tiny tokenizers (other words are spelled letter by letter).
_WORDS = "a red blue green circle square triangle at the top bottom left right and photo of cat"
WORDS = tuple(_WORDS.split())
# Images are SIZE x SIZE pixels; the VAE downscales by 2, so latents are 16 x 16, which the
# UNets (3 and 4 levels) divide by 4 and 8.
SIZE = 32
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=SIZE,
)
LATENT_SIZE = SIZE // 2 ** (len(VAE["block_out_channels"]) - 1)
# The token ids of `write_tokenizer`: 0 start of text, 1 end of text, 2 "!".
TEXT = dict(
    intermediate_size=37,
    num_hidden_layers=2,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# The noise schedule of SD 1.x and SDXL; the extra keys are those of SDXL's published
# scheduler_config.json (read when another scheduler class is built from it).
SCHEDULE = dict(
    SD_NOISE_SCHEDULE,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


def _tokenizer(pad_token: str) -> transformers.CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(folder, WORDS, pad_token=pad_token)
        return transformers.CLIPTokenizer.from_pretrained(folder)


def _text_encoder(model_class, tokenizer, seed: int, **config):
    config = transformers.CLIPTextConfig(**dict(TEXT, vocab_size=len(tokenizer), **config))
    torch.manual_seed(seed)
    return randomize(model_class(config), seed=seed)


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(10)
    vae = AutoencoderKL(**VAE, scaling_factor=scaling_factor, force_upcast=force_upcast)
    return randomize(vae, seed=10)


def _unet(config: dict, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**config), seed=seed)


# The UNet of each SDXL kind. "sdxl" is the one of the PSNR figures against diffusers (the
# README's); "sdxl-light" the same pipeline with SDXL_LIGHT's UNet, for the tests that compare
# jaxfusion with itself (parallel layouts against one device, files against files): their
# programs compile in about half the time.
SDXL_UNETS = {"sdxl": SDXL_LIKE, "sdxl-light": SDXL_LIGHT}


def build_random_pipeline(kind: str):
    """A diffusers StableDiffusionXLPipeline ("sdxl", "sdxl-light") or StableDiffusionPipeline
    ("sd") of tiny random models, the same for every call."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if kind in SDXL_UNETS:
        tokenizer = _tokenizer("<|endoftext|>")
        tokenizer_2 = _tokenizer("!")
        text_encoder = _text_encoder(
            transformers.CLIPTextModel,
            tokenizer,
            seed=1,
            hidden_size=16,
            num_attention_heads=2,
            hidden_act="quick_gelu",
        )
        text_encoder_2 = _text_encoder(
            transformers.CLIPTextModelWithProjection,
            tokenizer_2,
            seed=2,
            hidden_size=32,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="gelu",
            pad_token_id=2,
        )
        unet = _unet(
            dict(
                SDXL_UNETS[kind],
                cross_attention_dim=16 + 32,
                projection_class_embeddings_input_dim=32 + 6 * SDXL_LIKE["addition_time_embed_dim"],
            ),
            seed=3,
        )
        scheduler = EulerDiscreteScheduler.from_config(
            dict(
                SCHEDULE,
                timestep_spacing="leading",
                interpolation_type="linear",
                prediction_type="epsilon",
                use_karras_sigmas=False,
            )
        )
        return StableDiffusionXLPipeline(
            vae=_vae(scaling_factor=0.13025, force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    if kind == "sd":
        tokenizer = _tokenizer("<|endoftext|>")
        text_encoder = _text_encoder(
            transformers.CLIPTextModel,
            tokenizer,
            seed=1,
            hidden_size=SD15_LIKE["cross_attention_dim"],
            num_attention_heads=4,
            hidden_act="quick_gelu",
        )
        # SD 1.x ships a PNDM config (no timestep_spacing: each class's default applies).
        return StableDiffusionPipeline(
            vae=_vae(scaling_factor=0.18215, force_upcast=False),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_unet(SD15_LIKE, seed=3),
            scheduler=DDIMScheduler.from_config(SCHEDULE),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    raise ValueError(f"kind={kind!r}: use 'sdxl', 'sdxl-light' or 'sd'")


def save_random_pipeline(folder: str | Path, kind: str) -> Path:
    """Writes `build_random_pipeline(kind)` to `folder` (safetensors) and returns the folder.

    The tokenizer subfolders hold vocab.json, merges.txt and tokenizer_config.json, as the
    SD and SDXL repositories on the hub do (transformers >= 5 would save tokenizer.json only).
    """
    folder = Path(folder)
    pipe = build_random_pipeline(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            shutil.rmtree(folder / name)
            write_tokenizer(folder / name, WORDS, pad_token=tokenizer.pad_token)
    return folder


def initial_latents(batch: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """(batch, channels, height, width) float32 standard normal noise: diffusers' `latents`."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, channels, height, width)).astype(np.float32)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects one entry per XLA compilation inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

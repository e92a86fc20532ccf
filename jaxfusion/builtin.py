"""The built-in model: a tiny SDXL-architecture pipeline with random weights, made by the
package itself (no download), written once as a diffusers pipeline folder in the cache and
then loaded like any checkpoint. It draws noise, not pictures; it exists so that every
command runs on a fresh machine."""

import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from jaxfusion.pipelines import SDXLPipeline
from jaxfusion.pipelines.base import Models, Stage, no_display
from jaxfusion.tokenizer import load_tokenizer, write_tokenizer

NAME = "builtin-random-sdxl-v2"
DESCRIPTION = "built-in tiny SDXL-architecture model, RANDOM weights (draws noise)"
WORDS = [
    "a",
    "an",
    "and",
    "the",
    "at",
    "of",
    "in",
    "on",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "middle",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "gray",
    "circle",
    "square",
    "triangle",
    "circles",
    "squares",
    "triangles",
    "small",
    "big",
    "background",
]
TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TEXT_ENCODER_2 = dict(TEXT_ENCODER, hidden_act="gelu", projection_dim=32, pad_token_id=2)
UNET = dict(
    sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.13025,
)
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def cache_dir() -> Path:
    """Where jaxfusion keeps its files: $JAXFUSION_CACHE, else $XDG_CACHE_HOME/jaxfusion,
    else ~/.cache/jaxfusion."""
    if "JAXFUSION_CACHE" in os.environ:
        return Path(os.environ["JAXFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxfusion"


def builtin_model_path(stage: Stage = no_display) -> Path:
    """The built-in pipeline folder, written on first use (seeded: the same on every machine)."""
    folder = cache_dir() / NAME
    if not (folder / "model_index.json").is_file():
        try:
            with stage(f"writing the built-in model to {folder}"):
                random_pipeline(seed=0).save_pretrained(folder)
        except (FileExistsError, OSError):
            if not (folder / "model_index.json").is_file():  # another process did not win
                raise
    return folder


def random_pipeline(seed: int, dtype=jnp.float32) -> SDXLPipeline:
    """The built-in architecture with random weights drawn from `seed`."""
    rngs = nnx.Rngs(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp, "tokenizer"), WORDS)
        write_tokenizer(Path(tmp, "tokenizer_2"), WORDS, pad_token="!")
        tokenizers = [load_tokenizer(tmp, "tokenizer"), load_tokenizer(tmp, "tokenizer_2")]
    vocab_size = len(tokenizers[0])
    text_encoders = [
        CLIPTextModel(
            CLIPTextConfig(vocab_size=vocab_size, **TEXT_ENCODER), dtype=dtype, rngs=rngs
        ),
        CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=vocab_size, **TEXT_ENCODER_2), dtype=dtype, rngs=rngs
        ),
    ]
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(UNET), dtype=dtype, rngs=rngs)
    vae = AutoencoderKL(VAEConfig.from_diffusers(VAE), dtype=dtype, rngs=rngs)
    index = {"force_zeros_for_empty_prompt": True}
    return SDXLPipeline(Models(unet, vae, text_encoders), tokenizers, SCHEDULER, index)

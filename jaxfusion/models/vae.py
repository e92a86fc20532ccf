"""AutoencoderKL (diffusers' `autoencoders/autoencoder_kl.py` and its `Encoder`/`Decoder`),
NHWC, with the configuration read from and written to diffusers' `config.json`.

Images are (B, H, W, in_channels) in [-1, 1]; latents are (B, H/f, W/f, latent_channels)
with f = 2 ** (len(block_out_channels) - 1) (8 for SD/SDXL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from jaxfusion.models import row_blocks
from jaxfusion.models.configuration import freeze, from_diffusers_config
from jaxfusion.models.vae_blocks import (
    EPS,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
)

# diffusers config keys that this model accepts only at the value given (their defaults).
_FIXED_KEYS: dict[str, Any] = {"latents_mean": None, "latents_std": None}
# Keys that do not change what the model computes.


@dataclass(frozen=True)
class VAEConfig:
    """diffusers' AutoencoderKL configuration; field names, meanings and defaults are
    diffusers'. `scaling_factor` and `shift_factor` do not change the model: they map its
    latents to the denoiser's (`AutoencoderKL.scale_latents`, `unscale_latents`).

    Flux.1's VAE reads as it is: latent_channels 16, use_quant_conv and use_post_quant_conv
    false (no `quant_conv` / `post_quant_conv` layers or weights), scaling_factor 0.3611,
    shift_factor 0.1159. Its pipeline decodes `unscale_latents(latents)` (latents /
    scaling_factor + shift_factor) and denoises `scale_latents(z)` ((z - shift_factor) *
    scaling_factor) of an encoded image, as SD's with shift_factor null."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        freeze(self, "AutoencoderKL")

    def _problems(self) -> list[str]:
        levels = len(self.block_out_channels)
        problems = []
        for name, block in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = getattr(self, name)
            if len(types) != levels:
                problems.append(
                    f"{name}: {len(types)} entries for {levels} block_out_channels levels"
                )
            problems += [
                f"{name}: {t!r} is not supported (use {block!r})" for t in types if t != block
            ]
        if self.act_fn != "silu":
            problems.append(f"act_fn: {self.act_fn!r} is not supported (only 'silu')")
        problems += [
            f"block_out_channels: {c} is not divisible by norm_num_groups={self.norm_num_groups}"
            for c in self.block_out_channels
            if c % self.norm_num_groups
        ]
        return problems

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Reads a diffusers `config.json` dict; any key or value outside the supported set
        is refused, all of them named in one error."""
        return from_diffusers_config(
            cls,
            config,
            class_name="AutoencoderKL",
            fixed_keys=_FIXED_KEYS,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' AutoencoderKL is built from."""
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side, f (8 for SD/SDXL; diffusers'
        pipelines call it `vae_scale_factor`)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def compute_dtype(self, dtype) -> jnp.dtype:
        """The dtype this VAE runs in inside a pipeline running in `dtype`: float32 when
        `dtype` is float16 and `force_upcast` is set, as diffusers' pipelines upcast such a
        VAE (SDXL's overflows in float16); otherwise `dtype`."""
        dtype = jnp.dtype(dtype)
        return jnp.dtype(jnp.float32) if dtype == jnp.float16 and self.force_upcast else dtype


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LatentDistribution:
    """The encoder's diagonal Gaussian over latents (diffusers' DiagonalGaussianDistribution):
    `mean` and `logvar` (clamped to [-30, 20]), each (B, h, w, latent_channels)."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * standard normal noise drawn with `key`, in the mean's dtype."""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise


class Encoder(nnx.Module):
    """`conv_in`, `down_blocks.i`, `mid_block`, `conv_norm_out`, SiLU, `conv_out`:
    (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) (mean and logvar)."""

    def __init__(self, config: VAEConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = sharding.Conv2d(config.in_channels, channels[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    channels[max(level - 1, 0)],
                    channels[level],
                    num_layers=config.layers_per_block,
                    groups=groups,
                    add_downsample=level < len(channels) - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for level in range(len(channels))
            ]
        )
        self.mid_block = UNetMidBlock2D(
            channels[-1],
            groups=groups,
            add_attention=config.mid_block_add_attention,
            dtype=dtype,
            rngs=rngs,
        )
        self.conv_norm_out = sharding.GroupNorm(
            groups, channels[-1], epsilon=EPS, dtype=dtype, rngs=rngs
        )
        self.conv_out = sharding.Conv2d(
            channels[-1], 2 * config.latent_channels, 3, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(row_blocks.RowBlocking, nnx.Module):
    """`conv_in`, `mid_block`, `up_blocks.i`, `conv_norm_out`, SiLU, `conv_out`:
    (B, h, w, latent_channels) -> (B, h*f, w*f, out_channels).

    The up blocks' resnets and upsamplers and the output layers run by blocks of rows on
    inputs over `row_blocks.THRESHOLD_BYTES` (`row_blocks`, exact; `set_row_blocks`)."""

    def __init__(self, config: VAEConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        reversed_channels = config.block_out_channels[::-1]
        levels = len(reversed_channels)
        groups = config.norm_num_groups
        self.conv_in = sharding.Conv2d(
            config.latent_channels, reversed_channels[0], 3, dtype=dtype, rngs=rngs
        )
        self.mid_block = UNetMidBlock2D(
            reversed_channels[0],
            groups=groups,
            add_attention=config.mid_block_add_attention,
            dtype=dtype,
            rngs=rngs,
        )
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(level - 1, 0)],
                    reversed_channels[level],
                    num_layers=config.layers_per_block + 1,
                    groups=groups,
                    add_upsample=level < levels - 1,
                    row_blocks_threshold=row_blocks.THRESHOLD_BYTES,
                    dtype=dtype,
                    rngs=rngs,
                )
                for level in range(levels)
            ]
        )
        self.conv_norm_out = sharding.GroupNorm(
            groups, reversed_channels[-1], epsilon=EPS, dtype=dtype, rngs=rngs
        )
        self.conv_out = sharding.Conv2d(
            reversed_channels[-1], config.out_channels, 3, dtype=dtype, rngs=rngs
        )
        self.row_blocks_threshold = row_blocks.THRESHOLD_BYTES
        self.row_block_bytes = row_blocks.BLOCK_BYTES

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        if row_blocks.applies(x, self.row_blocks_threshold):
            return row_blocks.norm_silu_conv(
                self.conv_norm_out, self.conv_out, x, block_bytes=self.row_block_bytes
            )
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder of Stable Diffusion: images <-> latents.

    Modules and parameters are named as in diffusers (`encoder`, `decoder`, `quant_conv`,
    `post_quant_conv`), so a diffusers state dict maps onto it by a mechanical rename.
    Latents here are the VAE's own; the UNet works on `scale_latents(latents)`.
    """

    def __init__(self, config: VAEConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None):
        self.config = config
        self.dtype = dtype
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = (
            sharding.Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs)
            if config.use_quant_conv
            else None
        )
        self.post_quant_conv = (
            sharding.Conv2d(latent, latent, 1, dtype=dtype, rngs=rngs)
            if config.use_post_quant_conv
            else None
        )

    @classmethod
    def abstract(cls, config: VAEConfig, *, dtype: jnp.dtype = jnp.float32) -> AutoencoderKL:
        """The model with `jax.ShapeDtypeStruct` parameters: nothing is allocated."""
        return cls(config, dtype=dtype, rngs=None)

    def encode(self, images: jax.Array) -> LatentDistribution:
        """images (B, H, W, in_channels) in [-1, 1] -> the latent distribution, mean and
        logvar each (B, H/f, W/f, latent_channels) in the model's dtype (every downsampling
        halves an odd size rounding down, as diffusers)."""
        _check_channels("images", images.shape, self.config.in_channels)
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, h, w, latent_channels), unscaled (`unscale_latents`) -> images
        (B, h*f, w*f, out_channels), nominally in [-1, 1], in the model's dtype."""
        _check_channels("latents", latents.shape, self.config.latent_channels)
        latents = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def scale_latents(self, latents: jax.Array) -> jax.Array:
        """The VAE's latents -> the UNet's: (latents - shift_factor) * scaling_factor, without
        the shift when `shift_factor` is null (diffusers' pipelines after `encode`)."""
        if self.config.shift_factor is not None:
            latents = latents - self.config.shift_factor
        return latents * self.config.scaling_factor

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """The UNet's latents -> the VAE's: latents / scaling_factor + shift_factor, without
        the shift when `shift_factor` is null (diffusers' pipelines before `decode`)."""
        latents = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            latents = latents + self.config.shift_factor
        return latents


def _check_channels(name: str, shape: tuple[int, ...], channels: int) -> None:
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(
            f"{name} have shape {tuple(shape)}; expected (batch, height, width, {channels}) "
            "(NHWC; diffusers' NCHW tensors need a transpose)"
        )

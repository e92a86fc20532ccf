"""UNet2DConditionModel (diffusers' `unets/unet_2d_condition.py`) for SD 1.x, SD 2.x and SDXL,
NHWC, with the configuration read from and written to diffusers' `config.json`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from jaxfusion.models.attention import cache_text_kv
from jaxfusion.models.configuration import freeze, from_diffusers_config
from jaxfusion.models.embeddings import TimestepEmbedding, timestep_features
from jaxfusion.models.unet_2d_blocks import (
    BlockAttention,
    BlockNorm,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

CROSS_ATTENTION_BLOCKS = {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"}
DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
UP_BLOCK_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}

# diffusers config keys that this model accepts only at the value given (their defaults):
# every SD 1.x/2.x/SDXL checkpoint has exactly these.
_FIXED_KEYS: dict[str, Any] = {
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "act_fn": "silu",
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
# Keys that do not change what inference computes.
_IGNORED_KEYS = frozenset({"dropout", "addition_embed_type_num_heads"})


@dataclass(frozen=True)
class UNetConfig:
    """The subset of diffusers' UNet2DConditionModel configuration that SD/SDXL use.

    Field names, meanings and defaults are diffusers'. Note diffusers' historical naming:
    `attention_head_dim` holds the number of attention *heads* per level.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        freeze(self, "UNet2DConditionModel")

    def _problems(self) -> list[str]:
        levels = len(self.block_out_channels)
        problems = []
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            problems.append(
                f"down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) must each have one entry per "
                f"block_out_channels level ({levels})"
            )
        problems += [
            f"down_block_types: {t!r} is not supported (use one of {sorted(DOWN_BLOCK_TYPES)})"
            for t in self.down_block_types
            if t not in DOWN_BLOCK_TYPES
        ]
        problems += [
            f"up_block_types: {t!r} is not supported (use one of {sorted(UP_BLOCK_TYPES)})"
            for t in self.up_block_types
            if t not in UP_BLOCK_TYPES
        ]
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            problems.append(
                f"mid_block_type: {self.mid_block_type!r} is not supported "
                "(use 'UNetMidBlock2DCrossAttn')"
            )
        for name in (
            "layers_per_block",
            "cross_attention_dim",
            "attention_head_dim",
            "transformer_layers_per_block",
        ):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                problems.append(f"{name}: {len(value)} entries for {levels} levels")
        problems += [
            f"block_out_channels: {c} is not divisible by norm_num_groups={self.norm_num_groups}"
            for c in self.block_out_channels
            if c % self.norm_num_groups
        ]
        if self.addition_embed_type not in (None, "text_time"):
            problems.append(
                f"addition_embed_type: {self.addition_embed_type!r} is not supported "
                "(use null or 'text_time')"
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None
            or self.projection_class_embeddings_input_dim is None
        ):
            problems.append(
                "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        return problems

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Reads a diffusers `config.json` dict; any key or value outside the supported set
        is refused, all of them named in one error."""
        return from_diffusers_config(
            cls,
            config,
            class_name="UNet2DConditionModel",
            fixed_keys=_FIXED_KEYS,
            ignored_keys=_IGNORED_KEYS,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' UNet2DConditionModel is built from."""
        return {"_class_name": "UNet2DConditionModel", **dataclasses.asdict(self)}

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, name: str) -> tuple:
        """A field that may be given once for all levels, as one entry per level."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.num_levels

    def down_attention(self, level: int) -> BlockAttention | None:
        if self.down_block_types[level] not in CROSS_ATTENTION_BLOCKS:
            return None
        num_layers = self.per_level("layers_per_block")[level]
        depth = self.per_level("transformer_layers_per_block")[level]
        return self._attention(level, depth, num_layers)

    def up_attention(self, level: int) -> BlockAttention | None:
        """Attention of up block `level` (0 = deepest), which has layers_per_block + 1 resnets."""
        if self.up_block_types[level] not in CROSS_ATTENTION_BLOCKS:
            return None
        num_layers = self.per_level("layers_per_block")[::-1][level] + 1
        depths = (
            self.reverse_transformer_layers_per_block
            or self.per_level("transformer_layers_per_block")[::-1]
        )
        reversed_level = self.num_levels - 1 - level
        return self._attention(reversed_level, depths[level], num_layers)

    def mid_attention(self) -> BlockAttention:
        depth = self.per_level("transformer_layers_per_block")[-1]
        first = depth if isinstance(depth, int) else depth[0]
        return self._attention(self.num_levels - 1, first, 1)

    def _attention(self, level: int, depth: int | tuple[int, ...], num_layers: int):
        layers = (depth,) * num_layers if isinstance(depth, int) else depth
        if len(layers) != num_layers:
            raise ValueError(
                f"transformer_layers_per_block: {layers} for a level of {num_layers} resnets"
            )
        return BlockAttention(
            heads=self.per_level("attention_head_dim")[level],
            layers=layers,
            cross_attention_dim=self.per_level("cross_attention_dim")[level],
            use_linear_projection=self.use_linear_projection,
        )


class Conditioning(NamedTuple):
    """What the UNet is conditioned on besides the latent and the timestep, batch first.

    encoder_hidden_states: (B, tokens, cross_attention_dim) text hidden states.
    text_embeds: (B, D) pooled text embedding (SDXL), else None.
    time_ids: (B, 6) original size, crop top-left, target size (SDXL), else None.
    """

    encoder_hidden_states: jax.Array
    text_embeds: jax.Array | None = None
    time_ids: jax.Array | None = None


class UNet2DConditionModel(nnx.Module):
    """The conditional UNet: noisy latent, timestep and text states -> noise prediction.

    Modules and parameters are named as in diffusers (`conv_in`, `time_embedding`,
    `add_embedding`, `down_blocks.i`, `mid_block`, `up_blocks.i`, `conv_norm_out`,
    `conv_out`), so a diffusers state dict maps onto it by a mechanical rename.
    """

    def __init__(
        self, config: UNetConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.config = config
        self.dtype = dtype
        channels = config.block_out_channels
        time_embed_dim = channels[0] * 4
        norm = BlockNorm(groups=config.norm_num_groups, eps=config.norm_eps)

        self.conv_in = sharding.Conv2d(
            config.in_channels, channels[0], 3, current_halo=True, dtype=dtype, rngs=rngs
        )
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, dtype=dtype, rngs=rngs)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(
                config.projection_class_embeddings_input_dim, time_embed_dim, dtype=dtype, rngs=rngs
            )

        layers_per_block = config.per_level("layers_per_block")
        self.down_blocks = nnx.List(
            [
                DownBlock2D(
                    channels[max(level - 1, 0)],
                    channels[level],
                    num_layers=layers_per_block[level],
                    temb_channels=time_embed_dim,
                    norm=norm,
                    attention=config.down_attention(level),
                    add_downsample=level < config.num_levels - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for level in range(config.num_levels)
            ]
        )
        # The encoder's exchanges travel while the rest of the step computes (read early in
        # the next step, they would have little of it before them); the others' from the
        # start of the step that reads them.
        sharding.send_when_produced(self.down_blocks)
        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1],
            temb_channels=time_embed_dim,
            norm=norm,
            attention=config.mid_attention(),
            output_scale_factor=config.mid_block_scale_factor,
            dtype=dtype,
            rngs=rngs,
        )
        reversed_channels = channels[::-1]
        self.up_blocks = nnx.List(
            [
                UpBlock2D(
                    reversed_channels[min(level + 1, config.num_levels - 1)],
                    reversed_channels[level],
                    reversed_channels[max(level - 1, 0)],
                    num_layers=layers_per_block[::-1][level] + 1,
                    temb_channels=time_embed_dim,
                    norm=norm,
                    attention=config.up_attention(level),
                    add_upsample=level < config.num_levels - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for level in range(config.num_levels)
            ]
        )
        self.conv_norm_out = sharding.GroupNorm(
            config.norm_num_groups, channels[0], epsilon=config.norm_eps, dtype=dtype, rngs=rngs
        )
        self.conv_out = sharding.Conv2d(channels[0], config.out_channels, 3, dtype=dtype, rngs=rngs)

    @classmethod
    def abstract(cls, config: UNetConfig, *, dtype: jnp.dtype = jnp.float32):
        """The model with `jax.ShapeDtypeStruct` parameters: nothing is allocated."""
        return cls(config, dtype=dtype, rngs=None)

    def check_inputs(
        self,
        sample_shape: tuple[int, ...],
        text_embeds: jax.Array | None,
        time_ids: jax.Array | None,
    ) -> None:
        """Refuses inputs this UNet cannot take, naming the problem and the fix."""
        config = self.config
        if len(sample_shape) != 4 or sample_shape[-1] != config.in_channels:
            raise ValueError(
                f"sample has shape {tuple(sample_shape)}; expected (batch, height, width, "
                f"{config.in_channels}) (NHWC; diffusers' NCHW latents need a transpose)"
            )
        if config.addition_embed_type == "text_time" and (text_embeds is None or time_ids is None):
            raise ValueError(
                "this UNet has addition_embed_type='text_time' (SDXL): pass text_embeds "
                "(pooled text embedding) and time_ids (size and crop conditioning)"
            )

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the model output (noise, or v) for a noisy latent.

        Args:
          sample: (B, H, W, in_channels) noisy latent, NHWC.
          timesteps: scalar or (B,) diffusion timesteps.
          encoder_hidden_states: (B, text_tokens, cross_attention_dim) text states.
          text_embeds: (B, D) pooled text embedding (SDXL `text_time` only).
          time_ids: (B, 6) original size, crop top-left and target size (SDXL only).
        Returns:
          (B, H, W, out_channels) in the model's dtype.
        """
        config = self.config
        self.check_inputs(sample.shape, text_embeds, time_ids)
        batch = sample.shape[0]
        sample = sample.astype(self.dtype)
        if config.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        features = timestep_features(
            timesteps,
            config.block_out_channels[0],
            flip_sin_to_cos=config.flip_sin_to_cos,
            downscale_freq_shift=config.freq_shift,
        )
        temb = self.time_embedding(features.astype(self.dtype))
        if config.addition_embed_type == "text_time":
            time_features = timestep_features(
                time_ids.reshape(-1),
                config.addition_time_embed_dim,
                flip_sin_to_cos=config.flip_sin_to_cos,
                downscale_freq_shift=config.freq_shift,
            ).reshape(batch, -1)
            add_input = jnp.concatenate([text_embeds.astype(jnp.float32), time_features], axis=-1)
            temb = temb + self.add_embedding(add_input.astype(self.dtype))
        encoder_hidden_states = encoder_hidden_states.astype(self.dtype)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, skips, temb, encoder_hidden_states)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

    @property
    def row_unit(self) -> int:
        """What a patch's boundary rows are a multiple of (`sharding.loops.Denoiser`): one
        row of the coarsest level, 2 ** (levels - 1) latent rows."""
        return 2 ** (self.config.num_levels - 1)

    def predict(
        self, latents: jax.Array, timestep: jax.Array, conditioning: Conditioning
    ) -> jax.Array:
        """The UNet's output for `latents` (B, H, W, in_channels) at `timestep`."""
        return self(latents, timestep, *conditioning)

    def cache_conditioning(self, conditioning: Conditioning) -> None:
        """Stores the text keys and values of every cross-attention (see `cache_text_kv`)."""
        cache_text_kv(self, conditioning.encoder_hidden_states)

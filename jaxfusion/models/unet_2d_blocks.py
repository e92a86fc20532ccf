"""The UNet's levels (diffusers' `unets/unet_2d_blocks.py`), NHWC.

diffusers has a class with and a class without attention for each direction
(`CrossAttnDownBlock2D`/`DownBlock2D`, `CrossAttnUpBlock2D`/`UpBlock2D`); here one class per
direction serves both: `attention` is None for the plain block. Module names and numbering
are diffusers' (`resnets.i`, `attentions.i`, `downsamplers.0`, `upsamplers.0`).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.attention import Transformer2DModel
from jaxfusion.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class BlockAttention:
    """The Transformer2DModels of one level: one per resnet, `layers[i]` blocks deep."""

    heads: int
    layers: tuple[int, ...]
    cross_attention_dim: int
    use_linear_projection: bool


@dataclass(frozen=True)
class BlockNorm:
    """GroupNorm settings shared by every resnet and transformer of the UNet."""

    groups: int
    eps: float


def _transformers(channels: int, attention: BlockAttention, groups: int, dtype, rngs):
    return nnx.List(
        [
            Transformer2DModel(
                channels,
                heads=attention.heads,
                num_layers=depth,
                cross_attention_dim=attention.cross_attention_dim,
                norm_num_groups=groups,
                use_linear_projection=attention.use_linear_projection,
                dtype=dtype,
                rngs=rngs,
            )
            for depth in attention.layers
        ]
    )


class DownBlock2D(nnx.Module):
    """`num_layers` resnets (each followed by a transformer when `attention` is given), then
    an optional stride-2 downsampler. Returns the output and every intermediate state the
    up path concatenates back."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        temb_channels: int,
        norm: BlockNorm,
        attention: BlockAttention | None,
        add_downsample: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=norm.groups,
                    eps=norm.eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            None
            if attention is None
            else _transformers(out_channels, attention, norm.groups, dtype, rngs)
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnets.0, then (attentions.i, resnets.i+1) for each transformer."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        norm: BlockNorm,
        attention: BlockAttention,
        output_scale_factor: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    channels,
                    channels,
                    temb_channels=temb_channels,
                    groups=norm.groups,
                    eps=norm.eps,
                    output_scale_factor=output_scale_factor,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(len(attention.layers) + 1)
            ]
        )
        self.attentions = _transformers(channels, attention, norm.groups, dtype, rngs)

    def __call__(self, x: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array):
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attention(x, encoder_hidden_states), temb)
        return x


class UpBlock2D(nnx.Module):
    """`num_layers` resnets, each taking the running state concatenated (on channels) with one
    skip state from the down path, each followed by a transformer when `attention` is
    given; then an optional upsampler to the next skip's size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        *,
        num_layers: int,
        temb_channels: int,
        norm: BlockNorm,
        attention: BlockAttention | None,
        add_upsample: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        def resnet(i: int) -> ResnetBlock2D:
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            return ResnetBlock2D(
                resnet_in_channels + skip_channels,
                out_channels,
                temb_channels=temb_channels,
                groups=norm.groups,
                eps=norm.eps,
                dtype=dtype,
                rngs=rngs,
            )

        self.resnets = nnx.List([resnet(i) for i in range(num_layers)])
        self.attentions = (
            None
            if attention is None
            else _transformers(out_channels, attention, norm.groups, dtype, rngs)
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    def __call__(
        self,
        x: jax.Array,
        skips: list[jax.Array],
        temb: jax.Array,
        encoder_hidden_states: jax.Array,
    ) -> jax.Array:
        """`skips` are consumed from the end, one per resnet; the upsampler takes the state to
        the size of the next skip (diffusers' `upsample_size`: twice the size, or one less
        where the down path halved an odd size)."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[1:3] if skips else None)
        return x

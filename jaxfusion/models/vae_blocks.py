"""The VAE's blocks (diffusers' `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D` and
the spatial self-attention they use), NHWC.

Module names and numbering are diffusers' (`resnets.i`, `attentions.0`, `downsamplers.0`,
`upsamplers.0`), so the VAE's state dict maps onto them by the mechanical rename of
`convert.state_dict`. Every GroupNorm of the VAE has eps 1e-6.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from jaxfusion.models.layers import Linear
from jaxfusion.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxfusion.models.scaled_dot_product import DotProductAttention

EPS = 1e-6


def _resnets(
    in_channels: int,
    out_channels: int,
    num_layers: int,
    groups: int,
    dtype,
    rngs,
    row_blocks_threshold: int | None = None,
):
    """`num_layers` resnets without time embedding, the first changing the width."""
    return nnx.List(
        [
            ResnetBlock2D(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels=None,
                groups=groups,
                eps=EPS,
                row_blocks_threshold=row_blocks_threshold,
                dtype=dtype,
                rngs=rngs,
            )
            for i in range(num_layers)
        ]
    )


class SpatialSelfAttention(nnx.Module):
    """diffusers' `Attention` as the VAE's mid block builds it: one head over all pixels.

    `group_norm` -> `to_q`, `to_k`, `to_v` (with bias) -> softmax(q k^T / sqrt(C)) v ->
    `to_out.0`, plus the input (diffusers' `residual_connection`; its `rescale_output_factor`
    is the mid block's `output_scale_factor`, always 1 in the VAE). The keys and values of
    every patch of the image come through `sharding.KVExchange`; softmax runs in float32.
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.group_norm = sharding.GroupNorm(groups, channels, epsilon=EPS, dtype=dtype, rngs=rngs)
        self.to_q = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, dtype=dtype, rngs=rngs)])
        self.kv_exchange = sharding.KVExchange()
        self.processor = DotProductAttention()

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, 1, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        k, v = self.kv_exchange(k, v)
        out = self.to_out[0](self.processor(q, k, v))
        return out.reshape(b, h, w, c) + x


class UNetMidBlock2D(nnx.Module):
    """resnets.0, then attentions.0 (when `add_attention`) and resnets.1, at constant width."""

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        add_attention: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.resnets = _resnets(channels, channels, 2, groups, dtype, rngs)
        self.attentions = (
            nnx.List([SpatialSelfAttention(channels, groups=groups, dtype=dtype, rngs=rngs)])
            if add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (unless the last level) a stride-2 downsampler that pads
    only the bottom and the right: (B, H, W, in) -> (B, H/2, W/2, out)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, dtype, rngs)
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (unless the last level) a 2x nearest upsampler with its
    3x3 conv: (B, H, W, in) -> (B, 2H, 2W, out). `row_blocks_threshold`: see
    `ResnetBlock2D`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        row_blocks_threshold: int | None = None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, groups, dtype, rngs, row_blocks_threshold
        )
        upsampler = Upsample2D(
            out_channels, row_blocks_threshold=row_blocks_threshold, dtype=dtype, rngs=rngs
        )
        self.upsamplers = nnx.List([upsampler]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x

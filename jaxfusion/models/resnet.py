"""ResnetBlock2D, Downsample2D and Upsample2D (diffusers' `resnet.py`, `downsampling.py`,
`upsampling.py`), NHWC."""

import jax
import jax.numpy as jnp
from flax import nnx

import sharding


class ResnetBlock2D(nnx.Module):
    """norm1 -> SiLU -> conv1 -> + time_emb_proj(SiLU(temb)) -> norm2 -> SiLU -> conv2,
    plus the input (through the 1x1 `conv_shortcut` when the width changes), divided by
    `output_scale_factor`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.output_scale_factor = output_scale_factor
        self.norm1 = sharding.GroupNorm(groups, in_channels, epsilon=eps, dtype=dtype)
        self.conv1 = sharding.Conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = nnx.Linear(
            temb_channels, out_channels, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.norm2 = sharding.GroupNorm(groups, out_channels, epsilon=eps, dtype=dtype)
        self.conv2 = sharding.Conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        if in_channels != out_channels:
            self.conv_shortcut = sharding.Conv2d(
                in_channels, out_channels, 1, dtype=dtype, rngs=rngs
            )
        else:
            self.conv_shortcut = None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """x: (B, H, W, in_channels), temb: (B, temb_channels) -> (B, H, W, out_channels)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """3x3 convolution with stride 2 (`conv`): (B, H, W, C) -> (B, H/2, W/2, C)."""

    def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = sharding.Conv2d(channels, channels, 3, stride=2, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 `conv`: (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = sharding.Conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)

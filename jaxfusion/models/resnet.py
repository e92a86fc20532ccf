"""ResnetBlock2D, Downsample2D and Upsample2D (diffusers' `resnet.py`, `downsampling.py`,
`upsampling.py`), NHWC."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from jaxfusion.models import row_blocks
from jaxfusion.models.layers import Linear


class ResnetBlock2D(row_blocks.RowBlocking, nnx.Module):
    """norm1 -> SiLU -> conv1 -> + time_emb_proj(SiLU(temb)) -> norm2 -> SiLU -> conv2,
    plus the input (through the 1x1 `conv_shortcut` when the width changes), divided by
    `output_scale_factor`. Without `temb_channels` (the VAE's resnets) there is no
    `time_emb_proj` and no time embedding.

    `row_blocks_threshold`: inputs larger than this many bytes run norm -> SiLU -> conv by
    blocks of rows (`row_blocks`, exact); None (the default) never."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        row_blocks_threshold: int | None = None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.output_scale_factor = output_scale_factor
        self.row_blocks_threshold = row_blocks_threshold
        self.row_block_bytes = row_blocks.BLOCK_BYTES
        self.norm1 = sharding.GroupNorm(groups, in_channels, epsilon=eps, dtype=dtype, rngs=rngs)
        self.conv1 = sharding.Conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            self.time_emb_proj = Linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
        self.norm2 = sharding.GroupNorm(groups, out_channels, epsilon=eps, dtype=dtype, rngs=rngs)
        self.conv2 = sharding.Conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        if in_channels != out_channels:
            self.conv_shortcut = sharding.Conv2d(
                in_channels, out_channels, 1, dtype=dtype, rngs=rngs
            )
        else:
            self.conv_shortcut = None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: (B, H, W, in_channels), temb: (B, temb_channels) or None when the block has no
        `time_emb_proj` -> (B, H, W, out_channels)."""
        blocked = row_blocks.applies(x, self.row_blocks_threshold)
        if blocked:
            h = row_blocks.norm_silu_conv(
                self.norm1, self.conv1, x, block_bytes=self.row_block_bytes
            )
        else:
            h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        if blocked:
            return row_blocks.norm_silu_conv(
                self.norm2,
                self.conv2,
                h,
                block_bytes=self.row_block_bytes,
                residual=lambda start, rows: self.shortcut(
                    jax.lax.optimization_barrier(
                        jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)
                    )
                ),
                output_scale_factor=self.output_scale_factor,
            )
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (self.shortcut(x) + h) / self.output_scale_factor

    def shortcut(self, x: jax.Array) -> jax.Array:
        """The residual branch: x, or `conv_shortcut(x)` when the width changes."""
        return x if self.conv_shortcut is None else self.conv_shortcut(x)


class Downsample2D(nnx.Module):
    """3x3 convolution with stride 2 (`conv`): (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C)
    with `padding` 1, (B, floor(H/2), floor(W/2), C) with 0.

    `padding` is diffusers' `downsample_padding`: 1 pads every side by one (the UNet), 0 pads
    only the bottom and the right by one (the VAE encoder).
    """

    def __init__(self, channels: int, *, padding: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        if padding not in (0, 1):
            raise ValueError(f"Downsample2D: padding {padding} is not supported (use 0 or 1)")
        self.conv = sharding.Conv2d(
            channels,
            channels,
            3,
            stride=2,
            padding=(padding, 1),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(row_blocks.RowBlocking, nnx.Module):
    """Nearest-neighbour upsampling, then a 3x3 `conv`: (B, H, W, C) -> (B, 2H, 2W, C), or to
    the `size` given (diffusers' `output_size`: a UNet upsamples an odd-sized feature map to
    the size of the skip connection it meets, 2H - 1 rows for H).

    `row_blocks_threshold`: inputs larger than this many bytes are upsampled and convolved
    by blocks of rows (`row_blocks`, exact); None (the default) never."""

    def __init__(
        self,
        channels: int,
        *,
        row_blocks_threshold: int | None = None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.conv = sharding.Conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)
        self.row_blocks_threshold = row_blocks_threshold
        self.row_block_bytes = row_blocks.BLOCK_BYTES

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        height, width = x.shape[1:3]
        if size is None or tuple(size) == (2 * height, 2 * width):
            if row_blocks.applies(x, self.row_blocks_threshold):
                return row_blocks.upsample_conv(self.conv, x, block_bytes=self.row_block_bytes)
            return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        rows = nearest_indices(height, size[0])
        columns = nearest_indices(width, size[1])
        return self.conv(x[:, rows][:, :, columns])


def nearest_indices(size: int, output_size: int) -> np.ndarray:
    """The source index of each output index of `torch.nn.functional.interpolate(...,
    mode="nearest")` from `size` to `output_size` elements: floor(i x size / output_size),
    with the scale and the product in float32, as PyTorch computes them."""
    scale = np.float32(size) / np.float32(output_size)
    product = np.arange(output_size, dtype=np.float32) * scale
    return np.minimum(np.floor(product).astype(np.int64), size - 1)

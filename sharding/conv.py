"""2-D convolution whose row padding comes from the neighbouring patches (halo rows)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.layers import parameter, uniform


def exchange_halo(x: jax.Array, above: int, below: int) -> jax.Array:
    """Pads `x` (B, H, W, C) with `above` halo rows on top and `below` rows underneath.

    On one device the halo is the image's zero padding.
    """
    if above == below == 0:
        return x
    return jnp.pad(x, ((0, 0), (above, below), (0, 0), (0, 0)))


class Conv2d(nnx.Module):
    """`torch.nn.Conv2d`, NHWC, zero-padded by `padding = (before, after)` rows and columns.

    The default `padding` is `kernel_size // 2` on every side (`torch.nn.Conv2d(padding=k//2)`);
    `(0, 1)` is diffusers' `Downsample2D(padding=0)`, which pads only the bottom and the right.
    The rows come from the neighbouring patches: `before` rows from the patch above, `after`
    rows from the patch below.

    Parameters: `kernel` (kh, kw, in, out), `bias` (out,).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: tuple[int, int] | None = None,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = (kernel_size // 2,) * 2 if padding is None else tuple(padding)
        self.dtype = dtype
        init = uniform((in_channels * kernel_size * kernel_size) ** -0.5)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = parameter(rngs, init, shape, dtype)
        self.bias = parameter(rngs, init, (out_channels,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, H', W', out), H' = (H + before + after - k) // stride + 1
        (H // stride for the default padding and even H)."""
        x = exchange_halo(x.astype(self.dtype), *self.padding)
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=((0, 0), self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)

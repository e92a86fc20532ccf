"""2-D convolution whose row padding comes from the neighbouring patches (halo rows)."""

import jax
import jax.numpy as jnp
from flax import nnx


def exchange_halo(x: jax.Array, rows: int) -> jax.Array:
    """Pads `x` (B, H, W, C) with `rows` halo rows above and below.

    On one device the halo is the image's zero padding.
    """
    if rows == 0:
        return x
    return jnp.pad(x, ((0, 0), (rows, rows), (0, 0), (0, 0)))


class Conv2d(nnx.Module):
    """`torch.nn.Conv2d` with `padding = kernel_size // 2`, NHWC.

    Parameters: `kernel` (kh, kw, in, out), `bias` (out,).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel_size = kernel_size
        self.stride = stride
        self.dtype = dtype
        fan_in = in_channels * kernel_size * kernel_size
        init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32).astype(dtype))
        bound = fan_in**-0.5
        bias = jax.random.uniform(rngs.params(), (out_channels,), jnp.float32, -bound, bound)
        self.bias = nnx.Param(bias.astype(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, H // stride, W // stride, out)."""
        pad = self.kernel_size // 2
        x = exchange_halo(x.astype(self.dtype), pad)
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=((0, 0), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)

"""GroupNorm whose statistics are moments averaged over all patches of the image."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.layers import ones, parameter, zeros


def combine_moments(moments: jax.Array) -> jax.Array:
    """Turns this patch's moments (2, B, G) into the image's. On one device: themselves."""
    return moments


class GroupNorm(nnx.Module):
    """`torch.nn.GroupNorm` (biased variance, affine), NHWC, statistics in float32.

    Parameters: `scale` (C,), `bias` (C,).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        epsilon: float,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels do not split into {num_groups} groups"
            )
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = parameter(rngs, ones, (num_channels,), dtype)
        self.bias = parameter(rngs, zeros, (num_channels,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        local = jnp.stack([grouped.mean(axis=(1, 2, 4)), jnp.square(grouped).mean(axis=(1, 2, 4))])
        mean, mean_of_squares = combine_moments(local)
        var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
        inv_std = jax.lax.rsqrt(var + self.epsilon)
        normed = (grouped - mean[:, None, None, :, None]) * inv_std[:, None, None, :, None]
        normed = normed.reshape(b, h, w, c)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)

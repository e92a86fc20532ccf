"""GroupNorm whose statistics are moments averaged over all patches of the image."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.layers import ones, parameter, zeros
from sharding.context import AXIS, PatchContext, read_and_refresh


def image_moments(
    local: jax.Array,
    stale: jax.Array | None,
    rule: str,
    index: jax.Array,
    gathered: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """(mean, variance), each (B, G), of the whole image from this patch's view.

    local: (2, B, G) this patch's E[x] and E[x^2] in this step.
    gathered: (P, 2, B, G) every patch's local moments of this step (all-gathered), or None
        in a local step (which then stands in the stale ones for the "sync" rule).
    stale: (P, 2, B, G) every patch's moments of the previous step, or None in a
        synchronous step (exact: the mean of `gathered`).
    rule, for displaced steps:
      corrected: mean_j(stale_j) + (local - stale_i) for both moments; where the variance
        this gives is negative, the local variance instead (the mean stays corrected).
      stale: (local + sum_{j != i} stale_j) / P.
      separate: local moments only.
      sync: exact, as a synchronous step (`gathered` is then used in the same step).
    """
    if stale is None or rule == "sync":
        moments = (stale if gathered is None else gathered).mean(axis=0)
    elif rule == "corrected":
        moments = stale.mean(axis=0) + local - stale[index]
    elif rule == "stale":
        moments = (stale.sum(axis=0) - stale[index] + local) / stale.shape[0]
    elif rule == "separate":
        moments = local
    else:
        raise ValueError(f"unknown GroupNorm rule {rule!r}")
    mean, var = moments[0], moments[1] - jnp.square(moments[0])
    if stale is not None and rule == "corrected":
        var = jnp.where(var < 0, local[1] - jnp.square(local[0]), var)
    return mean, jnp.maximum(var, 0.0)


class GroupNorm(nnx.Module):
    """`torch.nn.GroupNorm` (biased variance, affine), NHWC, statistics in float32.

    In the patch-parallel program the statistics are the whole image's (see
    `image_moments`). Parameters: `scale` (C,), `bias` (C,). Stale buffer (displaced steps):
    `moments` (P, 2, B, G), every patch's E[x] and E[x^2] of the previous step.
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
        self.patch: PatchContext | None = None
        self.scale = parameter(rngs, ones, (num_channels,), dtype)
        self.bias = parameter(rngs, zeros, (num_channels,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        local = jnp.stack([grouped.mean(axis=(1, 2, 4)), jnp.square(grouped).mean(axis=(1, 2, 4))])
        mean, var = self.moments_of_image(local)
        inv_std = jax.lax.rsqrt(var + self.epsilon)
        normed = (grouped - mean[:, None, None, :, None]) * inv_std[:, None, None, :, None]
        normed = normed.reshape(b, h, w, c)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)

    def moments_of_image(self, local: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This patch's moments (2, B, G) -> the (mean, variance) it normalizes with."""
        context = self.patch
        if context is None or context.exchange == "none":
            return local[0], jnp.maximum(local[1] - jnp.square(local[0]), 0.0)
        gathered = jax.lax.all_gather(local, AXIS) if context.exchanges else None
        stale = read_and_refresh(self, "moments", gathered, context)
        return image_moments(local, stale, context.group_norm, context.index(), gathered)

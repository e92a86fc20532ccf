"""GroupNorm whose statistics are moments averaged over all patches of the image."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtools.parameters import ones, parameter, zeros
from sharding.codecs import EXACT
from sharding.context import GroupNormRule, PatchPrimitive, Received
from sharding.split import Split


def image_moments(
    local: jax.Array,
    received: Received | None,
    rule: GroupNormRule,
    index: jax.Array,
    shares: tuple[float, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mean, variance), each (B, G), of the whole image from this patch's view.

    local: (2, B, G) this patch's mean and variance (about its own mean) in this step.
    received: every patch's local moments (P, 2, B, G), of this step (synchronous: the
        image's exact moments) or of the previous step (stale); None: this patch alone.
    rule, for stale moments (patch i, local l, stale s_j, n_j the real elements of patch j
    and N of the image; n_j / N = 1 / P where the patches are equal):
      corrected: sum_j (n_j / N) s_j + (l - s_i) for both raw moments E[x] and E[x^2];
        where the variance this gives is negative, the local variance instead (the mean
        stays corrected).
      stale: (n_i l + sum_{j != i} n_j s_j) / N.
      separate: the local moments only.
      ("sync" never reads stale moments: that GroupNorm exchanges this step's.)
    shares: (n_j / N) per patch; None: 1 / P each.

    Each rule is a weighted sum of patches' raw moments whose weights w sum to 1, computed
    about the combined mean M so that nothing large cancels:
    E[x] = sum w m = M, Var = sum w (v + (m - M)^2) (exact for the sync rule: the variance
    of the union of the patches, as one device computes it).
    """
    if received is None or (received.stale and rule == "separate"):
        return local[0], local[1]
    moments = received.value
    patches = moments.shape[0]
    share = jnp.full((patches,), 1 / patches) if shares is None else jnp.asarray(shares)
    if not received.stale:
        weights = share
    elif rule in ("corrected", "stale"):
        moments = jnp.concatenate([moments, local[None], moments[index][None]])
        own = jnp.float32(1.0) if rule == "corrected" else share[index]
        weights = jnp.concatenate([share, jnp.stack([own, -own])])
    else:
        raise ValueError(f"GroupNorm rule {rule!r} has no combination of stale moments")
    weights = weights[:, None, None]
    mean = (weights * moments[:, 0]).sum(axis=0)
    var = (weights * (moments[:, 1] + jnp.square(moments[:, 0] - mean))).sum(axis=0)
    if received.stale and rule == "corrected":
        var = jnp.where(var < 0, local[1], var)
    return mean, jnp.maximum(var, 0.0)


class GroupNorm(PatchPrimitive):
    """`torch.nn.GroupNorm` (biased variance, affine), NHWC, statistics in float32.

    The statistics are computed in two passes (the mean, then the mean squared deviation
    from it), so a large mean does not cancel the variance away. In the patch-parallel
    program they are the whole image's (see `image_moments`). Parameters: `scale` (C,),
    `bias` (C,). Stale buffer (displaced steps): `moments` (2, B, G), this patch's mean and
    variance of the previous step (every patch's are gathered in the next).
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
        """(B, H, W, C) -> (B, H, W, C). Where padding rows follow this patch's real ones
        (`PatchContext.uneven`), the statistics are the real rows' only."""
        b, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        split = None if self.patch is None else self.patch.uneven(h)
        if split is None:
            mean = grouped.mean(axis=(1, 2, 4))
            deviation = grouped - mean[:, None, None, :, None]
            local = jnp.stack([mean, jnp.square(deviation).mean(axis=(1, 2, 4))])
        else:
            real = jnp.arange(h)[None, :, None, None, None] < split.real_rows(self.patch.index())
            count = real.sum() * w * grouped.shape[-1]
            mean = jnp.where(real, grouped, 0.0).sum(axis=(1, 2, 4)) / count
            deviation = jnp.where(real, grouped - mean[:, None, None, :, None], 0.0)
            local = jnp.stack([mean, jnp.square(deviation).sum(axis=(1, 2, 4)) / count])
        mean, var = self.moments_of_image(local, split)
        inv_std = jax.lax.rsqrt(var + self.epsilon)
        normed = (grouped - mean[:, None, None, :, None]) * inv_std[:, None, None, :, None]
        normed = normed.reshape(b, h, w, c)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)

    def moments_of_image(
        self, local: jax.Array, split: Split | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """This patch's (mean, variance) (2, B, G) -> the (mean, variance) it normalizes
        with (`split`: the patches' rows where they are unequal). Under the "sync" rule
        every step exchanges this step's moments."""
        context = self.patch
        if context is None:
            return local[0], local[1]
        received = context.receive(
            self,
            "moments",
            local,
            lambda moments: context.gather(moments, axis=0),
            current=context.group_norm == "sync",
            codec_of=EXACT,
        )
        shares = None if split is None else split.shares
        return image_moments(local, received, context.group_norm, context.index(), shares)

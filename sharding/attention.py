"""Self-attention keys and values of the whole image, seen from one patch."""

import jax
import jax.numpy as jnp

from sharding.context import AXIS, PatchPrimitive


class KVExchange(PatchPrimitive):
    """Gives a patch's self-attention the keys and values of every patch.

    On one device, and in naive patches, the patch's own keys and values. In the
    patch-parallel program every patch's (all-gathered along tokens, patches in order): this
    step's in a synchronous step; in a displaced step the previous step's of the other
    patches with this patch's own fresh ones in their place, while this step's are gathered
    for the next. Stale buffer (displaced steps): `kv` (2, B, P * tokens, heads, head_dim).
    """

    def __call__(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
        """key, value: (B, tokens, heads, head_dim) of this patch -> (B, P * tokens, heads,
        head_dim) of the whole image."""
        own = jnp.stack([key, value])

        def gather() -> jax.Array:
            return jax.lax.all_gather(own, AXIS, axis=2, tiled=True)

        context = self.patch
        received = None if context is None else context.receive(self, "kv", gather)
        if received is None:
            return key, value
        kv = received.value
        if received.stale:
            start = context.index() * key.shape[1]
            kv = jax.lax.dynamic_update_slice_in_dim(kv, own, start, axis=2)
        return kv[0], kv[1]

"""Self-attention keys and values of the whole image, seen from one patch."""

import jax
from flax import nnx


class KVExchange(nnx.Module):
    """Gives a patch's self-attention the keys and values of every patch.

    On one device the patch is the image, so its own keys and values are returned.
    """

    def __call__(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
        """key, value: (B, tokens, heads, head_dim) of this patch -> of the whole image."""
        return key, value

"""Self-attention keys and values of the whole image, seen from one patch."""

import jax
import jax.numpy as jnp

from sharding.context import PatchPrimitive


class KVExchange(PatchPrimitive):
    """Gives a patch's self-attention the keys and values of every patch.

    On one device, and in naive patches, the patch's own keys and values. In the
    patch-parallel program every patch's (all-gathered, patches in order): this step's in a
    synchronous step; in a displaced step the other patches' of the previous step (the
    messages they kept, gathered in this step, compressed as `PatchContext.compress` says)
    with this patch's own fresh ones in their place. The message of a patch: (2, B, tokens,
    heads * head_dim), keys then values; stale buffer (displaced steps): `kv`, this patch's
    message of the previous step in the codec's form (`sharding.codecs`; residual codecs
    also keep every patch's (2, B, P, tokens, heads * head_dim) base).

    Joint attention (text tokens beside the image's, as in SD3 and Flux): the first
    `shared_tokens` are every patch's own (the text's: never exchanged), the rest the
    patch's image tokens.

    Patches of unequal real rows (`PatchContext.uneven_tokens`): a patch's padding tokens
    are sent as zeros, and the gathered keys and values are each patch's real tokens only,
    in order: exactly the whole image's, with no padded key to mask.
    """

    def __call__(
        self, key: jax.Array, value: jax.Array, shared_tokens: int = 0
    ) -> tuple[jax.Array, jax.Array]:
        """key, value: (B, shared_tokens + tokens, heads, head_dim) of this patch ->
        (B, shared_tokens + P * tokens, heads, head_dim): the shared tokens, then the whole
        image's (fewer than P * tokens where the patches' real rows are unequal)."""
        if shared_tokens:
            image_key, image_value = self(key[:, shared_tokens:], value[:, shared_tokens:])
            return (
                jnp.concatenate([key[:, :shared_tokens], image_key], axis=1),
                jnp.concatenate([value[:, :shared_tokens], image_value], axis=1),
            )
        b, tokens, heads, head_dim = key.shape
        own = jnp.stack([key, value]).reshape(2, b, tokens, heads * head_dim)

        context = self.patch
        if context is None:
            return key, value
        uneven = context.uneven_tokens(tokens)
        if uneven is not None:  # padding tokens: sent as zeros, never read
            split, width = uneven
            real = jnp.arange(tokens) < split.real_rows(context.index()) * width
            own = jnp.where(real[:, None], own, 0)

        def gather(messages):
            return jax.tree.map(lambda x: context.gather(x, axis=2), messages)

        index = context.index()
        received = context.receive(
            self,
            "kv",
            own,
            gather,
            own_in=lambda kv: jax.lax.dynamic_index_in_dim(kv, index, axis=2, keepdims=False),
            kv=True,
        )
        if received is None:
            return key, value
        kv = received.value
        if received.stale:
            kv = jax.lax.dynamic_update_index_in_dim(kv, own, index, axis=2)
        if uneven is not None:
            kv = jnp.concatenate(
                [kv[:, :, patch, : count * width] for patch, count in enumerate(split.counts)],
                axis=2,
            )
        kv = kv.reshape(2, b, -1, heads, head_dim)
        return kv[0], kv[1]

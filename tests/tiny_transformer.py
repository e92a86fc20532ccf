"""A tiny DiT-like transformer built from the patch-parallel primitives: a `Denoiser` that is
not a UNet, to show that `sharding.loops` runs any model of the primitives (test only).

    latents (B, h, w, C) --patch embedding (p x p conv, stride p)--> tokens (B, h/p * w/p, D)
      + 2-D sin-cos position of each token in the whole latent
      + Linear(sinusoidal(timestep)) + Linear(label)       (both (B, D), broadcast)
      -> blocks: x += out(attention(LN(x))); x += MLP(LN(x))
      -> LN -> Linear to p * p * C -> unpatchify -> (B, h, w, C)

With `text_dim`, joint attention as in SD3 and Flux: the blocks run on the text tokens
Linear(text) (B, T, D) followed by the image tokens; the text's keys and values stay on each
device (`KVExchange`'s `shared_tokens`), only the image's travel.

Tokens are row-major, so a row slab of the latent (h/P rows, a multiple of p) is a contiguous
run of tokens: what `KVExchange` gathers along tokens. The patch embedding needs no halo
(padding (0, 0), stride = kernel), so each slab embeds alone. Absolute positions are the one
thing a slab cannot know by itself: `SlabPosition` asks the patch context which slab it is.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.layers import LayerNorm, Linear
from jaxfusion.models.scaled_dot_product import attention
from sharding import Conv2d, KVExchange
from sharding.context import PatchPrimitive

EPSILON = 1e-6
MAX_PERIOD = 10000.0


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
    """Sin-cos features (..., dim) of `positions` (...): [cos(x f_j), sin(x f_j)] with
    f_j = MAX_PERIOD ** (-j / (dim / 2)), j = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class CachedLabel(nnx.Variable):
    """The label embedding (B, D) of the run's conditioning, stored by `cache_conditioning`."""


class SlabPosition(PatchPrimitive):
    """2-D sin-cos position embeddings of a slab's tokens in the whole token grid: the first
    half of the width encodes the token row, the second the column. The slab's first row and
    column are the patch context's `first_row` and `first_column` (0 on one device)."""

    def __init__(self, width: int):
        self.width = width

    def __call__(self, rows: int, cols: int) -> jax.Array:
        """(rows * cols, D), row-major, for a slab of `rows` x `cols` tokens."""
        first_row = 0 if self.patch is None else self.patch.first_row(rows)
        first_col = 0 if self.patch is None else self.patch.first_column(cols)
        row = sinusoidal(first_row + jnp.arange(rows), self.width // 2)
        col = sinusoidal(first_col + jnp.arange(cols), self.width // 2)
        grid = jnp.concatenate(
            [
                jnp.broadcast_to(row[:, None], (rows, cols, self.width // 2)),
                jnp.broadcast_to(col[None, :], (rows, cols, self.width // 2)),
            ],
            axis=-1,
        )
        return grid.reshape(rows * cols, self.width)


class Block(nnx.Module):
    """Pre-LN transformer block; the self-attention's keys/values go through `KVExchange`."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = LayerNorm(width, epsilon=EPSILON, rngs=rngs)
        self.to_q = Linear(width, width, rngs=rngs)
        self.to_k = Linear(width, width, rngs=rngs)
        self.to_v = Linear(width, width, rngs=rngs)
        self.kv = KVExchange()
        self.to_out = Linear(width, width, rngs=rngs)
        self.norm2 = LayerNorm(width, epsilon=EPSILON, rngs=rngs)
        self.fc1 = Linear(width, 4 * width, rngs=rngs)
        self.fc2 = Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array, text_tokens: int = 0) -> jax.Array:
        """(B, N, D) tokens (the first `text_tokens` the text's, the rest this slab's) ->
        (B, N, D)."""
        b, n, d = x.shape
        h = self.norm1(x)

        def heads(y):
            return y.reshape(b, n, self.heads, d // self.heads)

        q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        k, v = self.kv(k, v, text_tokens)  # (B, T + N_image, heads, head_dim): every patch's
        x = x + self.to_out(attention(q, k, v, backend="xla").reshape(b, n, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class TinyTransformer(nnx.Module):
    """The DiT-like denoiser (see the module docstring), conditioning {"label": (B, label_dim)}
    and, with `text_dim`, "text": (B, T, text_dim).

    Parameters: `patch_embed` (a `sharding.Conv2d`, kernel (p, p, C, D)), `time_proj`
    (D -> D on sinusoidal features), `label_proj` (label_dim -> D), `text_proj` (text_dim ->
    D, or None), `blocks`, `norm_out`, `proj_out` (D -> p * p * C).
    """

    def __init__(
        self,
        *,
        channels: int = 4,
        patch: int = 2,
        width: int = 32,
        heads: int = 2,
        depth: int = 2,
        label_dim: int = 8,
        text_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.channels, self.patch, self.width = channels, patch, width
        self.patch_embed = Conv2d(channels, width, patch, stride=patch, padding=(0, 0), rngs=rngs)
        self.position = SlabPosition(width)
        self.time_proj = Linear(width, width, rngs=rngs)
        self.label_proj = Linear(label_dim, width, rngs=rngs)
        self.text_proj = None if text_dim is None else Linear(text_dim, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(depth)])
        self.norm_out = LayerNorm(width, epsilon=EPSILON, rngs=rngs)
        self.proj_out = Linear(width, patch * patch * channels, rngs=rngs)

    def label_embedding(self, conditioning: dict) -> jax.Array:
        """(B, D): the cached one if `cache_conditioning` ran, else computed."""
        if hasattr(self, "cached_label"):
            return self.cached_label[...]
        return self.label_proj(conditioning["label"])

    @property
    def row_unit(self) -> int:
        """Slab boundaries at whole patches (`sharding.loops.Denoiser`)."""
        return self.patch

    def cache_conditioning(self, conditioning: dict) -> None:
        """Stores the label embedding (B, D) of `conditioning`; later `predict` calls use it
        (and ignore their conditioning's label), as the UNet's cached text keys/values."""
        self.cached_label = CachedLabel(self.label_proj(conditioning["label"]))

    def predict(self, latents: jax.Array, timestep: jax.Array, conditioning: dict) -> jax.Array:
        """latents (B, h, w, C), the whole latent or a slab (h, w multiples of p), at
        `timestep` () -> the prediction (B, h, w, C)."""
        b, _, _, c = latents.shape
        p, d = self.patch, self.width
        tokens = self.patch_embed(latents)  # (B, h/p, w/p, D)
        rows, cols = tokens.shape[1:3]
        x = tokens.reshape(b, rows * cols, d) + self.position(rows, cols)
        x = x + self.time_proj(sinusoidal(jnp.asarray(timestep), d))
        x = x + self.label_embedding(conditioning)[:, None]
        text_tokens = 0
        if self.text_proj is not None:
            text = self.text_proj(conditioning["text"])
            text_tokens = text.shape[1]
            x = jnp.concatenate([text, x], axis=1)
        for block in self.blocks:
            x = block(x, text_tokens)
        x = x[:, text_tokens:]
        out = self.proj_out(self.norm_out(x)).reshape(b, rows, cols, p, p, c)
        return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows * p, cols * p, c)

"""Transformer2DModel and its parts (diffusers' `attention.py`, `attention_processor.py`,
`transformers/transformer_2d.py`), NHWC, inference only."""

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from jaxfusion.models.layers import LayerNorm, Linear
from jaxfusion.models.scaled_dot_product import DotProductAttention


class TextKV(nnx.Variable):
    """A cross-attention's keys and values of the text tokens, (2, B, text_tokens, heads,
    head_dim): constant over a sampling run, so computed once before the loop
    (`cache_text_kv`) instead of at every step."""


class Attention(nnx.Module):
    """Multi-head attention with `to_q`, `to_k`, `to_v` (no bias) and `to_out.0`.

    Self-attention (no `cross_attention_dim`) takes its keys and values from every patch of
    the image through `sharding.KVExchange`; cross-attention reads the text tokens, or their
    keys and values from `text_kv` when `cache_text_kv` stored them.
    Softmax runs in float32 in every dtype, which also covers diffusers' `upcast_attention`.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        inner_dim = heads * dim_head
        self.heads = heads
        self.is_self_attention = cross_attention_dim is None
        context_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.to_q = Linear(query_dim, inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_k = Linear(context_dim, inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_v = Linear(context_dim, inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(inner_dim, query_dim, dtype=dtype, rngs=rngs)])
        self.processor = DotProductAttention()
        if self.is_self_attention:
            self.kv_exchange = sharding.KVExchange()

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (B, tokens, query_dim); context: (B, text_tokens, cross_attention_dim) or None."""
        b = x.shape[0]
        q = self.to_q(x).reshape(b, x.shape[1], self.heads, -1)
        if self.is_self_attention:
            k, v = self.kv_exchange(*self.keys_values(x))
        elif hasattr(self, "text_kv"):
            k, v = self.text_kv[...]
        else:
            k, v = self.keys_values(context)
        out = self.processor(q, k, v)
        return self.to_out[0](out.reshape(b, x.shape[1], -1))

    def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """context (B, T, D) -> keys, values, each (B, T, heads, head_dim)."""
        b, t = context.shape[:2]
        k = self.to_k(context).reshape(b, t, self.heads, -1)
        return k, self.to_v(context).reshape(b, t, self.heads, -1)


def cache_text_kv(model: nnx.Module, encoder_hidden_states: jax.Array) -> None:
    """Stores every cross-attention's keys and values of `encoder_hidden_states` (B, T, D) in
    its `text_kv`, so that calls with these text states skip the projections. For a sampling
    loop, whose text states do not change."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Attention) and not module.is_self_attention:
            module.text_kv = TextKV(jnp.stack(module.keys_values(encoder_hidden_states)))


class GEGLU(nnx.Module):
    """`proj` to twice the width, then value * GELU(gate) (exact GELU)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.proj = Linear(dim_in, dim_out * 2, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class GELU(nnx.Module):
    """`proj`, then GELU with the tanh approximation (diffusers' `GELU(approximate="tanh")`,
    the "gelu-approximate" of Flux's feed-forwards)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.proj = Linear(dim_in, dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


ACTIVATIONS = {"geglu": GEGLU, "gelu-approximate": GELU}


class FeedForward(nnx.Module):
    """`net` = [activation (`ACTIVATIONS`, diffusers' `activation_fn`), Dropout, Linear], as
    diffusers numbers them: (..., dim) -> (..., dim), through dim * mult."""

    def __init__(
        self,
        dim: int,
        *,
        mult: int = 4,
        activation_fn: str = "geglu",
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        inner_dim = dim * mult
        self.net = nnx.List(
            [
                ACTIVATIONS[activation_fn](dim, inner_dim, dtype=dtype, rngs=rngs),
                nnx.Dropout(0.0),
                Linear(inner_dim, dim, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU MLP."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        def layer_norm():
            return LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)

        self.norm1 = layer_norm()
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm()
        self.attn2 = Attention(
            dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm3 = layer_norm()
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        """x: (B, tokens, dim) -> (B, tokens, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6), `proj_in`, transformer blocks, `proj_out`, residual.

    `proj_in`/`proj_out` are 1x1 convolutions (SD 1.x) or linear layers
    (`use_linear_projection`, SD 2.x and SDXL); on NHWC both are the same matrix product, but
    each keeps diffusers' parameter shape.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.norm = sharding.GroupNorm(
            norm_num_groups, channels, epsilon=1e-6, dtype=dtype, rngs=rngs
        )
        if use_linear_projection:
            self.proj_in = Linear(channels, channels, dtype=dtype, rngs=rngs)
            self.proj_out = Linear(channels, channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = sharding.Conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
            self.proj_out = sharding.Conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    channels,
                    heads=heads,
                    dim_head=channels // heads,
                    cross_attention_dim=cross_attention_dim,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        """x: (B, H, W, C); encoder_hidden_states: (B, text_tokens, D) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states)
        return self.proj_out(tokens.reshape(b, h, w, c)) + x

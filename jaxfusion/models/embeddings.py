"""Sinusoidal timestep features and the MLP that embeds them (diffusers' `embeddings.py`)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.layers import Linear


def timestep_features(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal features of `timesteps` (N,) -> (N, dim) float32, as diffusers'
    `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    frequencies = jnp.exp(exponent / (half - downscale_freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2: (N, in_channels) -> (N, time_embed_dim)."""

    def __init__(
        self, in_channels: int, time_embed_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        self.linear_1 = Linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))

"""Dense layers (Linear, LayerNorm, RMSNorm, Embed). Their parameters come from
`nnxtools.parameters.parameter` (abstract with `rngs=None`)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtools.parameters import ones, parameter, uniform, zeros


def matmul_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
    """x @ kernel (+ bias) contracting the last axis, accumulated in float32 and rounded to
    `dtype` once."""
    y = jnp.matmul(x.astype(dtype), kernel, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


class Linear(nnx.Module):
    """`torch.nn.Linear`: `kernel` (in, out), `bias` (out,). (..., in) -> (..., out)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.dtype = dtype
        init = uniform(in_features**-0.5)
        self.kernel = parameter(rngs, init, (in_features, out_features), dtype)
        self.bias = parameter(rngs, init, (out_features,), dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return matmul_bias(x, self.kernel[...], bias, self.dtype)


def normalize(x: jax.Array, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) over the last axis, in float32 (biased variance, as
    `torch.nn.LayerNorm`; with `elementwise_affine=False` that is the whole layer)."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


class LayerNorm(nnx.Module):
    """`torch.nn.LayerNorm` over the last axis: `scale`, `bias` (dim,); statistics in float32."""

    def __init__(
        self, dim: int, *, epsilon: float, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = parameter(rngs, ones, (dim,), dtype)
        self.bias = parameter(rngs, zeros, (dim,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = normalize(x, self.epsilon)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


class RMSNorm(nnx.Module):
    """`torch.nn.RMSNorm` over the last axis: x / sqrt(mean(x^2) + epsilon) * `scale` (dim,),
    computed in float32, returned in `dtype`. (..., dim) -> (..., dim)."""

    def __init__(
        self, dim: int, *, epsilon: float, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = parameter(rngs, ones, (dim,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.square(x).mean(axis=-1, keepdims=True) + self.epsilon)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """`torch.nn.Embedding`: `embedding` (rows, dim). Integer ids (...) -> (..., dim)."""

    def __init__(
        self, rows: int, dim: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.embedding = parameter(rngs, jax.nn.initializers.normal(1.0), (rows, dim), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

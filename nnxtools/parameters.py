"""The parameter constructor every module uses (`sharding`'s primitives, `jaxfusion`'s models).

A module built with `rngs=None` is abstract: its parameters are `jax.ShapeDtypeStruct`s and
nothing is allocated or traced, so a full-size SDXL UNet is built in milliseconds (Flax's
`nnx.eval_shape` traces every initializer and takes minutes for it).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def parameter(
    rngs: nnx.Rngs | None, init: Initializer, shape: tuple[int, ...], dtype: jnp.dtype
) -> nnx.Param:
    """A parameter drawn from `init` (in float32, then cast), or its shape when `rngs` is None."""
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, dtype))
    return nnx.Param(init(rngs.params(), shape, jnp.float32).astype(dtype))


def uniform(bound: float) -> Initializer:
    """U(-bound, bound): PyTorch's default for Linear/Conv weights and biases, with
    bound = 1/sqrt(fan_in)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        # Drawn by numpy from the key's bits: jax.random would compile once per shape,
        # which made building a small random UNet take tens of seconds.
        generator = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        return jnp.asarray(generator.uniform(-bound, bound, shape), dtype)

    return init


def ones(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return jnp.ones(shape, dtype)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return jnp.zeros(shape, dtype)

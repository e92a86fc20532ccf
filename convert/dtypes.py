"""The floating-point types models run in, named as users write them."""

import jax.numpy as jnp

SUPPORTED = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def parse_dtype(dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or fp32/bf16/fp16, or the numpy/JAX type) -> dtype."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in SUPPORTED:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of float32, bfloat16, float16")
    return jnp.dtype(SUPPORTED[name])

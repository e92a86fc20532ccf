"""Training noise with more low-frequency content than white noise ("pyramid" or multi-
resolution noise): white noise plus, for i = 1, 2, ..., white noise drawn at 1 / 2**i of the
latent's size, upsampled (linear) and weighted discount**i, normalised to unit variance.

Why: at the first sampling step (t = 961 of 1000 with 25 leading steps) the latent keeps
sqrt(alpha_bar) = 8.5% of the image. White noise averaged over a shape's area shrinks with
that area, so at 256x256 (a shape covers 16 times the latent pixels it covers at 64x64) a
model trained on white noise reads the shapes' layout from the initial noise's chance blobs
rather than from the prompt: wrong colours and places. Noise whose blobs keep their
strength at coarse scales makes the prompt the only reliable source of layout at high noise,
at every size.
"""

import jax
import jax.numpy as jnp


def pyramid_noise(key: jax.Array, shape: tuple[int, int, int, int], discount: float) -> jax.Array:
    """(B, h, w, C) float32 NHWC noise of unit variance per sample; `discount` 0 gives
    `jax.random.normal(key, shape)` itself."""
    if discount == 0:
        return jax.random.normal(key, shape)
    batch, height, width, channels = shape
    noise_key, *level_keys = jax.random.split(key, 1 + max(height, width).bit_length())
    noise = jax.random.normal(noise_key, shape)
    for level, level_key in enumerate(level_keys, start=1):
        coarse = (batch, max(1, height >> level), max(1, width >> level), channels)
        upsampled = jax.image.resize(jax.random.normal(level_key, coarse), shape, "linear")
        noise = noise + discount**level * upsampled
        if coarse[1:3] == (1, 1):
            break
    return noise / jnp.std(noise, axis=(1, 2, 3), keepdims=True)

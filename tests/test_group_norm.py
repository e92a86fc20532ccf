"""GroupNorm's statistics stay exact for inputs with a large mean, on one device and on row
patches (every patch's moments combined), against float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sharding import GroupNorm, ParallelConfig
from sharding.rows import map_rows

GROUPS, EPSILON = 4, 1e-6


def group_norm_float64(x: np.ndarray) -> np.ndarray:
    """torch.nn.GroupNorm (scale 1, bias 0) of NHWC `x`, in float64."""
    b, h, w, c = x.shape
    grouped = x.astype(np.float64).reshape(b, h, w, GROUPS, c // GROUPS)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = np.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
    return ((grouped - mean) / np.sqrt(var + EPSILON)).reshape(x.shape)


def used_variance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The variance a GroupNorm without affine normalized with, (B, G): y = (x - m) / s
    per group, so 1 / s is the least-squares slope of y against x."""
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h * w, GROUPS, c // GROUPS).transpose(0, 2, 1, 3)
    yg = y.astype(np.float64).reshape(b, h * w, GROUPS, c // GROUPS).transpose(0, 2, 1, 3)
    xg, yg = xg.reshape(b, GROUPS, -1), yg.reshape(b, GROUPS, -1)
    xc = xg - xg.mean(-1, keepdims=True)
    slope = (xc * (yg - yg.mean(-1, keepdims=True))).sum(-1) / (xc**2).sum(-1)
    return 1 / slope**2 - EPSILON


def true_variance(x: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    grouped = x.astype(np.float64).reshape(b, h, w, GROUPS, c // GROUPS)
    return grouped.var(axis=(1, 2, 4))


@pytest.mark.parametrize("devices", [1, 4])
def test_large_mean_matches_float64(devices):
    """|mean| / std = 1000: E[x^2] - E[x]^2 in float32 loses the variance (12% off); the
    two-pass moments, combined about the image's mean, keep it to float32 rounding."""
    rng = np.random.default_rng(0)
    x = (1000.0 + rng.standard_normal((2, 16, 8, 16))).astype(np.float32)
    norm = GroupNorm(GROUPS, 16, epsilon=EPSILON, rngs=nnx.Rngs(0))
    parallel = ParallelConfig(devices, mode="single" if devices == 1 else "sync")
    y = np.asarray(map_rows(norm, lambda model, x: model(x), jnp.asarray(x), parallel))

    var_error = np.abs(used_variance(x, y) / true_variance(x) - 1).max()
    assert var_error < 1e-3, var_error
    expected = group_norm_float64(x)
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 1e-3

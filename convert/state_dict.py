"""The mechanical rename between a Flax NNX module's parameters and a diffusers state dict.

A parameter at path (`down_blocks`, 0, `resnets`, 1, `conv1`, `kernel`) is the diffusers
tensor `down_blocks.0.resnets.1.conv1.weight`. Layouts differ only by a transpose:
convolution kernels are (kh, kw, in, out) here and (out, in, kh, kw) in PyTorch, linear
kernels (in, out) here and (out, in) there; everything else (norm scales, biases, embedding
tables) has the same layout on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from convert.files import RenamedReader, TensorReader

_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


class WeightMismatch(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def diffusers_key(path: tuple) -> str:
    """Flax parameter path -> diffusers state-dict key."""
    *modules, name = path
    return ".".join([*map(str, modules), _TORCH_NAMES[name]])


def to_flax_layout(name: str, tensor: np.ndarray) -> np.ndarray:
    """diffusers tensor -> the layout of the Flax parameter called `name`."""
    return tensor.transpose(_TO_FLAX_AXES[tensor.ndim]) if name == "kernel" else tensor


def to_diffusers_layout(name: str, array: np.ndarray) -> np.ndarray:
    """Flax parameter called `name` -> diffusers tensor layout."""
    return array.transpose(_TO_TORCH_AXES[array.ndim]) if name == "kernel" else array


def _flat_params(module: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def load_state_dict(
    abstract_module: nnx.Module, reader: TensorReader | RenamedReader, dtype
) -> nnx.Module:
    """Fills an abstract module (built with `rngs=None`) with the reader's tensors in `dtype`.

    Every missing, unexpected or mis-shaped key is named in one `WeightMismatch`, raised
    before any tensor is read. Tensors are converted one at a time, so host memory peaks at
    the parameters plus one tensor.
    """
    graphdef, params, rest = nnx.split(abstract_module, nnx.Param, ...)
    targets = {diffusers_key(path): (path, var) for path, var in nnx.to_flat_state(params)}
    available = set(reader.keys())
    missing = sorted(targets.keys() - available)
    unexpected = sorted(available - targets.keys())
    misshaped = []
    for key in sorted(targets.keys() & available):
        path, var = targets[key]
        expected = to_diffusers_shape(path[-1], var.get_value().shape)
        if reader.shape(key) != expected:
            misshaped.append(f"{key}: checkpoint {reader.shape(key)}, model {expected}")
    _raise_mismatch(missing, unexpected, misshaped)

    flat = []
    for key, (path, var) in targets.items():
        array = to_flax_layout(path[-1], reader.read(key)).astype(_numpy_dtype(dtype))
        flat.append((path, var.replace(jnp.asarray(array))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def state_dict(module: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """The module's parameters as a diffusers state dict of numpy arrays (contiguous)."""
    out = {}
    for path, var in _flat_params(module):
        array = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            array = array.astype(_numpy_dtype(dtype))
        out[diffusers_key(path)] = np.ascontiguousarray(to_diffusers_layout(path[-1], array))
    return out


def to_diffusers_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if name != "kernel":
        return tuple(shape)
    return tuple(shape[axis] for axis in _TO_TORCH_AXES[len(shape)])


def _numpy_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _raise_mismatch(missing: Iterable[str], unexpected: Iterable[str], misshaped: Iterable[str]):
    sections = [
        (title, list(keys))
        for title, keys in (
            ("missing from the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape differs", misshaped),
        )
    ]
    if any(keys for _, keys in sections):
        lines = [
            f"{title} ({len(keys)}):\n    " + "\n    ".join(keys)
            for title, keys in sections
            if keys
        ]
        raise WeightMismatch(
            "checkpoint does not match the model built from its config.json:\n  "
            + "\n  ".join(lines)
        )

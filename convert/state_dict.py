"""The mechanical rename between a Flax NNX module's parameters and a diffusers state dict.

A parameter at path (`down_blocks`, 0, `resnets`, 1, `conv1`, `kernel`) is the diffusers
tensor `down_blocks.0.resnets.1.conv1.weight`. Layouts differ only by a transpose:
convolution kernels are (kh, kw, in, out) here and (out, in, kh, kw) in PyTorch, linear
kernels (in, out) here and (out, in) there; norm scales and biases are the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from convert.files import TensorReader

_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


class WeightMismatch(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def diffusers_key(path: tuple) -> str:
    """Flax parameter path -> diffusers state-dict key."""
    *modules, name = path
    return ".".join([*map(str, modules), _TORCH_NAMES[name]])


def to_flax_layout(tensor: np.ndarray) -> np.ndarray:
    axes = _TO_FLAX_AXES.get(tensor.ndim)
    return tensor if axes is None else tensor.transpose(axes)


def to_diffusers_layout(array: np.ndarray) -> np.ndarray:
    axes = _TO_TORCH_AXES.get(array.ndim)
    return array if axes is None else array.transpose(axes)


def _flat_params(module: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def load_state_dict(abstract_module: nnx.Module, reader: TensorReader, dtype) -> nnx.Module:
    """Fills an abstract module (from `nnx.eval_shape`) with the reader's tensors in `dtype`.

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
        expected = to_diffusers_shape(targets[key][1].get_value().shape)
        if reader.shape(key) != expected:
            misshaped.append(f"{key}: checkpoint {reader.shape(key)}, model {expected}")
    _raise_mismatch(missing, unexpected, misshaped)

    flat = []
    for key, (path, var) in targets.items():
        array = to_flax_layout(reader.read(key)).astype(_numpy_dtype(dtype))
        flat.append((path, var.replace(jnp.asarray(array))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def state_dict(module: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """The module's parameters as a diffusers state dict of numpy arrays (contiguous)."""
    out = {}
    for path, var in _flat_params(module):
        array = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            array = array.astype(_numpy_dtype(dtype))
        out[diffusers_key(path)] = np.ascontiguousarray(to_diffusers_layout(array))
    return out


def to_diffusers_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = _TO_TORCH_AXES.get(len(shape))
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


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

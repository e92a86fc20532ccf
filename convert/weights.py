"""A component folder's weights, in whichever format it holds them, into an abstract module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flax import nnx

from convert.files import RenamedReader, TensorReader, weight_files
from convert.flax_checkpoint import has_flax_params, load_flax_params
from convert.state_dict import load_state_dict

Module = TypeVar("Module", bound=nnx.Module)


def load_weights(
    shapes: Module,
    folder: Path,
    dtype,
    *,
    weights_name: str,
    variant: str | None = None,
    allow_pickle: bool = False,
    abstract: bool = False,
    key_map: Callable[[TensorReader], TensorReader | RenamedReader] = lambda reader: reader,
) -> Module:
    """`shapes` (a module built with `rngs=None`) filled with the weights of `folder` in
    `dtype`: its orbax Flax checkpoint (`flax_params/`) if it has one, else its
    `{weights_name}[.{variant}].safetensors` files (pickle files only with `allow_pickle`),
    their keys seen through the format's `key_map`. With `abstract`, `shapes` itself once the
    weight files are found, nothing read."""
    if has_flax_params(folder):
        return shapes if abstract else load_flax_params(shapes, folder, dtype)
    files = weight_files(folder, weights_name, variant=variant, allow_pickle=allow_pickle)
    if abstract:
        return shapes
    with TensorReader(files) as reader:
        return load_state_dict(shapes, key_map(reader), dtype)

"""One model component's parameters as an orbax checkpoint (the "Flax checkpoint" format).

A component folder in this format holds the `config.json` diffusers/transformers use and
`flax_params/`, an orbax PyTree checkpoint of `nnx.state(module, nnx.Param)` as a nested
dict: the parameter at path (`down_blocks`, 0, `resnets`, 1, `conv1`, `kernel`) is stored
under `down_blocks.0.resnets.1.conv1.kernel` in the Flax layout (convolution kernels
(kh, kw, in, out), linear kernels (in, out)) and the module's dtype. orbax is imported only
when a checkpoint is written or read. orbax takes absolute paths only: the folders given here
may be relative to the working directory, as a user types them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.dtypes import parse_dtype
from convert.state_dict import _raise_mismatch

PARAMS_DIR = "flax_params"


def save_flax_params(module: nnx.Module, folder: Path, dtype=None) -> Path:
    """Writes the module's parameters (floating-point ones in `dtype`, default their own) to
    `folder/flax_params/`, replacing any there, and returns that directory. The checkpoint
    is written beside it and renamed into place, so no half-written directory is ever left
    at that name."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / PARAMS_DIR
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    if dtype is not None:
        dtype = parse_dtype(dtype)
        params = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{PARAMS_DIR}.", suffix=".tmp"))
    try:
        written, previous = staging / PARAMS_DIR, staging / "previous"
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save(written, params)
        if target.exists():
            target.rename(previous)
        try:
            written.rename(target)
        except BaseException:
            if previous.exists():
                previous.rename(target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def has_flax_params(folder: Path) -> bool:
    """Whether `folder` holds a Flax checkpoint written by `save_flax_params`."""
    return (Path(folder) / PARAMS_DIR / "_METADATA").is_file()


def load_flax_params(abstract: nnx.Module, folder: Path, dtype) -> nnx.Module:
    """Fills an abstract module (built with `rngs=None`) with the parameters in
    `folder/flax_params/`, restored on the host; floating-point ones are cast to `dtype`
    (float32, bfloat16 or float16).

    Every missing, unexpected or mis-shaped parameter is named in one `WeightMismatch`,
    raised from the checkpoint's metadata before any array is read.
    """
    import orbax.checkpoint as ocp

    dtype = parse_dtype(dtype)
    directory = Path(folder).absolute() / PARAMS_DIR
    if not has_flax_params(folder):
        raise FileNotFoundError(f"no Flax checkpoint in {folder}: {directory} is missing")
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    targets = {_dotted(path): (path, var) for path, var in nnx.to_flat_state(params)}
    with ocp.PyTreeCheckpointer() as checkpointer:
        stored_tree = _stored_tree(checkpointer, directory)
        stored = _flatten(stored_tree)
        missing = sorted(targets.keys() - stored.keys())
        unexpected = sorted(stored.keys() - targets.keys())
        misshaped = [
            f"{key}: checkpoint {tuple(stored[key].shape)}, model {var.get_value().shape}"
            for key, (_, var) in sorted(targets.items())
            if key in stored and tuple(stored[key].shape) != var.get_value().shape
        ]
        _raise_mismatch(missing, unexpected, misshaped)

        def restore_args(meta) -> ocp.RestoreArgs:
            floating = jnp.issubdtype(meta.dtype, jnp.floating)
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype if floating else None)

        restored = checkpointer.restore(
            directory,
            args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(restore_args, stored_tree)),
        )
    arrays = _flatten(restored)
    flat = [(path, var.replace(jnp.asarray(arrays[key]))) for key, (path, var) in targets.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _stored_tree(checkpointer, directory: Path):
    """The checkpoint's tree of array metadata; an unreadable checkpoint is refused with its
    path and what to do, not with orbax's own exception."""
    try:
        metadata = checkpointer.metadata(directory)
    except (ValueError, OSError, KeyError) as error:
        metadata, reason = None, f"{type(error).__name__}: {error}"
    else:
        reason = "orbax found no tree in it"
    item = None if metadata is None else getattr(metadata, "item_metadata", None)
    tree = None if item is None else getattr(item, "tree", None)
    if tree is None:
        raise ValueError(
            f"{directory} is not a readable orbax checkpoint ({reason}); re-convert the "
            "folder with `jaxfusion convert`"
        )
    return tree


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _flatten(tree) -> dict:
    """A nested dict -> {"a.0.b": leaf}; orbax stores integer keys as strings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_dotted(tuple(entry.key for entry in path)): leaf for path, leaf in leaves}

"""Loading a diffusers AutoencoderKL folder into the Flax VAE, and writing one back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxfusion.convert.files import (
    WEIGHTS_NAME,
    TensorReader,
    read_json,
    resolve_component,
    weight_files,
    write_model_folder,
)
from jaxfusion.convert.flax_checkpoint import has_flax_params, load_flax_params, write_flax_folder
from jaxfusion.convert.state_dict import load_state_dict, state_dict
from jaxfusion.dtypes import parse_dtype
from jaxfusion.models import AutoencoderKL, VAEConfig

# Checkpoints saved before diffusers 0.14 name the mid-block attention's layers as the old
# `AttentionBlock` did; diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class _CurrentNames:
    """A TensorReader whose keys are seen under their current diffusers names."""

    def __init__(self, reader: TensorReader):
        self._reader = reader
        self._stored = {_current_name(key): key for key in reader.keys()}  # noqa: SIM118 (not a dict)

    def keys(self) -> Iterator[str]:
        yield from self._stored

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(self._stored[key])

    def read(self, key: str) -> np.ndarray:
        return self._reader.read(self._stored[key])


def _current_name(key: str) -> str:
    match = _LEGACY_ATTENTION.fullmatch(key)
    if match is None:
        return key
    path, layer, param = match.groups()
    return f"{path}.{_LEGACY_NAMES[layer]}.{param}"


def load_vae_config(path: str | Path) -> VAEConfig:
    """The VAEConfig of a VAE folder or pipeline folder (its `vae/`)."""
    folder = resolve_component(path, "vae", {"AutoencoderKL"})
    return VAEConfig.from_diffusers(read_json(folder / "config.json"))


def load_vae(
    path: str | Path,
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    abstract: bool = False,
) -> AutoencoderKL:
    """A ready VAE from a diffusers folder (`config.json` + safetensors weights).

    Args:
      path: the VAE folder, a diffusers pipeline folder (its `vae/` is used), or a hub id.
      dtype: the pipeline's dtype, float32, bfloat16 or float16. The VAE is stored and run
        in `config.compute_dtype(dtype)`: float32 for float16 when the config sets
        `force_upcast` (SDXL's VAE overflows in float16; diffusers' pipelines upcast it
        the same way), else `dtype` itself. `vae.dtype` tells which.
      variant: weight-file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
      allow_pickle: also read `.bin`/`.ckpt` pickle files, which run code when loaded.
      abstract: return the model with `jax.ShapeDtypeStruct` parameters once the config and
        the weight files are found, without reading the weights (to check a request cheaply).
    """
    folder = resolve_component(path, "vae", {"AutoencoderKL"}, variant=variant)
    config = VAEConfig.from_diffusers(read_json(folder / "config.json"))
    dtype = config.compute_dtype(parse_dtype(dtype))
    shapes = AutoencoderKL.abstract(config, dtype=dtype)
    if has_flax_params(folder):
        return shapes if abstract else load_flax_params(shapes, folder, dtype)
    files = weight_files(folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    if abstract:
        return shapes
    with TensorReader(files) as reader:
        return load_state_dict(shapes, _CurrentNames(reader), dtype)


def save_vae(vae: AutoencoderKL, path: str | Path, *, dtype=None, flax: bool = False) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` (in `dtype`, default
    the parameters' own) into `path`, a folder that diffusers' `AutoencoderKL.from_pretrained`
    loads; with `flax`, `flax_params/` (an orbax checkpoint) instead of the safetensors file.
    Each file is written to a temporary name and renamed into place."""
    if flax:
        return write_flax_folder(vae, path, vae.config.to_diffusers(), dtype)
    tensors = state_dict(vae, None if dtype is None else parse_dtype(dtype))
    return write_model_folder(path, vae.config.to_diffusers(), tensors, WEIGHTS_NAME)

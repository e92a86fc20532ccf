"""Loading a diffusers UNet2DConditionModel folder into the Flax UNet, and writing one back."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

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
from jaxfusion.models import UNet2DConditionModel, UNetConfig


def load_unet_config(path: str | Path) -> UNetConfig:
    """The UNetConfig of a UNet folder or pipeline folder (its `unet/`)."""
    folder = resolve_component(path, "unet", {"UNet2DConditionModel"})
    return UNetConfig.from_diffusers(read_json(folder / "config.json"))


def load_unet(
    path: str | Path,
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    abstract: bool = False,
) -> UNet2DConditionModel:
    """A ready UNet from a diffusers folder (`config.json` + safetensors weights).

    Args:
      path: the UNet folder, a diffusers pipeline folder (its `unet/` is used), or a hub id.
      dtype: float32, bfloat16 or float16; parameters are stored and run in it.
      variant: weight-file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
      allow_pickle: also read `.bin`/`.ckpt` pickle files, which run code when loaded.
      abstract: return the model with `jax.ShapeDtypeStruct` parameters once the config and
        the weight files are found, without reading the weights (to check a request cheaply).
    """
    dtype = parse_dtype(dtype)
    folder = resolve_component(path, "unet", {"UNet2DConditionModel"}, variant=variant)
    config = UNetConfig.from_diffusers(read_json(folder / "config.json"))
    shapes = UNet2DConditionModel.abstract(config, dtype=dtype)
    if has_flax_params(folder):
        return shapes if abstract else load_flax_params(shapes, folder, dtype)
    files = weight_files(folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    if abstract:
        return shapes
    with TensorReader(files) as reader:
        return load_state_dict(shapes, reader, dtype)


def save_unet(
    unet: UNet2DConditionModel, path: str | Path, *, dtype=None, flax: bool = False
) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` into `path`, a folder
    that diffusers' `UNet2DConditionModel.from_pretrained` loads; with `flax`, `flax_params/`
    (an orbax checkpoint) instead of the safetensors file. Each file is written to a
    temporary name and renamed, so no half-written file is left behind."""
    if flax:
        return write_flax_folder(unet, path, unet.config.to_diffusers(), dtype)
    tensors = state_dict(unet, None if dtype is None else parse_dtype(dtype))
    return write_model_folder(path, unet.config.to_diffusers(), tensors, WEIGHTS_NAME)

"""Loading a transformers CLIP text encoder folder (a pipeline's `text_encoder/` or
`text_encoder_2/`) into the Flax model, and writing one back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxfusion.convert.files import (
    TensorReader,
    read_json,
    resolve_component,
    weight_files,
    write_model_folder,
)
from jaxfusion.convert.flax_checkpoint import has_flax_params, load_flax_params, write_flax_folder
from jaxfusion.convert.state_dict import load_state_dict, state_dict
from jaxfusion.dtypes import parse_dtype
from jaxfusion.models.clip import (
    MODEL_TYPE,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

WEIGHTS_NAME = "model"
PREFIX = "text_model."
# Buffers transformers saved beside the parameters in older checkpoints.
BUFFERS = ("position_ids",)
_CLASSES = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}


def load_text_encoder(
    path: str | Path,
    subfolder: str = "text_encoder",
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    abstract: bool = False,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A ready CLIP text encoder from a transformers folder (`config.json` + safetensors).

    The class (CLIPTextModel, or CLIPTextModelWithProjection for SDXL's second encoder) is
    the one the config's `architectures` names.

    Args:
      path: the text encoder's folder, a diffusers pipeline folder (its `subfolder` is used),
        or a pipeline's hub id.
      subfolder: "text_encoder" or "text_encoder_2", for pipeline folders.
      dtype: float32, bfloat16 or float16; parameters are stored and run in it.
      variant: weight-file variant, e.g. "fp16" for `model.fp16.safetensors`.
      allow_pickle: also read `.bin` pickle files, which run code when loaded.
      abstract: return the model with `jax.ShapeDtypeStruct` parameters once the config and
        the weight files are found, without reading the weights (to check a request cheaply).
    """
    dtype = parse_dtype(dtype)
    folder = _text_encoder_folder(path, subfolder, variant)
    raw = read_json(folder / "config.json")
    model_class = _model_class(raw, folder)
    config = CLIPTextConfig.from_transformers(raw)
    shapes = model_class.abstract(config, dtype=dtype)
    if has_flax_params(folder):
        return shapes if abstract else load_flax_params(shapes, folder, dtype)
    files = weight_files(folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    if abstract:
        return shapes
    with TensorReader(files) as reader:
        prefixed = any(key.startswith(PREFIX) for key in list(reader.keys()))
        source = reader if prefixed else _Prefixed(reader)
        return load_state_dict(shapes, source, dtype, ignore=BUFFERS)


def save_text_encoder(
    model: CLIPTextModel | CLIPTextModelWithProjection,
    path: str | Path,
    *,
    dtype=None,
    flax: bool = False,
) -> Path:
    """Writes `config.json` and `model.safetensors` into `path`, a folder that transformers'
    `from_pretrained` loads (keys under `text_model.`, as on the hub, which every
    transformers version reads); with `flax`, `flax_params/` (an orbax checkpoint) instead
    of the safetensors file. Each file is written to a temporary name and renamed."""
    config = {"architectures": [type(model).__name__], **model.config.to_transformers()}
    if flax:
        return write_flax_folder(model, path, config, dtype)
    tensors = state_dict(model, None if dtype is None else parse_dtype(dtype))
    return write_model_folder(path, config, tensors, WEIGHTS_NAME, metadata={"format": "pt"})


def _text_encoder_folder(path: str | Path, subfolder: str, variant: str | None) -> Path:
    """`path` itself when its config.json is a CLIP text model's, else its `subfolder`."""
    config = Path(path) / "config.json"
    if config.is_file() and read_json(config).get("model_type") == MODEL_TYPE:
        return Path(path)
    return resolve_component(path, subfolder, set(_CLASSES), variant=variant)


def _model_class(config: dict[str, Any], folder: Path) -> type[CLIPTextModel]:
    names = config.get("architectures") or [config.get("_class_name")]
    if len(names) != 1 or names[0] not in _CLASSES:
        raise ValueError(
            f"{folder / 'config.json'}: architectures {names!r} is not supported "
            f"(use one of {sorted(_CLASSES)})"
        )
    return _CLASSES[names[0]]


class _Prefixed:
    """A TensorReader seen with `text_model.` before every key: transformers >= 5 writes a
    CLIPTextModel's keys without it."""

    def __init__(self, reader: TensorReader):
        self._reader = reader

    def keys(self) -> Iterator[str]:
        return map(PREFIX.__add__, self._reader.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(key.removeprefix(PREFIX))

    def read(self, key: str):
        return self._reader.read(key.removeprefix(PREFIX))

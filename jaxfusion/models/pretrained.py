"""The models from pretrained folders (a diffusers or transformers `config.json` beside the
weights) and back: the config picks and builds the model, `convert` fills it with the
folder's weights (`convert.weights.load_weights`) and gives them back as a state dict."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

import convert.text_encoder
import convert.vae
from convert.dtypes import parse_dtype
from convert.files import WEIGHTS_NAME, RenamedReader, TensorReader, read_json, resolve_component
from convert.flax_checkpoint import save_flax_params
from convert.state_dict import state_dict
from convert.weights import load_weights
from jaxfusion.files import write_atomically, write_text_atomically
from jaxfusion.models.clip import MODEL_TYPE as CLIP_MODEL_TYPE
from jaxfusion.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxfusion.models.t5 import MODEL_TYPE as T5_MODEL_TYPE
from jaxfusion.models.t5 import T5Config, T5EncoderModel
from jaxfusion.models.transformer_flux import FluxConfig, FluxTransformer2DModel
from jaxfusion.models.unet_2d_condition import UNet2DConditionModel, UNetConfig
from jaxfusion.models.vae import AutoencoderKL, VAEConfig

_TEXT_CLASSES = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}
_T5_CLASSES = {T5EncoderModel.__name__: T5EncoderModel}


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
    return _load_diffusers_model(
        UNet2DConditionModel,
        UNetConfig,
        path,
        "unet",
        dtype=dtype,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
    )


def save_unet(
    unet: UNet2DConditionModel, path: str | Path, *, dtype=None, flax: bool = False
) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` into `path`, a folder
    that diffusers' `UNet2DConditionModel.from_pretrained` loads; with `flax`, `flax_params/`
    (an orbax checkpoint) instead of the safetensors file. Each file is written to a
    temporary name and renamed, so no half-written file is left behind."""
    return _write_folder(unet, path, unet.config.to_diffusers(), WEIGHTS_NAME, dtype, flax)


def load_flux_transformer_config(path: str | Path) -> FluxConfig:
    """The FluxConfig of a Flux transformer folder or pipeline folder (its `transformer/`)."""
    folder = resolve_component(path, "transformer", {FluxTransformer2DModel.__name__})
    return FluxConfig.from_diffusers(read_json(folder / "config.json"))


def load_flux_transformer(
    path: str | Path,
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    abstract: bool = False,
) -> FluxTransformer2DModel:
    """A ready Flux transformer from a diffusers folder (`config.json` + safetensors weights,
    sharded or not).

    Args:
      path: the transformer's folder, a diffusers pipeline folder (its `transformer/` is
        used), or a hub id.
      dtype: float32, bfloat16 or float16; parameters are stored and run in it.
      variant: weight-file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
      allow_pickle: also read `.bin`/`.ckpt` pickle files, which run code when loaded.
      abstract: return the model with `jax.ShapeDtypeStruct` parameters once the config and
        the weight files are found, without reading the weights (to check a request cheaply).
    """
    return _load_diffusers_model(
        FluxTransformer2DModel,
        FluxConfig,
        path,
        "transformer",
        dtype=dtype,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
    )


def save_flux_transformer(
    model: FluxTransformer2DModel, path: str | Path, *, dtype=None, flax: bool = False
) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` (in `dtype`, default the
    parameters' own) into `path`, a folder that diffusers' `FluxTransformer2DModel
    .from_pretrained` loads; with `flax`, `flax_params/` (an orbax checkpoint) instead of the
    safetensors file. Each file is written to a temporary name and renamed into place."""
    return _write_folder(model, path, model.config.to_diffusers(), WEIGHTS_NAME, dtype, flax)


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
    return load_weights(
        shapes,
        folder,
        dtype,
        weights_name=WEIGHTS_NAME,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
        key_map=convert.vae.current_names,
    )


def save_vae(vae: AutoencoderKL, path: str | Path, *, dtype=None, flax: bool = False) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` (in `dtype`, default
    the parameters' own) into `path`, a folder that diffusers' `AutoencoderKL.from_pretrained`
    loads; with `flax`, `flax_params/` (an orbax checkpoint) instead of the safetensors file.
    Each file is written to a temporary name and renamed into place."""
    return _write_folder(vae, path, vae.config.to_diffusers(), WEIGHTS_NAME, dtype, flax)


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
    return _load_transformers_model(
        path,
        subfolder,
        CLIP_MODEL_TYPE,
        _TEXT_CLASSES,
        CLIPTextConfig.from_transformers,
        convert.text_encoder.text_model_keys,
        dtype=dtype,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
    )


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
    return _write_transformers_folder(model, path, dtype, flax)


def load_t5_encoder(
    path: str | Path,
    subfolder: str = "text_encoder_2",
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    abstract: bool = False,
) -> T5EncoderModel:
    """A ready T5 encoder (Flux's `text_encoder_2`) from a transformers folder (`config.json`
    naming `T5EncoderModel` + safetensors, one file or shards with their index).

    Args:
      path: the encoder's folder, a diffusers pipeline folder (its `subfolder` is used), or a
        pipeline's hub id.
      subfolder: the encoder's subfolder in pipeline folders.
      dtype: float32, bfloat16 or float16; parameters are stored and run in it (in float16
        the feed-forward's `wo` runs in float32, as transformers runs it: see `models.t5`).
      variant: weight-file variant, e.g. "fp16" for `model.fp16.safetensors`.
      allow_pickle: also read `.bin` pickle files, which run code when loaded.
      abstract: return the model with `jax.ShapeDtypeStruct` parameters once the config and
        the weight files are found, without reading the weights (to check a request cheaply).
    """
    return _load_transformers_model(
        path,
        subfolder,
        T5_MODEL_TYPE,
        _T5_CLASSES,
        T5Config.from_transformers,
        convert.text_encoder.t5_encoder_keys,
        dtype=dtype,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
    )


def save_t5_encoder(
    model: T5EncoderModel, path: str | Path, *, dtype=None, flax: bool = False
) -> Path:
    """Writes `config.json` and `model.safetensors` into `path`, a folder that transformers'
    `T5EncoderModel.from_pretrained` loads (the token embedding as `shared.weight` alone, as
    transformers writes it); with `flax`, `flax_params/` (an orbax checkpoint) instead of the
    safetensors file. Each file is written to a temporary name and renamed."""
    return _write_transformers_folder(model, path, dtype, flax)


def _load_transformers_model(
    path: str | Path,
    subfolder: str,
    model_type: str,
    classes: dict[str, type[nnx.Module]],
    read_config: Callable[[dict[str, Any]], Any],
    key_map: Callable[[TensorReader], TensorReader | RenamedReader],
    *,
    dtype: Any,
    variant: str | None,
    allow_pickle: bool,
    abstract: bool,
) -> nnx.Module:
    """A transformers model of `model_type` (`path` itself when its config.json says so,
    else its `subfolder`), of the class among `classes` that the config's `architectures`
    names, configured by `read_config`, its weights seen through `key_map`."""
    dtype = parse_dtype(dtype)
    folder = _transformers_folder(path, subfolder, model_type, set(classes), variant)
    raw = read_json(folder / "config.json")
    model_class = _transformers_class(raw, folder, classes)
    shapes = model_class.abstract(read_config(raw), dtype=dtype)
    return load_weights(
        shapes,
        folder,
        dtype,
        weights_name=convert.text_encoder.WEIGHTS_NAME,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
        key_map=key_map,
    )


def _write_transformers_folder(model: nnx.Module, path: str | Path, dtype: Any, flax: bool) -> Path:
    """`_write_folder` of a transformers model: its config with `architectures`, its
    weights in `model.safetensors` with transformers' header metadata."""
    config = {"architectures": [type(model).__name__], **model.config.to_transformers()}
    return _write_folder(
        model,
        path,
        config,
        convert.text_encoder.WEIGHTS_NAME,
        dtype,
        flax,
        convert.text_encoder.METADATA,
    )


def _load_diffusers_model(
    model_class: type[nnx.Module],
    config_class: type,
    path: str | Path,
    component: str,
    *,
    dtype,
    variant: str | None,
    allow_pickle: bool,
    abstract: bool,
) -> nnx.Module:
    """`model_class` (whose diffusers class name is its own) built from the `config_class` of
    the folder of `component` that `path` leads to, filled with that folder's weights (see
    `load_unet` for the arguments)."""
    dtype = parse_dtype(dtype)
    folder = resolve_component(path, component, {model_class.__name__}, variant=variant)
    config = config_class.from_diffusers(read_json(folder / "config.json"))
    return load_weights(
        model_class.abstract(config, dtype=dtype),
        folder,
        dtype,
        weights_name=WEIGHTS_NAME,
        variant=variant,
        allow_pickle=allow_pickle,
        abstract=abstract,
    )


def _write_folder(
    model: nnx.Module,
    path: str | Path,
    config: dict[str, Any],
    weights_name: str,
    dtype: Any,
    flax: bool,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes `config.json` and the model's parameters (in `dtype`, default their own) into
    the folder `path`, each atomically: `{weights_name}.safetensors` (with the header's
    `metadata`), or with `flax` an orbax checkpoint, `flax_params/`."""
    from safetensors.numpy import save_file

    dtype = None if dtype is None else parse_dtype(dtype)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "config.json", json.dumps(config, indent=2))
    if flax:
        save_flax_params(model, folder, dtype)
    else:
        tensors = state_dict(model, dtype)
        write_atomically(
            folder / f"{weights_name}.safetensors",
            lambda tmp: save_file(tensors, tmp, metadata=metadata),
        )
    return folder


def _transformers_folder(
    path: str | Path, subfolder: str, model_type: str, class_names: set[str], variant: str | None
) -> Path:
    """`path` itself when its config.json is a `model_type` model's, else its `subfolder`."""
    config = Path(path) / "config.json"
    if config.is_file() and read_json(config).get("model_type") == model_type:
        return Path(path)
    return resolve_component(path, subfolder, class_names, variant=variant)


def _transformers_class(
    config: dict[str, Any], folder: Path, classes: dict[str, type[nnx.Module]]
) -> type[nnx.Module]:
    names = config.get("architectures") or [config.get("_class_name")]
    if len(names) != 1 or names[0] not in classes:
        raise ValueError(
            f"{folder / 'config.json'}: architectures {names!r} is not supported "
            f"(use one of {sorted(classes)})"
        )
    return classes[names[0]]

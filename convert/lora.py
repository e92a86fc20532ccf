"""LoRA adapters: read from a safetensors file and fused into a network's weights.

A LoRA adds to a weight W (diffusers layout: linear (out, in), conv (out, in, kh, kw)) the
low-rank product  scale * alpha / r * up @ down,  with down (r, in[, kh, kw]) and
up (out, r[, 1, 1]). Two file formats are read:

  diffusers / PEFT: `{component}.{module}.lora_A.weight` (down) and `.lora_B.weight` (up),
    component `unet`, `text_encoder`, `text_encoder_2`; also the older
    `{component}.{module}.lora.down.weight` / `.lora.up.weight`. alpha: the `.alpha` tensor
    where there is one, else the `lora_alpha` of the file's adapter metadata
    (`lora_adapter_metadata`, as diffusers writes it), else r.
  kohya: `lora_unet_{module}` / `lora_te1_{module}` / `lora_te2_{module}` with the module
    path's dots written as underscores, `.lora_down.weight`, `.lora_up.weight`, `.alpha`;
    UNet modules in diffusers' block names or in the original SGM ones (`from_sgm`).

Every tensor must find its weight: a key that matches nothing is refused with its name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.files import (
    TensorReader,
    from_hub,
    looks_like_hub_id,
    safetensors_metadata,
)
from convert.state_dict import diffusers_key, to_diffusers_shape, to_flax_layout

# The pipeline components a LoRA adapts: the key prefixes of the diffusers/PEFT format, and
# kohya's prefix for each.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_PEFT = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<ud>down|up)\.weight)$"
)
_KOHYA = re.compile(r"^(?P<module>[^.]+)\.(?:lora_(?P<ud>down|up)\.weight|(?P<alpha>alpha))$")


@dataclass(frozen=True)
class LowRank:
    """One weight's adapter: `down` (r, in[, kh, kw]), `up` (out, r[, 1, 1]), `alpha`."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    def check(self, shape: tuple[int, ...], name: str) -> None:
        """Refuses an adapter that does not fit a weight of diffusers `shape`."""
        rank = self.down.shape[0]
        fits = (
            self.up.shape[0] == shape[0]
            and self.up.size == shape[0] * rank
            and self.down.size == rank * int(np.prod(shape[1:]))
        )
        if not fits:
            raise ValueError(
                f"LoRA for {name}: down {self.down.shape} and up {self.up.shape} do not fit "
                f"its weight {shape}"
            )

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """alpha / r * up @ down in float32, in the weight's diffusers `shape`."""
        rank = self.down.shape[0]
        up = self.up.astype(np.float32).reshape(self.up.shape[0], rank)
        down = self.down.astype(np.float32).reshape(rank, -1)
        return ((up @ down) * (self.alpha / rank)).reshape(shape)


def read_lora(path: str | Path) -> dict[str, dict[str, LowRank]]:
    """component ("unet", "text_encoder", "text_encoder_2") -> {module path: LowRank}.

    `path`: a LoRA safetensors file, a folder holding `pytorch_lora_weights.safetensors`, or
    a hub id whose repository holds that file (downloaded on first use).
    Module paths are the diffusers/transformers ones with dots, e.g.
    `down_blocks.1.attentions.0.proj_in`; kohya names keep their underscores and are
    resolved against the networks later (`match`, `from_sgm`).
    """
    file = Path(path)
    if not file.exists() and looks_like_hub_id(path):
        from huggingface_hub import hf_hub_download  # a hub id, e.g. "org/some-lora"

        file = from_hub(path, lambda: Path(hf_hub_download(str(path), WEIGHT_NAME)))
    if file.is_dir():
        file = file / WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA file at {path} (a .safetensors file or a folder)")
    with TensorReader([file]) as reader:
        tensors = {key: reader.read(key) for key in list(reader.keys())}
    metadata = _adapter_metadata(file)
    adapters: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    unmatched = []
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in COMPONENTS and (match := _PEFT.match(rest)):
            part = {"A": "down", "B": "up"}.get(match["ab"], match["ud"])
            parts = adapters.setdefault(prefix, {}).setdefault(match["module"], {})
            parts[part] = tensor
        elif prefix in COMPONENTS and rest.endswith(".alpha"):
            adapters.setdefault(prefix, {}).setdefault(rest[: -len(".alpha")], {})["alpha"] = tensor
        elif (kohya := _kohya_component(key)) and (match := _KOHYA.match(key)):
            component, module = kohya
            part = "alpha" if match["alpha"] else match["ud"]
            adapters.setdefault(component, {}).setdefault(module, {})[part] = tensor
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{file}: keys of no LoRA format known here: {_names(unmatched)}")
    return {
        component: {
            module: _low_rank(file, component, module, parts, metadata.get(component, {}))
            for module, parts in modules.items()
        }
        for component, modules in adapters.items()
    }


@dataclass(frozen=True)
class Target:
    """An adapter matched to its weight: the parameter (`path`, `variable`) of the network
    and the weight's diffusers shape."""

    path: tuple
    variable: nnx.Variable
    shape: tuple[int, ...]
    low_rank: LowRank


def match(network: nnx.Module, adapters: Mapping[str, LowRank], component: str) -> list[Target]:
    """Each adapter's weight in `network`; kohya module names (underscores) and text-model
    names without `text_model.` are matched to the network's. Modules that match no weight,
    or adapters that do not fit theirs, are refused, all named. Works on a network of
    shapes (`jax.ShapeDtypeStruct`) too."""
    params = {
        diffusers_key(path)[: -len(".weight")]: (path, var)
        for path, var in nnx.to_flat_state(nnx.state(network, nnx.Param))
        if path[-1] == "kernel"
    }
    aliases = {module.replace(".", "_"): module for module in params}  # kohya's names
    # transformers >= 5 names a CLIP text model's modules without the `text_model.` prefix.
    aliases |= {m.removeprefix("text_model."): m for m in params if m.startswith("text_model.")}
    targets, unknown = [], []
    for module, low_rank in adapters.items():
        name = module if module in params else aliases.get(module)
        if name is None:
            unknown.append(module)
            continue
        path, var = params[name]
        shape = to_diffusers_shape(path[-1], var.get_value().shape)
        low_rank.check(shape, f"{component} {name}")
        targets.append(Target(path, var, shape, low_rank))
    if unknown:
        raise ValueError(f"LoRA modules that match no weight of the {component}: {_names(unknown)}")
    return targets


def fuse(targets: Iterable[Target], scale: float) -> dict[tuple, jax.Array]:
    """Adds scale * delta of every target's adapter to its weight, in place (computed in
    float32, stored in the weight's dtype); returns the arrays it replaced by path."""
    replaced = {}
    for target in targets:
        weight = target.variable.get_value()
        delta = to_flax_layout("kernel", target.low_rank.delta(target.shape) * scale)
        replaced[target.path] = weight
        target.variable.set_value((weight.astype(jnp.float32) + delta).astype(weight.dtype))
    return replaced


_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}  # fmt: skip
_SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
            "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
            "input_blocks_0_0": "conv_in", "out_2": "conv_out"}  # fmt: skip


def from_sgm(module: str, layers_per_block: int) -> str:
    """A kohya UNet module name in the original SDXL/SD (SGM) block names, e.g.
    `input_blocks_4_1_transformer_blocks_0_attn1_to_q`, in diffusers' block names with
    underscores (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); any other
    name as it is. `layers_per_block`: the UNet config's (down blocks hold that many
    layers plus a downsampler, up blocks one more layer)."""
    for old, new in _SGM_TOP.items():
        if module == old or module.startswith(old + "_"):
            return new + module[len(old) :]
    if match := re.match(r"^middle_block_(\d)_(.+)$", module):
        part = ("resnets_0", "attentions_0", "resnets_1")[int(match[1])]
        return f"mid_block_{part}_{_resnet_part(match[2])}"
    if match := re.match(r"^(input|output)_blocks_(\d+)_(\d)_(.+)$", module):
        kind, index, part, rest = match[1], int(match[2]), int(match[3]), match[4]
        per_block = layers_per_block + 1
        if kind == "input":
            block, layer = divmod(index - 1, per_block)
            if layer == layers_per_block:  # the downsampler, `op`
                return f"down_blocks_{block}_downsamplers_0_conv"
            name = "resnets" if part == 0 else "attentions"
            return f"down_blocks_{block}_{name}_{layer}_{_resnet_part(rest)}"
        block, layer = divmod(index, per_block)
        if rest == "conv":  # the upsampler's conv, after the resnet (and the attention)
            return f"up_blocks_{block}_upsamplers_0_conv"
        name = "resnets" if part == 0 else "attentions"
        return f"up_blocks_{block}_{name}_{layer}_{_resnet_part(rest)}"
    return module


def _resnet_part(rest: str) -> str:
    return _SGM_RESNET.get(rest, rest)


def _low_rank(
    file: Path, component: str, module: str, parts: dict[str, np.ndarray], config: dict
) -> LowRank:
    """The module's LowRank; alpha from its `.alpha` tensor, else the component's adapter
    `config` (the file's metadata), else the rank."""
    if "down" not in parts or "up" not in parts:
        missing = "up" if "down" in parts else "down"
        raise ValueError(f"{file}: {component} {module} has no {missing} matrix")
    if "alpha" in parts:
        alpha = float(np.asarray(parts["alpha"], np.float32).reshape(()))
    else:
        alpha = float(config.get("lora_alpha", parts["down"].shape[0]))
    return LowRank(parts["down"], parts["up"], alpha)


def _kohya_component(key: str) -> tuple[str, str] | None:
    module = key.split(".", 1)[0]
    for prefix, component in KOHYA_COMPONENTS.items():
        if module.startswith(prefix + "_"):
            return component, module[len(prefix) + 1 :]
    return None


def _adapter_metadata(file: Path) -> dict[str, dict]:
    """The per-component LoRA config diffusers keeps in the file's header metadata
    (`lora_adapter_metadata`: {"unet.r": ..., "unet.lora_alpha": ...} or nested), or {}."""
    raw = safetensors_metadata(file).get("lora_adapter_metadata")
    if raw is None:
        return {}
    nested: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        if isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
        else:
            component, _, name = key.rpartition(".")
            nested.setdefault(component, {})[name] = value
    return nested


def _names(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

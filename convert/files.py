"""Finding a component's config and weight files in a diffusers folder, and reading them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import safe_open

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class PickleWeightsRefused(ValueError):
    """The folder only has pickle weights, which run code when loaded."""


def resolve_component(path: str | Path, component: str, class_names: set[str]) -> Path:
    """The folder of one component (`unet`, `vae`, ...).

    `path` is the component's own folder (its `config.json` names one of `class_names`), a
    diffusers pipeline folder holding `component/`, or a model id on the Hugging Face hub,
    downloaded (safetensors and configs only) into the local hub cache.
    """
    folder = Path(path)
    if not folder.exists():
        if str(path).count("/") != 1 or str(path).startswith((".", "/")):
            raise FileNotFoundError(f"no such folder: {path}")
        folder = _download_from_hub(str(path), component)
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") in class_names:
        return folder
    if (folder / component / "config.json").is_file():
        return folder / component
    raise FileNotFoundError(
        f"{folder} is neither a {'/'.join(sorted(class_names))} folder (config.json) nor a "
        f"pipeline folder with a {component}/ subfolder"
    )


def _download_from_hub(repo_id: str, component: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{component}/*.json", f"{component}/*.safetensors", "model_index.json"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def weight_files(
    folder: Path, weights_name: str, *, variant: str | None = None, allow_pickle: bool = False
) -> list[Path]:
    """The weight files of `folder`: `{weights_name}[.{variant}].safetensors`, or the shards
    its `.safetensors.index[.{variant}].json` lists. Pickle files only with `allow_pickle`."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{weights_name}{suffix}.safetensors"
    index = folder / f"{weights_name}.safetensors.index{suffix}.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and allow_pickle:
        return pickles
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise PickleWeightsRefused(
            f"{folder} has only pickle weights ({names}). Loading a pickle runs code from the "
            "file; convert it to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
            "if you trust its source."
        )
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {single.name} and {index.name}; found {present}"
        + ("" if variant else " (for fp16 files pass variant='fp16')")
    )


class TensorReader:
    """Reads named tensors from weight files as numpy arrays, one at a time.

    safetensors files are memory-mapped; the caller keeps at most one tensor in flight.
    Use as a context manager.
    """

    def __init__(self, files: list[Path]):
        self._files = files
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, np.ndarray] = {}

    def __enter__(self) -> TensorReader:
        for file in self._files:
            if file.suffix == ".safetensors":
                handle = self._stack.enter_context(safe_open(file, framework="numpy"))
                self._handles.update(dict.fromkeys(handle.keys(), handle))
            else:
                self._pickled.update(_load_pickle(file))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> Iterator[str]:
        yield from self._handles
        yield from self._pickled

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._pickled:
            return self._pickled[key].shape
        return tuple(self._handles[key].get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        if key in self._pickled:
            return self._pickled[key]
        return self._handles[key].get_tensor(key)


def _load_pickle(file: Path) -> dict[str, np.ndarray]:
    """Only reached with the caller's explicit allow_pickle opt-in."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading the pickle file {file} needs torch installed") from error
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()
    }

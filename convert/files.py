"""Finding a component's config and weight files in a diffusers folder, and reading them."""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# The weight files of every diffusers model (ModelMixin) folder: `{WEIGHTS_NAME}.safetensors`.
WEIGHTS_NAME = "diffusion_pytorch_model"
T = TypeVar("T")


class PickleWeightsRefused(ValueError):
    """The folder only has pickle weights, which run code when loaded."""


def read_json(file: Path) -> dict:
    """A JSON file of a checkpoint folder (config.json, model_index.json, ...) as a dict;
    a missing or unreadable one is refused with its path and what to do."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the folder is not a complete checkpoint")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{file} is not valid JSON ({error}); restore it from the original checkpoint "
            "(re-download or re-convert the folder)"
        ) from None


def looks_like_hub_id(path: str | Path) -> bool:
    """Whether `path`, which is not a folder here, may name a model on the Hugging Face hub
    ("org/name"): one slash, and not a path that starts at "." or "/"."""
    text = str(path)
    return text.count("/") == 1 and not text.startswith((".", "/"))


def from_hub(path: str | Path, fetch: Callable[[], T]) -> T:
    """`fetch()`, which downloads `path` from the Hugging Face hub. `path` is not a folder
    here, and a relative folder mistyped reads like a hub id ("models/sdxl"): a failed
    download is refused as both, with the hub's reason, not with the hub client's exception."""
    try:
        return fetch()
    except Exception as error:
        raise FileNotFoundError(
            f"no such folder: {path} (from {Path.cwd()}), and as a Hugging Face hub id it could "
            f"not be fetched: {type(error).__name__}: {error}"
        ) from None


def resolve_component(
    path: str | Path, component: str, class_names: set[str], *, variant: str | None = None
) -> Path:
    """The folder of one component (`unet`, `vae`, ...).

    `path` is the component's own folder (its `config.json` names one of `class_names`), a
    diffusers pipeline folder holding `component/`, or a model id on the Hugging Face hub,
    downloaded (configs and the `variant`'s safetensors only) into the local hub cache.
    """
    folder = Path(path)
    if not folder.exists():
        if not looks_like_hub_id(path):
            raise FileNotFoundError(f"no such folder: {path}")
        folder = from_hub(path, lambda: _download_from_hub(str(path), [component], variant))
    config = folder / "config.json"
    if config.is_file() and read_json(config).get("_class_name") in class_names:
        return folder
    if (folder / component / "config.json").is_file():
        return folder / component
    raise FileNotFoundError(
        f"{folder} is neither a {'/'.join(sorted(class_names))} folder (config.json) nor a "
        f"pipeline folder with a {component}/ subfolder"
    )


def read_model_index(path: str | Path) -> dict:
    """The `model_index.json` of a diffusers pipeline folder, or of a model id on the
    Hugging Face hub (that file alone downloaded)."""
    folder = Path(path)
    if not folder.exists():
        if not looks_like_hub_id(path):
            raise FileNotFoundError(f"no such folder: {path}")
        from huggingface_hub import hf_hub_download

        return read_json(
            from_hub(path, lambda: Path(hf_hub_download(str(path), "model_index.json")))
        )
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    return read_json(folder / "model_index.json")


def resolve_pipeline_folder(
    path: str | Path, components: list[str], *, variant: str | None = None
) -> Path:
    """A diffusers pipeline folder holding every one of `components` (subfolders), or a model
    id on the Hugging Face hub, downloaded (configs, tokenizer files and safetensors weights of
    those components only) into the local hub cache. Raises FileNotFoundError naming every
    missing component."""
    folder = Path(path)
    if not folder.exists():
        if not looks_like_hub_id(path):
            raise FileNotFoundError(f"no such folder: {path}")
        folder = from_hub(path, lambda: _download_from_hub(str(path), components, variant))
    missing = [name for name in components if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete pipeline folder: missing {', '.join(missing)}/ "
            f"(needs {', '.join(components)})"
        )
    return folder


def _download_from_hub(repo_id: str, components: list[str], variant: str | None) -> Path:
    from huggingface_hub import snapshot_download

    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    patterns = ["model_index.json"]
    for name in components:
        patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/{weights}"]
    ignore = [] if variant else ["*.fp16.safetensors"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))


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
        shards = sorted(set(read_json(index)["weight_map"].values()))
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


# safetensors dtype names -> numpy dtypes.
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


def safetensors_metadata(file: Path) -> dict[str, str]:
    """The string-to-string `__metadata__` of a safetensors file's header ({} if none)."""
    header, _ = _safetensors_header(file)
    return header.get("__metadata__", {})


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(the JSON header, where the data starts) of a safetensors file: an 8-byte
    little-endian header length, a JSON header naming each tensor's dtype, shape and byte
    range, then the data. A file too short for what its header lists is refused."""
    size = file.stat().st_size
    with open(file, "rb") as stream:
        header_length = int.from_bytes(stream.read(8), "little")
        try:
            if 8 + header_length > size:
                raise ValueError(f"a header of {header_length} bytes")
            header = json.loads(stream.read(header_length))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{file} is not a readable safetensors file ({error}; the file has {size} "
                "bytes); re-download or re-convert it"
            ) from None
    data_start = 8 + header_length
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise ValueError(
            f"{file} is truncated: its header lists {data_start + end} bytes, the file has "
            f"{size}; re-download or re-convert it"
        )
    return header, data_start


def _safetensors_index(file: Path) -> dict[str, _StoredTensor]:
    """Where each tensor of a safetensors file lies (`_safetensors_header`)."""
    header, data_start = _safetensors_header(file)
    return {
        key: _StoredTensor(
            file,
            data_start + entry["data_offsets"][0],
            np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]),
            tuple(entry["shape"]),
        )
        for key, entry in header.items()
        if key != "__metadata__"
    }


class TensorReader:
    """Reads named tensors from weight files as numpy arrays, one at a time.

    Each safetensors tensor is memory-mapped only while it is copied out, so that the pages
    read do not stay resident: loading peaks at the converted parameters plus a tensor or
    two, not at twice the checkpoint. Use as a context manager.
    """

    def __init__(self, files: list[Path]):
        self._files = files
        self._stored: dict[str, _StoredTensor] = {}
        self._pickled: dict[str, np.ndarray] = {}

    def __enter__(self) -> TensorReader:
        for file in self._files:
            if file.suffix == ".safetensors":
                self._stored.update(_safetensors_index(file))
            else:
                self._pickled.update(_load_pickle(file))
        return self

    def __exit__(self, *exc) -> None:
        self._pickled.clear()

    def keys(self) -> Iterator[str]:
        yield from self._stored
        yield from self._pickled

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._pickled:
            return self._pickled[key].shape
        return self._stored[key].shape

    def read(self, key: str) -> np.ndarray:
        if key in self._pickled:
            return self._pickled[key]
        stored = self._stored[key]
        if 0 in stored.shape:
            return np.zeros(stored.shape, stored.dtype)
        count = int(np.prod(stored.shape))
        with (
            open(stored.file, "rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        ):
            view = np.frombuffer(mapped, stored.dtype, count, stored.offset)
            tensor = view.reshape(stored.shape).copy()
            del view  # releases the buffer so that the mapping can close
        return tensor


class RenamedReader:
    """A TensorReader whose tensors are seen under other names: `names` maps each name seen
    to the reader's own; tensors it leaves out are not seen."""

    def __init__(self, reader: TensorReader, names: dict[str, str]):
        self._reader = reader
        self._names = names

    def keys(self) -> Iterator[str]:
        yield from self._names

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(self._names[key])

    def read(self, key: str) -> np.ndarray:
        return self._reader.read(self._names[key])


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

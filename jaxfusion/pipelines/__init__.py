"""Text-to-image pipelines that read diffusers pipeline folders and run in JAX."""

from pathlib import Path

from jaxfusion.convert.files import read_json
from jaxfusion.pipelines.base import Stage, TextToImagePipeline, no_display
from jaxfusion.pipelines.stable_diffusion import SDPipeline
from jaxfusion.pipelines.stable_diffusion_xl import SDXLPipeline

PIPELINES = {cls.pipeline_class: cls for cls in (SDXLPipeline, SDPipeline)}


BUILTIN = "builtin"


def load_pipeline(path: str | Path = BUILTIN, **kwargs) -> TextToImagePipeline:
    """The pipeline class that `model_index.json` in `path` (a folder, or a hub id) names,
    loaded with `from_pretrained(path, **kwargs)`. `path` "builtin" (the default) is the
    small model shipped with jaxfusion (`jaxfusion.builtin`)."""
    if str(path) == BUILTIN and not Path(path).exists():
        from jaxfusion.builtin import builtin_model_path

        path = builtin_model_path()
    index = Path(path) / "model_index.json"
    if not Path(path).exists():
        if str(path).count("/") != 1 or str(path).startswith((".", "/")):
            raise FileNotFoundError(f"no such folder: {path}")
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(str(path), "model_index.json"))
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    name = read_json(index).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{index} names {name!r}; supported pipelines: {list(PIPELINES)}")
    return PIPELINES[name].from_pretrained(path, **kwargs)


__all__ = [
    "BUILTIN",
    "PIPELINES",
    "SDPipeline",
    "SDXLPipeline",
    "Stage",
    "TextToImagePipeline",
    "load_pipeline",
    "no_display",
]

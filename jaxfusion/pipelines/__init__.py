"""Text-to-image and image-to-image pipelines that read diffusers pipeline folders and run
in JAX: the core every model family shares (`base.TextToImagePipeline`, run on a
`Request`), and a module per family that supplies its parts (`stable_diffusion`: SD 1.x/2.x,
`stable_diffusion_xl`: SDXL and its refiner, `flux`: Flux.1 [dev] and [schnell]).
`PIPELINES` names each family's classes by the diffusers pipeline class that a folder's
`model_index.json` names."""

from pathlib import Path

from convert.files import read_model_index
from jaxfusion.pipelines.base import Stage, TextToImagePipeline, no_display
from jaxfusion.pipelines.flux import FluxPipeline
from jaxfusion.pipelines.request import Request
from jaxfusion.pipelines.stable_diffusion import SDPipeline
from jaxfusion.pipelines.stable_diffusion_xl import SDXLImg2ImgPipeline, SDXLPipeline

PIPELINES = {
    cls.pipeline_class: cls for cls in (SDXLPipeline, SDXLImg2ImgPipeline, SDPipeline, FluxPipeline)
}


BUILTIN = "builtin"


def model_path(path: str | Path) -> str | Path:
    """`path`, or the folder of the small model shipped with jaxfusion (`jaxfusion.builtin`)
    where `path` is "builtin" and no such folder is here."""
    if str(path) == BUILTIN and not Path(path).exists():
        from jaxfusion.builtin import builtin_model_path

        return builtin_model_path()
    return path


def load_pipeline(path: str | Path = BUILTIN, **kwargs) -> TextToImagePipeline:
    """The pipeline class that `model_index.json` in `path` (a folder, or a hub id) names,
    loaded with `from_pretrained(path, **kwargs)`. `path` "builtin" (the default) is the
    small model shipped with jaxfusion (`model_path`)."""
    path = model_path(path)
    name = read_model_index(path).get("_class_name")
    if name not in PIPELINES:
        flux = (
            " (of the Flux family, FluxPipeline runs: FLUX.1 [dev] and [schnell], "
            "text-to-image; Kontext, Fill, image-to-image and FLUX.2 are not supported yet)"
            if str(name).startswith("Flux")
            else ""
        )
        raise ValueError(
            f"{path}/model_index.json names {name!r}; supported pipelines: {list(PIPELINES)}{flux}"
        )
    return PIPELINES[name].from_pretrained(path, **kwargs)


__all__ = [
    "BUILTIN",
    "PIPELINES",
    "FluxPipeline",
    "Request",
    "SDPipeline",
    "SDXLImg2ImgPipeline",
    "SDXLPipeline",
    "Stage",
    "TextToImagePipeline",
    "load_pipeline",
    "model_path",
    "no_display",
]

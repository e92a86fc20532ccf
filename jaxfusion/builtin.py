"""The built-in model: a tiny SDXL-architecture pipeline trained on coloured shapes
(`jaxfusion.train`), shipped inside the package as a diffusers pipeline folder and loaded
like any checkpoint. Its native size is 64x64; it also draws at larger sizes."""

import os
from pathlib import Path

NAME = "builtin_model"
DESCRIPTION = (
    "built-in tiny SDXL-architecture model trained on coloured shapes (native 64x64; "
    "prompts like 'a red circle at the top left and a blue square at the bottom')"
)
RETRAIN = "jaxfusion train --out jaxfusion/builtin_model --overwrite"


def cache_dir() -> Path:
    """Where jaxfusion keeps its files: $JAXFUSION_CACHE, else $XDG_CACHE_HOME/jaxfusion,
    else ~/.cache/jaxfusion."""
    if "JAXFUSION_CACHE" in os.environ:
        return Path(os.environ["JAXFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxfusion"


def builtin_model_path() -> Path:
    """The built-in pipeline folder inside the package."""
    folder = Path(__file__).parent / NAME
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing from {folder}; from a source checkout, train it "
            f"again with `{RETRAIN}`"
        )
    return folder

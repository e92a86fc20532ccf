"""jaxfusion: DistriFusion (displaced patch parallelism) for diffusion inference in JAX.

The public names and the submodules are imported on first use, so that `import jaxfusion`
(and the command line's `--help`) does not import JAX.
"""

from typing import TYPE_CHECKING

import sharding  # noqa: F401  (sets XLA_FLAGS before JAX starts its backends; no JAX import)
from nnxtools.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "FluxPipeline": "jaxfusion.pipelines",
        "ParallelConfig": "sharding.parallel",
        "SDPipeline": "jaxfusion.pipelines",
        "SDXLImg2ImgPipeline": "jaxfusion.pipelines",
        "SDXLPipeline": "jaxfusion.pipelines",
        "UNet2DConditionModel": "jaxfusion.models",
        "UNetConfig": "jaxfusion.models",
        "load_pipeline": "jaxfusion.pipelines",
    },
)

if TYPE_CHECKING:
    from jaxfusion.models import UNet2DConditionModel, UNetConfig
    from jaxfusion.pipelines import (
        FluxPipeline,
        SDPipeline,
        SDXLImg2ImgPipeline,
        SDXLPipeline,
        load_pipeline,
    )
    from sharding.parallel import ParallelConfig

__all__ = [
    "FluxPipeline",
    "ParallelConfig",
    "SDPipeline",
    "SDXLImg2ImgPipeline",
    "SDXLPipeline",
    "UNet2DConditionModel",
    "UNetConfig",
    "load_pipeline",
]
__version__ = "0.1.0"

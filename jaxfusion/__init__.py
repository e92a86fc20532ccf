"""jaxfusion: DistriFusion (displaced patch parallelism) for diffusion inference in JAX."""

from jaxfusion.models import UNet2DConditionModel, UNetConfig
from jaxfusion.pipelines import SDPipeline, SDXLPipeline, load_pipeline
from sharding.parallel import ParallelConfig

__all__ = [
    "ParallelConfig",
    "SDPipeline",
    "SDXLPipeline",
    "UNet2DConditionModel",
    "UNetConfig",
    "load_pipeline",
]
__version__ = "0.1.0"

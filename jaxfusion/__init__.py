"""jaxfusion: DistriFusion (displaced patch parallelism) for diffusion inference in JAX."""

from jaxfusion.models import UNet2DConditionModel, UNetConfig

__all__ = ["UNet2DConditionModel", "UNetConfig"]
__version__ = "0.1.0"

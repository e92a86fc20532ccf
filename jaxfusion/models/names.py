"""The attention kernels a model can run (see `jaxfusion.models.scaled_dot_product`), in a
module that imports nothing (the command line offers them as choices without starting JAX)."""

from typing import Literal

# auto, then the kernels of `scaled_dot_product.KERNELS`, in order.
AttentionBackend = Literal["auto", "xla", "chunked", "cudnn"]
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = ("auto", "xla", "chunked", "cudnn")

"""Patch parallelism: the primitives the models call for every spatial layer, the device
mesh and `ParallelConfig`, and the denoising loops per mode.

Each primitive is the plain layer on one device; inside the patch-parallel program
(`sharding.loops`) it exchanges conv halos, self-attention K/V or GroupNorm moments with the
other patches, synchronously or displaced by one step, without the models changing. See
DESIGN.md section 3.
"""

import os
from typing import TYPE_CHECKING

from nnxtools.lazy import lazy_attributes

# On GPU, XLA overlaps collectives with compute only under its latency-hiding scheduler, off
# by default. Turned on here, before JAX starts its backends (importing jaxfusion imports
# this package), unless the user's XLA_FLAGS set it (to either value); it changes nothing
# on CPU.
LATENCY_HIDING_FLAG = "--xla_gpu_enable_latency_hiding_scheduler"


def with_latency_hiding(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with `LATENCY_HIDING_FLAG=true` appended, unless one of
    them is that flag (bare, or with a value)."""
    if any(
        f == LATENCY_HIDING_FLAG or f.startswith(f"{LATENCY_HIDING_FLAG}=") for f in flags.split()
    ):
        return flags
    return f"{flags} {LATENCY_HIDING_FLAG}=true".strip()


os.environ["XLA_FLAGS"] = with_latency_hiding(os.environ.get("XLA_FLAGS", ""))

# The public names, each imported (with JAX) from its module on first use, so that importing
# the package, or its JAX-free `sharding.names`, stays cheap.
_ATTRIBUTES = {
    "Conv2d": "sharding.conv",
    "GroupNorm": "sharding.group_norm",
    "KVExchange": "sharding.attention",
    "ParallelConfig": "sharding.parallel",
    "send_when_produced": "sharding.context",
}

if TYPE_CHECKING:
    from sharding.attention import KVExchange
    from sharding.context import send_when_produced
    from sharding.conv import Conv2d
    from sharding.group_norm import GroupNorm
    from sharding.parallel import ParallelConfig


__getattr__, __dir__ = lazy_attributes(__name__, _ATTRIBUTES)


__all__ = ["Conv2d", "GroupNorm", "KVExchange", "ParallelConfig", "send_when_produced"]

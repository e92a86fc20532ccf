"""Patch parallelism: the primitives the models call for every spatial layer, the device
mesh and `ParallelConfig`, and the denoising loops per mode.

Each primitive is the plain layer on one device; inside the patch-parallel program
(`sharding.loops`) it exchanges conv halos, self-attention K/V or GroupNorm moments with the
other patches, synchronously or displaced by one step, without the models changing. See
DESIGN.md section 3.
"""

import os

# On GPU, XLA overlaps collectives with compute only under its latency-hiding scheduler, off
# by default. Turned on here, before JAX starts its backends (importing jaxfusion imports
# this package), unless the user set XLA flags; it changes nothing on CPU.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_gpu_enable_latency_hiding_scheduler=true"

from sharding.attention import KVExchange
from sharding.conv import Conv2d
from sharding.group_norm import GroupNorm
from sharding.parallel import ParallelConfig

__all__ = ["Conv2d", "GroupNorm", "KVExchange", "ParallelConfig"]

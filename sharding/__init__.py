"""Patch-parallel primitives that the models call for every spatial layer.

Each primitive is the plain single-device layer today; the patch-parallel program gives them
their exchanges (conv halos, self-attention K/V, GroupNorm moments) without the models
changing. See DESIGN.md section 3.
"""

from sharding.attention import KVExchange
from sharding.conv import Conv2d
from sharding.group_norm import GroupNorm

__all__ = ["Conv2d", "GroupNorm", "KVExchange"]

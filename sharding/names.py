"""The names a patch-parallel configuration chooses from, in a module that imports nothing
(the command line offers them as choices without starting JAX)."""

from typing import Literal

Mode = Literal["single", "sync", "displaced", "naive"]
MODES: tuple[Mode, ...] = ("single", "sync", "displaced", "naive")
NaiveSplit = Literal["row", "col", "alternate"]
NAIVE_SPLITS: tuple[NaiveSplit, ...] = ("row", "col", "alternate")
GroupNormRule = Literal["corrected", "stale", "separate", "sync"]
GROUP_NORM_RULES: tuple[GroupNormRule, ...] = ("corrected", "stale", "separate", "sync")
# How displaced steps compress what they exchange and keep (`sharding.codecs.CODECS`).
Compression = Literal["none", "fp8", "int8", "residual-int4", "residual-int2", "residual-1bit"]
COMPRESSIONS: tuple[Compression, ...] = (
    "none",
    "fp8",
    "int8",
    "residual-int4",
    "residual-int2",
    "residual-1bit",
)

"""What a patch-parallel primitive needs to know inside the parallel program, and the stale
buffers it keeps between denoising steps.

The primitives (`Conv2d`, `GroupNorm`, `KVExchange`) carry a `patch` attribute: None on one
device (they are the plain layers), or a `PatchContext` that the denoising loop sets on a
copy of the model inside `shard_map` (`model.set_attributes(patch=...)`). The models never
see it.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

Exchange = Literal["sync", "displaced", "none", "local"]
GroupNormRule = Literal["corrected", "stale", "separate", "sync"]
GROUP_NORM_RULES: tuple[GroupNormRule, ...] = ("corrected", "stale", "separate", "sync")
AXIS = "patch"


class StaleBuffer(nnx.Variable):
    """What a primitive received from the other patches during the previous denoising step
    (halo rows, all patches' GroupNorm moments, all patches' keys and values): read in a
    displaced step in place of the current values, and refreshed by that step's exchange."""


@dataclasses.dataclass(frozen=True)
class PatchContext:
    """How the primitives behave in this denoising step on this device.

    patches: P, the devices along the mesh axis `AXIS`; this device's patch is
        `jax.lax.axis_index(AXIS)`, rows [i*h/P, (i+1)*h/P) of every feature map.
    exchange: "sync" (context from the other patches' current activations: exact),
        "displaced" (context from their previous-step activations, the stale buffers, while
        this step's are exchanged for the next step), "none" (no context: naive patches),
        "local" (a displaced step's computation without its exchanges, whose results only
        feed the next step: what one device computes, run on one device to time it).
    group_norm: the GroupNorm rule of displaced steps (see `sharding.group_norm`).
    keep_stale: synchronous steps also store what they received as stale buffers (the
        warm-up steps before displaced ones).
    local_index: the patch a "local" step computes (there is no mesh axis to ask).
    """

    patches: int
    exchange: Exchange
    group_norm: GroupNormRule = "corrected"
    keep_stale: bool = False
    local_index: int = 1

    def index(self) -> jax.Array:
        """This device's patch, i."""
        if self.exchange == "local":
            return jnp.int32(self.local_index)
        return jax.lax.axis_index(AXIS)

    @property
    def exchanges(self) -> bool:
        """Whether collectives run (not in naive or local steps)."""
        return self.exchange not in ("none", "local")


def read_and_refresh(
    module: nnx.Module, name: str, fresh: jax.Array | None, context: PatchContext
) -> jax.Array | None:
    """The stale buffer `name` of `module` as it was (None in a synchronous step), after
    storing `fresh` there: in a displaced step, or a synchronous one that keeps stale
    buffers (which creates them on the first step). A local step only reads it."""
    displaced = context.exchange in ("displaced", "local")
    stale = getattr(module, name).get_value() if displaced else None
    if context.exchange == "displaced" or context.keep_stale:
        if hasattr(module, name):
            getattr(module, name).set_value(fresh)
        else:
            setattr(module, name, StaleBuffer(fresh))
    return stale

"""What a patch-parallel primitive needs to know inside the parallel program, what it receives
from the other patches, and the stale buffers it keeps between denoising steps.

The primitives (`Conv2d`, `GroupNorm`, `KVExchange`) are `PatchPrimitive`s with a `patch`
attribute: None on one device (they are the plain layers), or the `PatchContext` that the
denoising loop sets on a copy of the model inside `shard_map` (`set_patch_context`). The
models never see it. How each kind of exchange behaves is written once, in
`PatchContext.receive`; a primitive only says what it sends and how it uses what it gets.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.codecs import AS_NAMED, CODECS, Transport
from sharding.names import Compression, GroupNormRule

Exchange = Literal["sync", "displaced", "none", "local"]
AXIS = "patch"


class StaleBuffer(nnx.Variable):
    """What a primitive received from the other patches during the previous denoising step
    (halo rows, all patches' GroupNorm moments, all patches' keys and values): read in a
    displaced step in place of the current values, and refreshed by that step's exchange."""


@dataclasses.dataclass(frozen=True)
class Received:
    """What a primitive got from the other patches: `value` (the structure of what its
    transport returns), from this step (`stale` False) or from an earlier one (`stale` True)."""

    value: Any
    stale: bool


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
    compress: the codec of the displaced exchanges and the stale buffers of the primitives
        that allow one (`sharding.codecs`); synchronous steps exchange exact values.
    refresh_kv: whether a displaced step exchanges self-attention keys and values (False:
        they keep the stale buffers of an earlier step, `ParallelConfig.kv_refresh`).
    """

    patches: int
    exchange: Exchange
    group_norm: GroupNormRule = "corrected"
    keep_stale: bool = False
    local_index: int = 1
    compress: Compression = "none"
    refresh_kv: bool = True

    def index(self) -> jax.Array:
        """This device's patch, i."""
        if self.exchange == "local":
            return jnp.int32(self.local_index)
        return jax.lax.axis_index(AXIS)

    @property
    def exchanges(self) -> bool:
        """Whether collectives run (not in naive or local steps)."""
        return self.exchange not in ("none", "local")

    def receive(
        self,
        module: nnx.Module,
        name: str,
        own: Any,
        transport: Transport,
        *,
        current: bool = False,
        codec_of: Mapping[Compression, Compression] = AS_NAMED,
        own_in: Callable[[Any], Any] | None = None,
        refresh: bool = True,
    ) -> Received | None:
        """What `module` gets from the other patches in this step. `own`: this step's
        messages (a pytree of arrays (..., rows, cols)); `transport(own)` runs their
        exchange (it takes their compressed payloads too). By the kind of exchange:

          none: nothing (None): every patch computes alone.
          sync: `transport(own)`; with `keep_stale` also kept as the stale buffer
            `module.<name>` (created by the first such step), in the codec's form.
          displaced: the stale values, which this step's exchange (compressed by the codec)
            replaces for the next step; with `refresh` False nothing is exchanged and the
            stale buffer stays.
          local: the stale values; no collective runs.

        current: the module always takes this step's values and keeps no stale buffer (sync
        in displaced steps too, nothing in local ones), as it declares where it is built.
        codec_of: the codec these messages go through under each `compress`
            (`sharding.codecs.AS_NAMED`, `HALO`, `EXACT`).
        own_in: where `own` sits in `transport(own)` (see `sharding.codecs.Codec`).
        """
        exchange = self.exchange
        if current:
            exchange = "sync" if self.exchanges else "none"
        if exchange == "none":
            return None
        codec = CODECS[codec_of[self.compress]]
        if exchange == "sync":
            fresh = transport(own)
            if self.keep_stale and not current:
                _store(module, name, codec.initial(own, fresh, own_in))
            return Received(fresh, stale=False)
        state = getattr(module, name).get_value()
        if exchange == "displaced" and refresh:
            _store(module, name, codec.exchange(state, own, transport, own_in))
        return Received(codec.read(state, jax.tree.leaves(own)[0].dtype), stale=True)


def _store(module: nnx.Module, name: str, value: Any) -> None:
    if hasattr(module, name):
        getattr(module, name).set_value(value)
    else:
        setattr(module, name, StaleBuffer(value))


class PatchPrimitive(nnx.Module):
    """A layer that needs context from the other patches; `patch` says how it gets it in
    this step (None: on one device, the plain layer)."""

    patch: PatchContext | None = None


def set_patch_context(model: nnx.Module, context: PatchContext | None) -> None:
    """Tells every patch-parallel primitive of `model` how to behave in this step."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, PatchPrimitive):
            module.patch = context

"""What a patch-parallel primitive needs to know inside the parallel program, what it receives
from the other patches, and the stale buffers it keeps between denoising steps.

The primitives (`Conv2d`, `GroupNorm`, `KVExchange`) are `PatchPrimitive`s with a `patch`
attribute: None on one device (they are the plain layers), or the `PatchContext` that the
denoising loop sets on a copy of the model inside `shard_map` (`set_patch_context`). The
models never see it. How each kind of exchange behaves is written once, in
`PatchContext.receive`; a primitive only says what it sends and how it uses what it gets.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.codecs import AS_NAMED, CODECS, Transport
from sharding.names import Compression, GroupNormRule
from sharding.split import Split

Exchange = Literal["sync", "displaced", "none", "local"]
AXIS = "patch"


class StaleBuffer(nnx.Variable):
    """What a primitive keeps between denoising steps: its own message of the previous step
    (halo rows, GroupNorm moments, keys and values, in the codec's form), which the next
    displaced step exchanges and reads in place of the other patches' current values; with
    `PatchContext.hold_kv` also the K/V last received."""


@dataclasses.dataclass(frozen=True)
class Received:
    """What a primitive got from the other patches: `value` (the structure of what its
    transport returns), from this step (`stale` False) or from an earlier one (`stale` True)."""

    value: Any
    stale: bool


@dataclasses.dataclass(frozen=True)
class PatchContext:
    """How the primitives behave in this denoising step on this device.

    Where this device's slab sits in the whole image (what a transformer's token positions
    need: `first_row`, `first_column`), one rule: along the side the patches cut (`side`),
    at this patch's first real row (column) of that side's split (`naive_slabs` in naive
    steps, `split` in the others, P equal slabs where it is None), scaled to the feature
    map; along the other side at 0, since the slab holds all of it.

    patches: P, the devices along the mesh axis `AXIS`; this device's patch is
        `jax.lax.axis_index(AXIS)`, its rows of every feature map as `split` says.
    exchange: "sync" (context from the other patches' current activations: exact),
        "displaced" (context from their previous-step activations: the messages each patch
        kept in the step before are exchanged in this step, while it computes up to the
        layer that reads them), "none" (no context: naive patches), "local" (a displaced
        step's computation, each collective replaced by a local stand-in of its shape
        (`gather`, `permute`): what one device computes, run on one device to time it).
    group_norm: the GroupNorm rule of displaced steps (see `sharding.group_norm`).
    keep_stale: synchronous steps also keep their messages as stale buffers (the warm-up
        steps before displaced ones).
    local_index: the patch a "local" step computes (there is no mesh axis to ask).
    compress: the codec of the displaced exchanges and the stale buffers of the primitives
        that allow one (`sharding.codecs`); synchronous steps exchange exact values.
    send_kv: whether a displaced step keeps its self-attention keys and values as the
        message of the next step (`ParallelConfig.kv_refresh`: every K-th step).
    receive_kv: whether a displaced step exchanges the kept K/V message (the step after one
        that sent); else it reads the K/V it holds from the last exchange.
    hold_kv: the K/V stale buffers also hold the K/V last received, for the steps that do
        not exchange (kv_refresh > 1).
    split: the latent's rows of each patch (`sharding.split`) where they are unequal: each
        device's arrays hold `split.slab` rows at the latent's level, its real rows first;
        None: every patch's rows are real, rows [i*h/P, (i+1)*h/P) of a feature map of
        height h.
    width: the latent's width, with `split` (to find a token sequence's rows:
        `uneven_tokens`).
    naive_slabs: in naive steps, where each device runs its slab's real rows (columns)
        alone (`sharding.loops.predict_real`) and `split` is None: the latent's split of
        `side`, which says where each patch's slab begins; else None.
    side: the side the patches cut: "row" (row slabs, in every mode), or "col" (the
        column slabs of naive steps: `ParallelConfig.naive_split` "col", and the odd steps
        of "alternate").
    """

    patches: int
    exchange: Exchange
    group_norm: GroupNormRule = "corrected"
    keep_stale: bool = False
    local_index: int = 1
    compress: Compression = "none"
    send_kv: bool = True
    receive_kv: bool = True
    hold_kv: bool = False
    split: Split | None = None
    width: int = 0
    naive_slabs: Split | None = None
    side: Literal["row", "col"] = "row"

    def index(self) -> jax.Array:
        """This device's patch, i."""
        if self.exchange == "local":
            return jnp.int32(self.local_index)
        return jax.lax.axis_index(AXIS)

    def uneven(self, rows: int) -> Split | None:
        """The split of a feature map whose device arrays hold `rows` rows, where some patch
        has padding rows after its real ones; None where every row is real."""
        if self.split is None or self.split.even:
            return None
        return self.split.at(rows)

    def uneven_tokens(self, tokens: int) -> tuple[Split, int] | None:
        """For a row-major sequence of `tokens` image tokens of this device, where some
        patch has padding rows: (the split of its rows, tokens per row); else None. The
        tokens are those of a feature map at a power of 2 of the latent's resolution (a
        UNet or VAE level, a transformer's patches): the one whose slab x width is `tokens`.
        """
        if self.split is None or self.split.even:
            return None
        for level in range(-8, 9):
            scale = Fraction(2) ** level
            rows, width = self.split.slab * scale, math.ceil(self.width * scale)
            if rows.denominator == 1 and rows * width == tokens:
                return self.split.at(int(rows)), width
        raise ValueError(
            f"{tokens} tokens are not a feature map of the {self.split.size}x{self.width} "
            "latent at a power of 2 of its resolution"
        )

    def first_row(self, rows: int) -> jax.Array:
        """This patch's first real row in the whole feature map whose device arrays hold
        `rows` rows: 0 on column slabs (see the class's rule)."""
        if self.side == "col":
            return jnp.int32(0)
        return self._first_along_cut(rows)

    def first_column(self, columns: int) -> jax.Array:
        """This patch's first real column in the whole feature map whose device arrays hold
        `columns` columns: 0 on row slabs (see the class's rule)."""
        if self.side == "row":
            return jnp.int32(0)
        return self._first_along_cut(columns)

    def _first_along_cut(self, size: int) -> jax.Array:
        """This patch's first real row (column) along the cut side, in a feature map whose
        device arrays hold `size` of them. In a naive step (`naive_slabs`) the model runs on
        the real ones alone: this patch's first latent row scaled by `size` over its real
        latent rows, exact where those are whole multiples of the scale, as a transformer's
        token rows are."""
        index = self.index()
        if self.naive_slabs is not None:
            split = self.naive_slabs
            return split.first_row(index) * size // split.real_rows(index)
        split = self.uneven(size)
        if split is None:
            return index * size
        return split.first_row(index)

    @property
    def exchanges(self) -> bool:
        """Whether collectives run (not in naive or local steps)."""
        return self.exchange not in ("none", "local")

    def gather(self, x: jax.Array, axis: int) -> jax.Array:
        """Every patch's `x`, stacked along a new `axis` in patch order (`all_gather`); in
        a local step P copies of `x`."""
        if self.exchange == "local":
            return jnp.stack([x] * self.patches, axis=axis)
        return jax.lax.all_gather(x, AXIS, axis=axis)

    def permute(self, x: jax.Array, pairs: list[tuple[int, int]]) -> jax.Array:
        """`x` sent from patch a to patch b for each (a, b) of `pairs`, zeros where nothing
        arrives (`ppermute`); in a local step `x` itself."""
        if self.exchange == "local":
            return x
        return jax.lax.ppermute(x, AXIS, pairs)

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
        kv: bool = False,
    ) -> Received | None:
        """What `module` gets from the other patches in this step. `own`: this step's
        messages (a pytree of arrays (..., rows, cols)); `transport(messages)` runs their
        exchange through `gather` or `permute` (it takes their compressed payloads too). By
        the kind of exchange:

          none: nothing (None): every patch computes alone.
          sync: `transport(own)`; with `keep_stale` the codec's state of this message is
            kept as the stale buffer `module.<name>` (created by the first such step).
          displaced, local: the stale values: the exchange of the message the stale buffer
            kept (the previous step's), then `own` kept as the next message. A module that
            `sends_when_produced` instead reads what the exchange of the previous step's
            message delivered (kept in the stale buffer, `received`) and exchanges `own`
            at once, for the next step.

        current: the module always takes this step's values and keeps no stale buffer (sync
            in displaced steps too, nothing in local ones), as it declares where it is built.
        codec_of: the codec these messages go through under each `compress`
            (`sharding.codecs.AS_NAMED`, `HALO`, `EXACT`).
        own_in: where `own` sits in `transport(own)` (see `sharding.codecs.Codec`).
        kv: these are self-attention keys and values (`send_kv`, `receive_kv`, `hold_kv`).
        """
        exchange = self.exchange
        if current:
            exchange = "sync" if self.exchanges else "none"
        if exchange == "none":
            return None
        codec = CODECS[codec_of[self.compress]]
        dtype = jax.tree.leaves(own)[0].dtype
        produced = module.sends_when_produced
        # Kept beside the codec's state, where that does not hold it (`holds_received`):
        # what a step reads where it exchanges nothing, the K/V last received (kv_refresh >
        # 1) or what a message sent when produced delivered.
        with_received = (produced or (kv and self.hold_kv)) and not codec.holds_received

        def last_received(stored: Any) -> Any:
            return stored["received"] if with_received else codec.last_received(stored)

        def store(state: Any, received: Any) -> None:
            _store(
                module, name, {"message": state, "received": received} if with_received else state
            )

        if exchange == "sync":
            fresh = transport(own)
            if self.keep_stale and not current:
                state, received = codec.initial(own, fresh, own_in), fresh
                if produced and not codec.initial_receives_exactly:
                    received, state = codec.receive(state, transport, dtype)
                store(state, received)
            return Received(fresh, stale=False)
        stored = getattr(module, name).get_value()
        state = stored["message"] if with_received else stored
        sends = not kv or self.send_kv
        if produced:  # read what the step before delivered; send this step's own now
            value = received = last_received(stored)
            if sends:
                state = codec.keep(state, own, own_in)
                received, state = codec.receive(state, transport, dtype)
            store(state, received)
            return Received(value, stale=True)
        if not kv or self.receive_kv:
            value, state = codec.receive(state, transport, dtype)
        else:
            value = last_received(stored)
        if sends:
            state = codec.keep(state, own, own_in)
        store(state, value)
        return Received(value, stale=True)


def _store(module: nnx.Module, name: str, value: Any) -> None:
    if hasattr(module, name):
        getattr(module, name).set_value(value)
    else:
        setattr(module, name, StaleBuffer(value))


class PatchPrimitive(nnx.Module):
    """A layer that needs context from the other patches; `patch` says how it gets it in
    this step (None: on one device, the plain layer).

    `sends_when_produced`: in displaced steps the primitive exchanges its message right
    after producing it, in the step that produced it, and keeps what arrives for the next
    step: the exchange travels while the rest of that step computes. Otherwise (the
    default) the next step exchanges the message at its start, and it travels while that
    step computes up to the layer. A model marks the primitives of its first layers, where
    the rest of the step is longer than what comes before (`send_when_produced`); the values
    read are the same either way, the stale buffer holds what arrived instead of the own
    message.
    """

    patch: PatchContext | None = None
    sends_when_produced: bool = False


def send_when_produced(module: nnx.Module) -> None:
    """Marks every patch-parallel primitive of `module` as `sends_when_produced`."""
    for _, inner in nnx.iter_modules(module):
        if isinstance(inner, PatchPrimitive):
            inner.sends_when_produced = True


def set_patch_context(model: nnx.Module, context: PatchContext | None) -> None:
    """Tells every patch-parallel primitive of `model` how to behave in this step."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, PatchPrimitive):
            module.patch = context

"""How displaced steps compress what they exchange and keep (`ParallelConfig.compress`).

A primitive's exchange is a pytree of messages, each an array (..., rows, cols): K/V are
(2, B, tokens, heads * head_dim) per patch, a conv halo's rows (B, rows * W, C). A
`Quantizer` turns one message into a `Payload` of packed integer codes and float32 scales
(per row: a token or a pixel; for 1 bit also per column) and back; every leading axis is a
batch axis, so the payloads a collective stacks decode together. A codec says what a
primitive keeps between steps and what its displaced step sends:

  none (`Exact`): the values themselves, today's exchange.
  fp8, int8 (`Quantized`): the quantized values are sent and kept as received (codes and
    scales, decoded when the next step reads them): the stale memory shrinks as the traffic.
  residual-int4, residual-int2, residual-1bit (`Residual`): sender and receivers hold the
    same base, the reconstruction of what was sent before (a synchronous step's exact
    values to begin with); a displaced step sends the quantized difference between its
    values and the base, and both sides add its decoded value to their base (error
    feedback: what one step rounds away is in the next step's difference, so errors do not
    accumulate). The stale values are the base, kept in the values' dtype.

`CODECS` maps each name of `sharding.names.COMPRESSIONS` to its codec; a primitive picks its
codec through one of the maps below (its `PatchContext.receive` call says which).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from sharding.names import COMPRESSIONS, Compression

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# residual-int2's step, in mean absolute values of the row: levels +-0.6 m and +-1.8 m, near
# the 4-level Lloyd-Max quantizer of a Gaussian (+-0.56 m, +-1.89 m).
TWO_BIT_STEP = 1.2

Messages = Any  # a pytree of arrays (..., rows, cols)
Transport = Callable[[Any], Any]  # sends a pytree of messages (or their payloads) over the mesh


@dataclasses.dataclass(frozen=True)
class Payload:
    """One quantized message (..., rows, cols): `codes` (..., rows, packed) integers,
    `row_scale` (..., rows, 1) and, for 1 bit, `col_scale` (..., 1, cols), float32; `cols`
    the message's columns (the packing pads them to whole bytes)."""

    codes: jax.Array
    row_scale: jax.Array
    col_scale: jax.Array | None
    cols: int


jax.tree_util.register_dataclass(
    Payload, data_fields=["codes", "row_scale", "col_scale"], meta_fields=["cols"]
)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """(..., n) unsigned codes below 2**bits (bits 1, 2 or 4) -> (..., ceil(n * bits / 8))
    uint8: 8 / bits codes per byte, the first in the lowest bits (the bit stream of the codes,
    each least significant bit first, as `numpy.packbits(..., bitorder="little")`)."""
    per_byte = 8 // bits
    padding = [(0, 0)] * (codes.ndim - 1) + [(0, -codes.shape[-1] % per_byte)]
    grouped = jnp.pad(codes.astype(jnp.uint8), padding).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    return jnp.sum(grouped << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bits: sum == or


def unpack(packed: jax.Array, bits: int, count: int) -> jax.Array:
    """`pack`'s inverse: (..., bytes) uint8 -> the first `count` codes (..., count), uint8."""
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    codes = (packed[..., None] >> shifts) & jnp.uint8(2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def _safe(scale: jax.Array) -> jax.Array:
    """The scale to divide by: 1 where it is 0 (an all-zero row, whose codes are then 0)."""
    return jnp.where(scale > 0, scale, 1.0)


def _abs_max(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x), axis=-1, keepdims=True)


class Quantizer(Protocol):
    def encode(self, x: jax.Array) -> Payload:
        """x: (..., rows, cols) float32."""
        ...

    def decode(self, payload: Payload) -> jax.Array:
        """-> (..., rows, cols) float32; an all-zero payload (what a partial permutation
        leaves at the image's edges) decodes to zeros."""
        ...


@dataclasses.dataclass(frozen=True)
class SymmetricInt:
    """Integers q in [-L, L], L = 2**(bits-1) - 1, times the row's absolute maximum / L:
    x ~ q * s, s = max|x_row| / L, q = round(x / s). 8 bits: int8 codes; 4 bits: q + L
    packed two per byte."""

    bits: int

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encode(self, x: jax.Array) -> Payload:
        scale = _abs_max(x) / self.levels
        q = jnp.clip(jnp.round(x / _safe(scale)), -self.levels, self.levels)
        codes = q.astype(jnp.int8) if self.bits == 8 else pack(q + self.levels, self.bits)
        return Payload(codes, scale, None, x.shape[-1])

    def decode(self, payload: Payload) -> jax.Array:
        q = payload.codes.astype(jnp.float32)
        if self.bits != 8:
            q = unpack(payload.codes, self.bits, payload.cols).astype(jnp.float32) - self.levels
        return q * payload.row_scale


@dataclasses.dataclass(frozen=True)
class TwoBit:
    """Four levels without zero, a uniform step s = TWO_BIT_STEP * mean|x_row|:
    x ~ (q + 1/2) s, q = clip(floor(x / s), -2, 1); codes q + 2 packed four per byte."""

    bits: int = 2

    def encode(self, x: jax.Array) -> Payload:
        scale = TWO_BIT_STEP * jnp.mean(jnp.abs(x), axis=-1, keepdims=True)
        q = jnp.clip(jnp.floor(x / _safe(scale)), -2, 1)
        return Payload(pack(q + 2, self.bits), scale, None, x.shape[-1])

    def decode(self, payload: Payload) -> jax.Array:
        q = unpack(payload.codes, self.bits, payload.cols).astype(jnp.float32) - 2
        return (q + 0.5) * payload.row_scale


@dataclasses.dataclass(frozen=True)
class Sign:
    """One bit, the sign, times a rank-1 scale: x_ij ~ sign(x_ij) r_i c_j with r_i the row's
    mean |x| and c_j the column's mean |x| over the mean |x| of the message (exact for
    |x| = u v^T); the bits x > 0 packed eight per byte."""

    bits: int = 1

    def encode(self, x: jax.Array) -> Payload:
        magnitude = jnp.abs(x)
        rows = jnp.mean(magnitude, axis=-1, keepdims=True)
        cols = jnp.mean(magnitude, axis=-2, keepdims=True)
        total = jnp.mean(cols, axis=-1, keepdims=True)
        return Payload(pack(x > 0, self.bits), rows, cols / _safe(total), x.shape[-1])

    def decode(self, payload: Payload) -> jax.Array:
        positive = unpack(payload.codes, self.bits, payload.cols) == 1
        return jnp.where(positive, 1.0, -1.0) * payload.row_scale * payload.col_scale


@dataclasses.dataclass(frozen=True)
class Fp8:
    """float8_e4m3fn of x / s, s = max|x_row| / FP8_MAX (the codes are its bits, uint8)."""

    bits: int = 8

    def encode(self, x: jax.Array) -> Payload:
        scale = _abs_max(x) / FP8_MAX
        y = jnp.clip(x / _safe(scale), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
        return Payload(jax.lax.bitcast_convert_type(y, jnp.uint8), scale, None, x.shape[-1])

    def decode(self, payload: Payload) -> jax.Array:
        y = jax.lax.bitcast_convert_type(payload.codes, jnp.float8_e4m3fn)
        return y.astype(jnp.float32) * payload.row_scale


def _is_payload(x: Any) -> bool:
    return isinstance(x, Payload)


def encode(quantizer: Quantizer, messages: Messages) -> Any:
    """Every message of the pytree, quantized."""
    return jax.tree.map(lambda x: quantizer.encode(x.astype(jnp.float32)), messages)


def decode(quantizer: Quantizer, payloads: Any, dtype) -> Messages:
    """Every payload of the pytree, decoded to `dtype`."""
    return jax.tree.map(lambda p: quantizer.decode(p).astype(dtype), payloads, is_leaf=_is_payload)


class Codec(Protocol):
    """What a primitive keeps between steps (its state, a pytree) and what it sends.

    A displaced step exchanges what the step before kept (`receive`, on values that exist
    when the step starts, so the exchange can travel while the step computes up to the
    layer that reads it) and keeps its own values for the next step (`keep`): each device
    holds its own message between steps, not what the others sent.

    own: this patch's messages; received: what `transport(own)` gives (every patch's, or the
    neighbours'); own_in: where `own` sits in `received`, if it does (K/V are all-gathered,
    own included), else None (a residual codec then keeps a copy of what it sent)."""

    initial_receives_exactly: bool
    """Whether `receive` of the `initial` state gives `received` and that state unchanged
    (a step after a synchronous one can read `received` without an exchange)."""
    holds_received: bool
    """Whether the state holds what the last `receive` gave (`last_received`): a step that
    exchanges nothing reads it there, not from a copy kept beside the state."""

    def initial(self, own: Messages, received: Messages, own_in: Callable | None) -> Any:
        """The state after a synchronous step that sent `own` exactly and got `received`:
        what the next step's `receive` exchanges."""
        ...

    def receive(self, state: Any, transport: Transport, dtype) -> tuple[Messages, Any]:
        """Exchanges the kept message: (the stale values, in the structure of `received`
        and `dtype`; the state after it)."""
        ...

    def keep(self, state: Any, own: Messages, own_in: Callable | None) -> Any:
        """The state that holds this step's `own` (compressed) as the next message."""
        ...

    def last_received(self, state: Any) -> Messages:
        """What the last `receive` gave (only codecs that `holds_received`)."""
        ...


class Exact:
    """none: the values, sent as they are; the state is the message."""

    initial_receives_exactly = True
    holds_received = False

    def initial(self, own, received, own_in):
        return own

    def receive(self, state, transport, dtype):
        return transport(state), state

    def keep(self, state, own, own_in):
        return own


@dataclasses.dataclass(frozen=True)
class Quantized:
    """fp8, int8: each step's values quantized; the state is the message's payload."""

    quantizer: Quantizer
    initial_receives_exactly = False  # the payload of a synchronous step's values, rounded
    holds_received = False

    def initial(self, own, received, own_in):
        return encode(self.quantizer, own)

    def receive(self, state, transport, dtype):
        return decode(self.quantizer, transport(state), dtype), state

    def keep(self, state, own, own_in):
        return encode(self.quantizer, own)


@dataclasses.dataclass(frozen=True)
class Residual:
    """residual-*: the quantized difference from a base both sides hold (error feedback).

    State: {"base": the reconstruction of what was received, "message": the payload to
    send next} and, where `own_in` is None, {"sent": the reconstruction of what this patch
    sent, the message included}, in the values' dtype; reconstructions are updated in
    float32. A synchronous step's message is the difference zero: the next step's base is
    that step's exact values."""

    quantizer: Quantizer
    initial_receives_exactly = True  # the base plus a zero difference
    holds_received = True  # the base

    def initial(self, own, received, own_in):
        zero = jax.tree.map(lambda x: self.quantizer.encode(jnp.zeros(x.shape, jnp.float32)), own)
        state = {"base": received, "message": zero}
        return state if own_in is not None else {**state, "sent": own}

    def receive(self, state, transport, dtype):
        base = jax.tree.map(self._add, state["base"], transport(state["message"]))
        return base, {**state, "base": base}

    def keep(self, state, own, own_in):
        sent = own_in(state["base"]) if own_in is not None else state["sent"]
        message = jax.tree.map(
            lambda x, s: self.quantizer.encode(x.astype(jnp.float32) - s.astype(jnp.float32)),
            own,
            sent,
        )
        state = {**state, "message": message}
        if own_in is None:
            state["sent"] = jax.tree.map(self._add, sent, message)
        return state

    def last_received(self, state):
        return state["base"]

    def _add(self, values: jax.Array, payload: Payload) -> jax.Array:
        return (values.astype(jnp.float32) + self.quantizer.decode(payload)).astype(values.dtype)


CODECS: dict[Compression, Codec] = {
    "none": Exact(),
    "fp8": Quantized(Fp8()),
    "int8": Quantized(SymmetricInt(8)),
    "residual-int4": Residual(SymmetricInt(4)),
    "residual-int2": Residual(TwoBit()),
    "residual-1bit": Residual(Sign()),
}
assert tuple(CODECS) == COMPRESSIONS, "sharding.names.COMPRESSIONS names the codecs in order"

# The codec a kind of message goes through under each `ParallelConfig.compress`:
# self-attention K/V, the bulk of the exchange, the named one;
AS_NAMED: dict[Compression, Compression] = {name: name for name in COMPRESSIONS}
# conv halos at 4 bits or more: they are a few rows per patch, a small share of the
# exchange, but each feeds a conv output at the seam directly, and below 4 bits the seams
# show (docs/compression.md);
HALO: dict[Compression, Compression] = {
    **AS_NAMED,
    "residual-int2": "residual-int4",
    "residual-1bit": "residual-int4",
}
# GroupNorm moments exact: tiny, and a variance's precision matters.
EXACT: dict[Compression, Compression] = {name: "none" for name in COMPRESSIONS}

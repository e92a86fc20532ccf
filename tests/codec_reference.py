"""The codecs of `sharding.codecs` written again from their formulas, in float64 numpy (fp8
rounding by `ml_dtypes`): the oracle of the codec tests and of the sequential references'
compressed runs. Nothing here calls jaxfusion.

A message is an array (..., rows, cols); every leading axis is a batch axis.

  int8, residual-int4: q = clip(round(x / s), -L, L), s = max_row |x| / L, L = 2**(b-1) - 1;
    x^ = q s.
  residual-int2: q = clip(floor(x / s), -2, 1), s = 1.2 mean_row |x|; x^ = (q + 1/2) s.
  residual-1bit: x^ = sign(x) r c (sign(0) = -1), r = mean_row |x|, c = mean_col |x| /
    mean |x| (over the message).
  fp8: x^ = e4m3(x / s) s, s = max_row |x| / 448.
  An all-zero row has scale 0 and decodes to 0.

`quantize` gives x^ and the integer codes (what is packed: q + L, q + 2, x > 0, the fp8
bits); `Channel` is one message stream between a sender and its receivers: what the
receivers hold after each send (the stale values a displaced step reads).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

INTEGER_BITS = {"int8": 8, "residual-int4": 4}
RESIDUAL = ("residual-int4", "residual-int2", "residual-1bit")
CODEC_NAMES = ("none", "fp8", "int8", "residual-int4", "residual-int2", "residual-1bit")
CODE_BITS = {"fp8": 8, "int8": 8, "residual-int4": 4, "residual-int2": 2, "residual-1bit": 1}


def _divide(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.where(scale > 0, scale, 1.0)


def continuous(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, scale): what the rounding of codec `name` rounds (x over its scale), float64."""
    x = np.asarray(x, np.float64)
    if name in INTEGER_BITS:
        scale = np.abs(x).max(-1, keepdims=True) / (2 ** (INTEGER_BITS[name] - 1) - 1)
    elif name == "residual-int2":
        scale = 1.2 * np.abs(x).mean(-1, keepdims=True)
    elif name == "fp8":
        scale = np.abs(x).max(-1, keepdims=True) / 448.0
    elif name == "residual-1bit":
        rows = np.abs(x).mean(-1, keepdims=True)
        cols = np.abs(x).mean(-2, keepdims=True)
        return x, rows * _divide(cols, cols.mean(-1, keepdims=True))
    else:
        raise ValueError(name)
    return _divide(x, scale), scale


def round_codes(name: str, t: np.ndarray) -> np.ndarray:
    """The integer codes of the rounded t (see the module docstring)."""
    if name in INTEGER_BITS:
        levels = 2 ** (INTEGER_BITS[name] - 1) - 1
        return np.clip(np.round(t), -levels, levels).astype(np.int64) + levels
    if name == "residual-int2":
        return np.clip(np.floor(t), -2, 1).astype(np.int64) + 2
    if name == "residual-1bit":
        return (t > 0).astype(np.int64)
    if name == "fp8":
        return np.clip(t, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int64)
    raise ValueError(name)


def dequantize(name: str, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x^ from the codes and the scale `continuous` gives."""
    if name in INTEGER_BITS:
        return (codes - (2 ** (INTEGER_BITS[name] - 1) - 1)) * scale
    if name == "residual-int2":
        return (codes - 2 + 0.5) * scale
    if name == "residual-1bit":
        return np.where(codes == 1, 1.0, -1.0) * scale
    if name == "fp8":
        values = codes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return values * scale
    raise ValueError(name)


def quantize(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x^, codes) of message `x` under codec `name` (x^ = x for "none")."""
    if name == "none":
        return np.asarray(x, np.float64), None
    t, scale = continuous(name, x)
    codes = round_codes(name, t)
    return dequantize(name, codes, scale), codes


def ambiguous(name: str, x: np.ndarray, tolerance: float = 1e-4) -> np.ndarray:
    """Where a float32 computation of t may round to another code than float64's: t within
    `tolerance` (relative, and absolute near 0) of a decision boundary."""
    t, _ = continuous(name, x)
    margin = tolerance * np.maximum(np.abs(t), 1.0)
    return round_codes(name, t - margin) != round_codes(name, t + margin)


def packed_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The bytes of (..., n) codes of `bits` bits: the stream of each code's bits, least
    significant first, in code order, 8 to a byte, the first in the lowest bit
    (`numpy.packbits(bitorder="little")`), zero-padded."""
    shifts = np.arange(bits)
    stream = (codes[..., :, None] >> shifts) & 1
    stream = stream.reshape(*codes.shape[:-1], -1).astype(np.uint8)
    return np.packbits(stream, axis=-1, bitorder="little")


class Channel:
    """One message stream under codec `name`: `send(x, exact)` returns what the receivers
    hold afterwards. exact (a synchronous step): x itself, which also starts the residual
    codecs' base; quantized codecs keep x^ as they store it. Otherwise: x^ (fp8, int8), or
    base + (x - base)^ (residual: the base becomes that)."""

    def __init__(self, name: str):
        if name not in CODEC_NAMES:
            raise ValueError(name)
        self.name = name
        self.base = None

    def send(self, x: np.ndarray, exact: bool) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.name not in RESIDUAL:
            return quantize(self.name, x)[0]
        if exact:
            self.base = x
        else:
            self.base = self.base + quantize(self.name, x - self.base)[0]
        return self.base

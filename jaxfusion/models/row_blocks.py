"""Row-blocked GroupNorm -> SiLU -> 3x3 conv and 2x nearest upsample -> 3x3 conv, for the
VAE decoder's high-resolution layers: exact, with temporaries of one block of rows.

At 3840x3840 a full-resolution activation of 256 channels is 7.5 GB in bfloat16, and the
plain layers materialize its float32 normalized copy, the SiLU output, the padded conv input
and the upsampled tensor. Here GroupNorm's statistics come from one reduction over the whole
(local) image, through `GroupNorm.moments_of_image` (so the patch-parallel decode's image
statistics are used as they are); then blocks of rows, each with one halo row on either
side, are normalized, activated and convolved in a `fori_loop` that writes the output in
place. The halo rows at the local image's edges come from `Conv2d.receive_halo` (zeros on
one device, the neighbours' rows in `sharding.rows.map_rows`); where padding rows follow a
patch's real rows (`sharding.split`), the statistics are the real rows' and the halo from
below goes after the last real row.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import sharding

# A layer whose input exceeds this many bytes is row-blocked; each block holds about
# BLOCK_BYTES of float32 input rows.
THRESHOLD_BYTES = 512 * 2**20
BLOCK_BYTES = 64 * 2**20


class RowBlocking:
    """A layer that runs by blocks of rows when its input exceeds `row_blocks_threshold`
    bytes (None: never), each block holding about `row_block_bytes` (`set_row_blocks`)."""

    row_blocks_threshold: int | None
    row_block_bytes: int


def applies(x: jax.Array, threshold_bytes: int | None) -> bool:
    """Whether a layer with input `x` runs row-blocked (never when `threshold_bytes` is None)."""
    return threshold_bytes is not None and x.size * x.dtype.itemsize > threshold_bytes


def _block_rows(x: jax.Array, block_bytes: int) -> int:
    """The largest divisor R of x's height with B * R * W * C float32 values in `block_bytes`."""
    b, h, w, c = x.shape
    fit = max(1, block_bytes // (b * w * c * 4))
    return max(r for r in range(1, min(fit, h) + 1) if h % r == 0)


def _rows(x: jax.Array, start: jax.Array, rows: int) -> jax.Array:
    """x's rows [start, start + rows), behind an optimization barrier: XLA would otherwise
    hoist the loop-invariant conversions of the blocks out of the loop, as one full-size
    float32 copy of x."""
    return jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1))


def _row_sums(x: jax.Array, rows: int, term, real_rows: jax.Array | None) -> jax.Array:
    """sum over x's rows (its first `real_rows`; None: all), columns and the last axis of
    term(block) (float32), block by block, so that no float32 copy of x is made."""
    blocks = x.shape[1] // rows

    def body(i, total):
        block = term(_rows(x, i * rows, rows))
        if real_rows is not None:
            real = i * rows + jnp.arange(rows) < real_rows
            block = jnp.where(real[None, :, None, None, None], block, 0.0)
        return total + block.sum(axis=(1, 2, 4))

    zeros = jnp.zeros(term(x[:, :1]).shape[:1] + term(x[:, :1]).shape[3:4], jnp.float32)
    return jax.lax.fori_loop(0, blocks, body, zeros)


def _normalizer(norm: sharding.GroupNorm, x: jax.Array, rows: int):
    """`norm` followed by SiLU as a function of rows of `x`, with the statistics of all of `x`
    (and of the other patches: `moments_of_image`): the mean, then the mean squared
    deviation from it, as `GroupNorm` computes them, summed by blocks of `rows` rows."""
    b, h, w, c = x.shape
    groups = norm.num_groups
    split = None if norm.patch is None else norm.patch.uneven(h)
    real_rows = None if split is None else split.real_rows(norm.patch.index())
    count = (h if real_rows is None else real_rows) * w * (c // groups)

    def grouped(rows: jax.Array) -> jax.Array:
        return rows.astype(jnp.float32).reshape(b, rows.shape[1], w, groups, c // groups)

    def deviation(rows: jax.Array) -> jax.Array:
        return jnp.square(grouped(rows) - mean[:, None, None, :, None])

    mean = _row_sums(x, rows, grouped, real_rows) / count
    variance = _row_sums(x, rows, deviation, real_rows) / count
    mean, var = norm.moments_of_image(jnp.stack([mean, variance]), split)
    inv_std = jax.lax.rsqrt(var + norm.epsilon)
    scale = norm.scale[...].astype(jnp.float32)
    bias = norm.bias[...].astype(jnp.float32)

    def apply(rows: jax.Array) -> jax.Array:
        normed = (grouped(rows) - mean[:, None, None, :, None]) * inv_std[:, None, None, :, None]
        out = normed.reshape(b, rows.shape[1], w, c) * scale + bias
        return jax.nn.silu(out.astype(norm.dtype))

    return apply


def _blocked(
    x: jax.Array,
    prepare,
    conv: sharding.Conv2d,
    *,
    upsample: int,
    block_bytes: int,
    residual: Callable[[jax.Array, int], jax.Array] | None = None,
    output_scale_factor: float = 1.0,
) -> jax.Array:
    """conv(upsample(prepare(x))) [+ residual, / output_scale_factor], by blocks of rows.

    x: (B, H, W, C); `prepare` maps rows of x elementwise (or is the identity); `upsample`
    1 or 2 (nearest); residual(start, rows): the residual's output rows [start, start+rows).
    Returns (B, u*H, u*W, out)."""
    if conv.kernel_size != 3 or conv.stride != 1 or conv.padding != (1, 1):
        raise ValueError("row blocks need a 3x3 convolution with stride 1 and padding 1")
    h = x.shape[1]
    u = upsample
    rows = _block_rows(x, block_bytes // (u * u))
    blocks = h // rows
    # The rows after the real ones (all: h) take the halo from below; where padding rows
    # follow them (`Conv2d.real_rows`) that can be inside a block.
    real_rows = conv.real_rows(h)
    end = h if real_rows is None else real_rows
    first, last = prepare(x[:, :1]), prepare(jax.lax.dynamic_slice_in_dim(x, end - 1, 1, axis=1))
    halo = conv.receive_halo(first, last) or {
        "above": jnp.zeros_like(first),
        "below": jnp.zeros_like(last),
    }

    def block(i):
        start = i * rows
        middle = prepare(_rows(x, start, rows))
        above = prepare(_rows(x, jnp.maximum(start - 1, 0), 1))
        below = prepare(_rows(x, jnp.minimum(start + rows, h - 1), 1))
        above = jnp.where(i == 0, halo["above"], above)
        window = jnp.concatenate([above, middle, below], axis=1)
        after_real = start - 1 + jnp.arange(rows + 2) == end
        window = jnp.where(after_real[None, :, None, None], halo["below"], window)
        if u > 1:
            window = jnp.repeat(jnp.repeat(window, u, axis=1), u, axis=2)
            window = window[:, u - 1 : window.shape[1] - (u - 1)]
        y = conv.convolve(window)
        if residual is not None:
            y = (residual(u * start, u * rows) + y) / output_scale_factor
        return y.astype(conv.dtype)

    # The output buffer is the first block padded (not zeros), so that it cannot be
    # allocated before the input is there.
    first = block(0)
    out = jnp.pad(first, ((0, 0), (0, u * (h - rows)), (0, 0), (0, 0)))
    return jax.lax.fori_loop(
        1,
        blocks,
        lambda i, out: jax.lax.dynamic_update_slice_in_dim(out, block(i), u * i * rows, axis=1),
        out,
    )


def norm_silu_conv(
    norm: sharding.GroupNorm,
    conv: sharding.Conv2d,
    x: jax.Array,
    *,
    block_bytes: int = BLOCK_BYTES,
    residual: Callable[[jax.Array, int], jax.Array] | None = None,
    output_scale_factor: float = 1.0,
) -> jax.Array:
    """conv(silu(norm(x))) [then (residual + that) / output_scale_factor], (B, H, W, C) ->
    (B, H, W, out), by blocks of rows; equal to the plain layers up to float rounding.
    residual(start, rows): the residual's rows [start, start + rows), (B, rows, W, out)."""
    return _blocked(
        x,
        _normalizer(norm, x, _block_rows(x, block_bytes)),
        conv,
        upsample=1,
        block_bytes=block_bytes,
        residual=residual,
        output_scale_factor=output_scale_factor,
    )


def upsample_conv(conv: sharding.Conv2d, x: jax.Array, *, block_bytes: int = BLOCK_BYTES):
    """conv(2x nearest upsample of x), (B, H, W, C) -> (B, 2H, 2W, out), by blocks of rows,
    never storing the upsampled tensor."""
    return _blocked(x, lambda rows: rows, conv, upsample=2, block_bytes=block_bytes)


def set_row_blocks(model: nnx.Module, threshold_bytes: int | None, block_bytes: int) -> None:
    """Makes every row-blocking layer of `model` (those built with a threshold) block inputs
    over `threshold_bytes` (None: never) in blocks of about `block_bytes`."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, RowBlocking) and module.row_blocks_threshold is not None:
            module.row_blocks_threshold = threshold_bytes
            module.row_block_bytes = block_bytes

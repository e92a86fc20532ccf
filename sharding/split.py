"""Where one side of the image is cut into P slabs, and the equal-shaped device arrays that
hold slabs of unequal real size.

A height that is not P times a multiple of the model's coarsest downsampling still splits:
the slab boundaries sit at multiples of the model's `unit` (2 ** (levels - 1) latent rows for
a UNet), so that every level's boundaries are the same image rows halved, and each device's
array holds `slab` rows, its real rows first and padding after them. The padding rows are
computed like the others but never reach a real output: the primitives read the real rows
only (`sharding.conv`, `sharding.group_norm`, `sharding.attention`).

Why the remainder is spread over the patches rather than left to the last one: every device
computes a whole `slab` either way, so the time is the same, but spreading the units keeps
every patch's real rows within one unit of the others, so that no patch runs out of rows
while the last has many (a patch needs at least one real row at the coarsest level).
"""

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Split:
    """A side of `size` rows (or columns) cut into P = len(counts) slabs: patch i's real rows
    are [starts[i], starts[i] + counts[i]), and every device array holds `slab` rows, the
    real ones first. Even (every count equal to `slab`): no padding, the plain split."""

    size: int
    counts: tuple[int, ...]
    slab: int

    @classmethod
    def of(cls, size: int, patches: int, unit: int) -> "Split":
        """`size` rows over `patches` slabs whose boundaries are multiples of `unit`: the
        size // unit whole units spread as evenly as they go (the first patches take one
        more where they do not divide), the last patch also takes the size % unit rows
        left. Every array holds `slab` = unit x ceil(size / (patches x unit)) rows, the
        least that a split at unit boundaries allows (one patch: `size`, nothing to align).
        ValueError where some patch would get no row: more patches than
        `most_patches(size, unit)`."""
        if patches == 1:
            return cls(size, (size,), size)
        if patches > most_patches(size, unit):
            raise ValueError(
                f"{size} rows do not split into {patches} slabs at multiples of {unit} rows: "
                f"use at most {most_patches(size, unit)}"
            )
        units, rest = divmod(size, unit)
        per_patch, extra = divmod(units, patches)
        counts = [unit * (per_patch + (i < extra)) for i in range(patches)]
        counts[-1] += rest
        return cls(size, tuple(counts), unit * math.ceil(size / (patches * unit)))

    @property
    def patches(self) -> int:
        return len(self.counts)

    @property
    def starts(self) -> tuple[int, ...]:
        """The first real row of each patch."""
        return tuple(sum(self.counts[:i]) for i in range(self.patches))

    @property
    def even(self) -> bool:
        """Every slab is real rows only (the device arrays hold the plain split)."""
        return all(count == self.slab for count in self.counts)

    @property
    def shares(self) -> tuple[float, ...]:
        """Each patch's fraction of the real rows."""
        return tuple(count / self.size for count in self.counts)

    def at(self, slab: int) -> "Split":
        """This split at a feature map whose device arrays hold `slab` rows, a power of 2
        finer or coarser: every start scales exactly (they are multiples of the unit), the
        image's end rounds up, as a stride-2 convolution with padding 1 halves an odd size."""
        scale = Fraction(slab, self.slab)
        if any((start * scale).denominator != 1 for start in self.starts):
            raise ValueError(
                f"a feature map of {slab} rows per device is coarser than the split's unit "
                f"allows (slab boundaries {self.starts} of {self.slab} rows): declare the "
                "model's coarsest downsampling as its row_unit"
            )
        ends = [
            math.ceil((start + count) * scale)
            for start, count in zip(self.starts, self.counts, strict=True)
        ]
        starts = [0, *ends[:-1]]
        return Split(
            ends[-1], tuple(end - start for start, end in zip(starts, ends, strict=True)), slab
        )

    def real_rows(self, patch: jax.Array) -> jax.Array:
        """The real rows of device `patch` (a traced index), int32."""
        return jnp.asarray(self.counts, jnp.int32)[patch]

    def first_row(self, patch: jax.Array) -> jax.Array:
        """The first real row of device `patch` in the whole side, int32."""
        return jnp.asarray(self.starts, jnp.int32)[patch]

    def laid_out(self, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
        """The shape of `pad`'s result for an array of `shape`."""
        return (*shape[:axis], self.patches * self.slab, *shape[axis + 1 :])

    def pad(self, x: jax.Array, axis: int) -> jax.Array:
        """The whole side (`size` along `axis`) -> the device arrays' layout (P x `slab`
        along `axis`): each patch's real rows, then zeros up to `slab`."""
        if self.even:
            return x
        parts = []
        for start, count in zip(self.starts, self.counts, strict=True):
            parts.append(jax.lax.slice_in_dim(x, start, start + count, axis=axis))
            parts.append(_zeros_along(x, axis, self.slab - count))
        return jnp.concatenate(parts, axis=axis)

    def unpad(self, x: jax.Array, axis: int) -> jax.Array:
        """The device arrays' layout (P x `slab` along `axis`) -> the whole side: each
        patch's real rows in order (the inverse of `pad`)."""
        if self.even:
            return x
        return jnp.concatenate(
            [
                jax.lax.slice_in_dim(x, i * self.slab, i * self.slab + count, axis=axis)
                for i, count in enumerate(self.counts)
            ],
            axis=axis,
        )


def most_patches(size: int, unit: int) -> int:
    """The most slabs `size` rows split into at multiples of `unit`, each with a real row."""
    return math.ceil(size / unit)


def _zeros_along(x: jax.Array, axis: int, length: int) -> jax.Array:
    shape = list(x.shape)
    shape[axis] = length
    return jnp.zeros(shape, x.dtype)

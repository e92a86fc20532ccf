"""Running a model exactly on row slabs: every primitive exchanges synchronously.

What the VAE decode after the denoising loop needs: the latent stays split by rows, each
device decodes its slab with the neighbours' current halo rows, every patch's GroupNorm sums
and every patch's attention keys and values, and the image comes out split by rows too. The
result equals the single-device model to float32 rounding; no device ever holds the whole
feature maps.
"""

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding.context import AXIS, PatchContext, set_patch_context
from sharding.parallel import DATA_AXIS, ParallelConfig
from sharding.split import Split

ROWS = P(DATA_AXIS, AXIS)


def map_rows(
    model: nnx.Module,
    fn: Callable[[nnx.Module, jax.Array], jax.Array],
    x: jax.Array,
    parallel: ParallelConfig,
    unit: int = 1,
) -> jax.Array:
    """fn(model, x) on the (data, cfg, patch) mesh of `parallel`, exactly.

    x: (B, H, W, C) split by batch over the data axis and by rows over the patch axis
    (replicated over cfg): B must divide by D; the rows split into P slabs at multiples of
    `unit` (what `fn` downsamples by: a VAE encoder's factor over images), of unequal real
    rows where H does not divide (`sharding.split`: laid out for the devices here, and the
    result back). Returns fn's (B, H', ...) result (H' a power of 2 times H) split by rows
    likewise. On one device, plainly fn(model, x).
    """
    if parallel.mode == "single":
        return fn(model, x)
    graphdef, state = nnx.split(model)
    split = Split.of(x.shape[1], parallel.patches, unit)
    context = PatchContext(parallel.patches, "sync", split=split, width=x.shape[2])

    def per_device(state, slab):
        local = nnx.merge(graphdef, state)
        set_patch_context(local, context)
        return fn(local, slab)

    run = jax.shard_map(
        per_device,
        mesh=parallel.mesh(),
        in_specs=(P(), ROWS),
        out_specs=ROWS,
        check_vma=False,
    )
    out = run(state, split.pad(x, 1))
    return split.at(out.shape[1] // parallel.patches).unpad(out, 1)

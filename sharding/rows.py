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

ROWS = P(DATA_AXIS, AXIS)


def map_rows(
    model: nnx.Module,
    fn: Callable[[nnx.Module, jax.Array], jax.Array],
    x: jax.Array,
    parallel: ParallelConfig,
) -> jax.Array:
    """fn(model, x) on the (data, cfg, patch) mesh of `parallel`, exactly.

    x: (B, H, ...) split by batch over the data axis and by rows over the patch axis
    (replicated over cfg): B must divide by D, H by P, and so must every feature map's
    height `fn` makes. Returns fn's (B, H', ...)
    result split by rows likewise. On one device, plainly fn(model, x).
    """
    if parallel.mode == "single":
        return fn(model, x)
    graphdef, state = nnx.split(model)
    context = PatchContext(parallel.patches, "sync")

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
    return run(state, x)

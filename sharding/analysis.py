"""What one step of the patch-parallel program exchanges and keeps, read from its traced
program: no devices, weights or compilation needed (works from `jax.ShapeDtypeStruct`s, so
for a full-size SDXL UNet too)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.context import Exchange, PatchContext
from sharding.loops import Denoiser, Loop, Sampling, step_context, step_function
from sharding.parallel import ParallelConfig

COLLECTIVES = ("ppermute", "all_gather", "psum", "all_to_all", "reduce_scatter", "psum_scatter")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the per-device program: its kind, mesh axes, operand shape and
    dtype on one device, and the bytes one device receives (an interior patch, which has
    both neighbours): ppermute the operand; all_gather (n - 1) operands; all_to_all
    (n - 1) / n of the operand; psum 2 (n - 1) / n of it (ring all-reduce)."""

    kind: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    received_bytes: int


@dataclasses.dataclass(frozen=True)
class TracedStep:
    """The per-device program of one step (`jaxpr`, inside `shard_map`) and the stale
    buffers it reads, as `jax.ShapeDtypeStruct`s of the whole mesh (see `step_function`)."""

    jaxpr: jax.extend.core.Jaxpr
    buffers: nnx.State
    parallel: ParallelConfig

    def collectives(self) -> list[Collective]:
        """Every collective of the step, in program order (inner programs included)."""
        axis_sizes = {"cfg": self.parallel.cfg, "patch": self.parallel.patches}
        return [_collective(eqn, axis_sizes) for eqn in _nested_equations(self.jaxpr)]

    def stale_bytes_per_device(self) -> int:
        """Memory of the stale buffers on one device."""
        devices = self.parallel.cfg * self.parallel.patches
        leaves = jax.tree.leaves(self.buffers)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) // devices


def trace_step(
    denoiser: Denoiser,
    sampling: Sampling,
    latents: jax.ShapeDtypeStruct | jax.Array,
    parallel: ParallelConfig,
    exchange: Exchange,
) -> TracedStep:
    """Traces one step (step 1) of `parallel` with `exchange` ("displaced", "sync" or
    "none") on the mesh's shape, without devices. A displaced step reads the stale buffers
    that a synchronous warm-up step leaves (traced too, for their shapes). `latents`:
    (B, h, w, C), the whole latent."""
    _, weights = nnx.split(denoiser)
    mesh = parallel.mesh(abstract=True)
    buffers = nnx.State({})
    if exchange == "displaced":
        buffers = stale_buffers(denoiser, sampling, latents, parallel)
    context = PatchContext(parallel.patches, exchange, parallel.group_norm)
    state = jax.eval_shape(sampling.schedule.init_state, latents)
    traced = jax.make_jaxpr(step_function(denoiser, parallel, context, mesh))
    closed = traced(weights, buffers, sampling, latents, state, jnp.int32(1))
    (shard_map,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "shard_map"]
    return TracedStep(shard_map.params["jaxpr"], buffers, parallel)


def stale_buffers(
    denoiser: Denoiser,
    sampling: Sampling,
    latents: jax.ShapeDtypeStruct | jax.Array,
    parallel: ParallelConfig,
) -> nnx.State:
    """The stale buffers of a displaced step as `jax.ShapeDtypeStruct`s, each the
    per-device buffers of the whole mesh concatenated along axis 0 (see `step_function`)."""
    _, weights = nnx.split(denoiser)
    warmup = step_context("warm-up", parallel)
    step = step_function(denoiser, parallel, warmup, parallel.mesh(abstract=True))
    state = jax.eval_shape(sampling.schedule.init_state, latents)
    args = (weights, nnx.State({}), sampling, latents, state, jnp.int32(0))
    return jax.eval_shape(step, *args)[2]


def local_step(denoiser: Denoiser, parallel: ParallelConfig, patch: int = 1):
    """What device `patch` computes in a displaced step of `parallel` (C = 1), without the
    exchanges (which only feed the next step), as a function for one device:

        (weights, buffers, sampling, latents, state, i) -> (latents, state)

    buffers: that device's stale buffers (`stale_buffers` with axis 0 divided by P);
    latents: its (B, h / P, w, C) slab. For timing a device's work where the mesh is absent.
    """
    if parallel.cfg != 1:
        raise ValueError("local_step times one patch device: use cfg=1")
    graphdef, _ = nnx.split(denoiser)
    context = PatchContext(parallel.patches, "local", parallel.group_norm, local_index=patch)

    def run(weights, buffers, sampling, latents, state, i):
        loop = Loop.start(graphdef, weights, sampling, parallel)
        return loop.step(context, latents, state, buffers, i)[:2]

    return run


def _nested_equations(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in COLLECTIVES:
            found.append(eqn)
        for param in jax.tree.leaves(eqn.params, is_leaf=lambda p: hasattr(p, "eqns")):
            if hasattr(param, "eqns") or hasattr(param, "jaxpr"):
                found += _nested_equations(getattr(param, "jaxpr", param))
    return found


def _collective(eqn, axis_sizes: dict[str, int]) -> Collective:
    axes = eqn.params["axis_name"]
    axes = axes if isinstance(axes, tuple) else (axes,)
    n = math.prod(axis_sizes[a] for a in axes)
    operand = eqn.invars[0].aval
    size = operand.size * operand.dtype.itemsize
    received = {
        "ppermute": size,
        "all_gather": (n - 1) * size,
        "all_to_all": (n - 1) * size // n,
        "psum": 2 * (n - 1) * size // n,
    }.get(eqn.primitive.name, size)
    return Collective(eqn.primitive.name, axes, operand.shape, str(operand.dtype), received)

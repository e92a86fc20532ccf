"""What one step of the patch-parallel program exchanges and keeps, read from its traced
program: no devices, weights or compilation needed (works from `jax.ShapeDtypeStruct`s, so
for a full-size SDXL UNet too)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding.context import Exchange, PatchContext
from sharding.loops import (
    Denoiser,
    Layout,
    Loop,
    Sampling,
    split_axis,
    step_context,
    step_function,
)
from sharding.parallel import MESH_AXES, ParallelConfig, mesh_order

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
        axis_sizes = dict(zip(MESH_AXES, self.parallel.mesh(abstract=True).axis_sizes, strict=True))
        return [_collective(eqn, axis_sizes) for eqn in _nested_equations(self.jaxpr)]

    def stale_bytes_per_device(self) -> int:
        """Memory of the stale buffers on one device."""
        devices = self.parallel.data * self.parallel.cfg * self.parallel.patches
        leaves = jax.tree.leaves(self.buffers)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) // devices


def trace_step(
    denoiser: Denoiser,
    sampling: Sampling,
    latents: jax.ShapeDtypeStruct | jax.Array,
    parallel: ParallelConfig,
    exchange: Exchange,
    exchange_kv: bool = True,
) -> TracedStep:
    """Traces one step (step 1) of `parallel` with `exchange` ("displaced", "sync" or
    "none") on the mesh's shape, without devices. A displaced step reads the stale buffers
    that a synchronous warm-up step leaves (traced too, for their shapes), and exchanges
    K/V unless `exchange_kv` is False (`ParallelConfig.kv_refresh`). `latents`: (B, h, w,
    C), the whole latent."""
    _, weights = nnx.split(denoiser)
    mesh = parallel.mesh(abstract=True)
    buffers = nnx.State({})
    if exchange == "displaced":
        buffers = stale_buffers(denoiser, sampling, latents, parallel)
    layout, latents = laid_out(denoiser, latents, parallel)
    context = PatchContext(
        parallel.patches,
        exchange,
        parallel.group_norm,
        compress=parallel.compress,
        receive_kv=exchange_kv,
        hold_kv=parallel.kv_refresh > 1,
        split=None if exchange == "none" else layout.split,
        width=latents.shape[2],
    )
    state = jax.eval_shape(sampling.schedule.init_state, latents)
    traced = jax.make_jaxpr(step_function(denoiser, parallel, context, mesh, layout))
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
    layout, latents = laid_out(denoiser, latents, parallel)
    warmup = step_context("warm-up", parallel, layout.split, latents.shape[2])
    step = step_function(denoiser, parallel, warmup, parallel.mesh(abstract=True), layout)
    state = jax.eval_shape(sampling.schedule.init_state, latents)
    args = (weights, nnx.State({}), sampling, latents, state, jnp.int32(0))
    return jax.eval_shape(step, *args)[2]


def laid_out(
    denoiser: Denoiser, latents: jax.ShapeDtypeStruct | jax.Array, parallel: ParallelConfig
) -> tuple[Layout, jax.ShapeDtypeStruct]:
    """The layout of the whole latent `latents` (B, h, w, C) on the patch devices, and the
    shape of the latent laid out for them (`step_function`'s input)."""
    layout = Layout.of(denoiser, latents.shape, parallel)
    shape = layout.split.laid_out(latents.shape, split_axis(parallel))
    return layout, jax.ShapeDtypeStruct(shape, latents.dtype)


def local_step(denoiser: Denoiser, parallel: ParallelConfig, patch: int = 1):
    """What device `patch` computes in a displaced step of `parallel` (C = 1), each
    exchange replaced by a local stand-in of its shape (`PatchContext.gather`, `permute`),
    as a function for one device:

        (weights, buffers, sampling, latents, state, i) -> (latents, state)

    buffers: that device's stale buffers (`stale_buffers` with axis 0 divided by P);
    latents: its (B, h / P, w, C) slab. For timing a device's work where the mesh is absent.
    """
    if parallel.cfg != 1:
        raise ValueError("local_step times one patch device: use cfg=1")
    graphdef, _ = nnx.split(denoiser)
    context = PatchContext(
        parallel.patches,
        "local",
        parallel.group_norm,
        local_index=patch,
        compress=parallel.compress,
        hold_kv=parallel.kv_refresh > 1,
    )

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


@dataclasses.dataclass(frozen=True)
class HostDevice:
    """A stand-in for a device of a multi-host run: its process (host) and global id."""

    process_index: int
    id: int


def host_links(traced: TracedStep, hosts: int, data: int = 1) -> dict[str, dict[str, int]]:
    """Which of a step's collectives cross the host boundary, and their bytes: per
    collective kind, the bytes per step that travel between devices of the same host
    ("within_host") and between hosts ("cross_host"), summed over the whole mesh.

    The mesh: `traced`'s, or with `data` = D > 1 D copies of its (cfg, patch) submesh
    along the data axis (a data group runs `traced` on its own prompts and exchanges
    nothing with another). Its N devices lie on `hosts` hosts of N / hosts devices each
    (stand-ins, `HostDevice`, their ids interleaved across hosts), placed on the mesh as a
    run places its devices (`mesh_order`, then `ParallelConfig.device_grid`). The link model
    counts point-to-point transfers: a ppermute sends its operand along each pair of its
    permutation; an all_gather sends each member's operand to every other member; an
    all_to_all each member's 1/n of it to every other member; a psum is a ring all-reduce
    over the members in mesh order, 2 (n - 1) / n of the operand along each ring edge.
    """
    parallel = traced.parallel
    if parallel.data != 1:
        raise ValueError("host_links: trace one data group (data=1) and give its count as data")
    whole = dataclasses.replace(parallel, devices=data * parallel.devices, data=data)
    devices = whole.devices
    if hosts < 1 or devices % hosts:
        raise ValueError(f"{devices} devices do not spread evenly over {hosts} hosts")
    stand_ins = [HostDevice(i % hosts, i) for i in range(devices)]  # host h: ids h, h + hosts..
    grid = whole.device_grid(mesh_order(stand_ins))
    totals: dict[str, dict[str, int]] = {}
    for eqn in _nested_equations(traced.jaxpr):
        kind = eqn.primitive.name
        axes = eqn.params["axis_name"]
        axes = axes if isinstance(axes, tuple) else (axes,)
        operand = eqn.invars[0].aval
        size = operand.size * operand.dtype.itemsize
        for group in _groups(grid, [MESH_AXES.index(a) for a in axes]):
            n = len(group)
            if kind == "ppermute":
                pairs = [(group[a], group[b]) for a, b in eqn.params["perm"]]
                per_pair = size
            elif kind == "psum":
                pairs = [(group[i], group[(i + 1) % n]) for i in range(n)] if n > 1 else []
                per_pair = 2 * (n - 1) * size // n
            else:
                pairs = [(a, b) for a in group for b in group if a != b]
                per_pair = size // n if kind == "all_to_all" else size
            entry = totals.setdefault(kind, {"within_host": 0, "cross_host": 0})
            for a, b in pairs:
                side = "cross_host" if a.process_index != b.process_index else "within_host"
                entry[side] += per_pair
    return totals


def _groups(grid: np.ndarray, axes: list[int]) -> list[list]:
    """The device groups of a collective over mesh `axes`: the devices of `grid` that
    differ only along those axes, each in mesh order."""
    others = [a for a in range(grid.ndim) if a not in axes]
    moved = np.moveaxis(grid, others + axes, range(grid.ndim))
    return moved.reshape(-1, math.prod(grid.shape[a] for a in axes)).tolist()

"""The denoising loops, one per mode, each a whole sampling run inside one compiled program.

What they run is any `Denoiser` (the SDXL UNet, or a transformer) built from the primitives
of this package, and any sampler `Schedule`. `single` is a `jax.lax.scan` over the sampler's
steps on one device. The patch-parallel modes run the loop inside `jax.shard_map` over the
(cfg, patch) mesh: the latent stays split into row slabs (one per patch device) for the whole
loop and after it (the VAE decodes it split, `sharding.rows`); the scheduler and the guidance
combination work on the slab.

A height that does not split into P equal slabs at unit boundaries (`Denoiser.row_unit`)
splits into slabs of unequal real rows in equal device arrays (`sharding.split`): the loop
takes and returns the whole latent, and lays it out for the devices around the program.

The scans of a run are `ParallelConfig.schedule`'s: displaced mode (DistriFusion) runs steps
0..W synchronously (the warm-up, one scan), then steps W+1..T-1 displaced (a second scan);
the carry of both holds the latent slab, the scheduler state and the primitives' stale
buffers. The primitives learn the step's behaviour from a `PatchContext` set on a copy of the
denoiser inside the program; the denoiser itself is unchanged.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from sharding.context import AXIS, PatchContext, StaleBuffer, set_patch_context
from sharding.parallel import CFG_AXIS, DATA_AXIS, ParallelConfig, StepKind
from sharding.split import Split

SINGLE = ParallelConfig()


class Denoiser(Protocol):
    """What the loops run: an `nnx.Module` whose spatial layers are this package's
    primitives (`Conv2d`, `GroupNorm`, `KVExchange`), so that it runs on a row slab.

    row_unit: what a slab's boundary rows must be a multiple of, in latent rows: its
    coarsest downsampling (2 ** (levels - 1) for a UNet, the patch size of a transformer).
    """

    row_unit: int

    def predict(self, latents: jax.Array, timestep: jax.Array, conditioning: Any) -> jax.Array:
        """The model's output (B, h, w, C) for `latents` (B, h, w, C) NHWC, the whole latent
        or a row slab, at `timestep` (), given `conditioning` (a pytree, batch first)."""
        ...

    def cache_conditioning(self, conditioning: Any) -> None:
        """Precomputes in place what depends on the conditioning only (text keys and
        values, say): called once per run, on a copy, before the steps."""
        ...


class Schedule(Protocol):
    """A sampler's precomputed schedule: a pytree whose methods work elementwise per pixel,
    so they run on a row slab unchanged (`jaxfusion.schedulers.make_schedule` makes one).
    Samplers that `draws_noise` get step i's fresh noise (`step_noise`, the rows of it that
    the slab holds) in `step`; the others get None."""

    timesteps: jax.Array
    draws_noise: bool

    def init_state(self, sample: jax.Array) -> Any: ...

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array: ...

    def step(
        self,
        state: Any,
        model_output: jax.Array,
        sample: jax.Array,
        i: jax.Array,
        noise: jax.Array | None,
    ) -> tuple[Any, jax.Array]: ...


def concat_batches(first: Any, second: Any) -> Any:
    """`first` then `second` (conditioning pytrees) along the batch: the (unconditional,
    conditional) CFG batch."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)


def guide(noise_pred: jax.Array, guidance_scale: jax.Array) -> jax.Array:
    """Classifier-free guidance on the (2B, ...) prediction of the CFG batch (unconditional
    half first): uncond + g * (cond - uncond), (B, ...), in the prediction's dtype."""
    uncond, cond = jnp.split(noise_pred, 2)
    return uncond + guidance_scale.astype(noise_pred.dtype) * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One generation's loop inputs besides the latent (a pytree).

    schedule: the sampler's precomputed schedule.
    conditioning: the denoiser's conditioning (a pytree, batch first): batch 2B
        (unconditional first) with guidance, else B. Inside the patch-parallel program with
        C = 2, each cfg device holds its half, B.
    guidance_scale: () float32, or None for no classifier-free guidance.
    noise_key: the PRNG key of the fresh noise of samplers that draw some (`step_noise`),
        else None.
    """

    schedule: Schedule
    conditioning: Any
    guidance_scale: jax.Array | None
    noise_key: jax.Array | None = None


jax.tree_util.register_dataclass(Sampling)


def step_noise(key: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Step i's fresh noise for the whole latent of `shape` (B, h, w, C): standard normal,
    float32, `jax.random.normal(jax.random.fold_in(key, i), shape)`."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


def slab_noise(
    sampling: Sampling,
    latents: jax.Array,
    i: jax.Array,
    parallel: ParallelConfig,
    split: Split | None = None,
) -> jax.Array | None:
    """Step i's `step_noise` as this device holds the latent: `latents` is its slab (of
    `latent_spec`) inside the patch-parallel program, so every device takes its rows (or
    columns: `split`, the latent's split along them; None: P equal slabs) of the same
    whole-latent noise, laid out as the latent (`Split.pad`); None for samplers that draw
    none."""
    if not sampling.schedule.draws_noise:
        return None
    if sampling.noise_key is None:
        raise ValueError(
            f"{type(sampling.schedule).__name__} draws fresh noise at each step: give "
            "Sampling a noise_key (jax.random.key(...))"
        )
    if parallel.mode == "single":
        return step_noise(sampling.noise_key, i, latents.shape)
    axis = split_axis(parallel)
    if split is None:
        split = Split.of(latents.shape[axis] * parallel.patches, parallel.patches, 1)
    whole = list(latents.shape)
    whole[0] *= parallel.data
    whole[axis] = split.size
    noise = split.pad(step_noise(sampling.noise_key, i, tuple(whole)), axis)
    for mesh_axis, array_axis in ((DATA_AXIS, 0), (AXIS, axis)):
        size = latents.shape[array_axis]
        start = jax.lax.axis_index(mesh_axis) * size
        noise = jax.lax.dynamic_slice_in_dim(noise, start, size, array_axis)
    return noise


def sampler_step(
    predict: Callable[[jax.Array, jax.Array, Any], jax.Array],
    sampling: Sampling,
    latents: jax.Array,
    state: Any,
    i: jax.Array,
    noise: jax.Array | None = None,
    *,
    cfg_split: bool = False,
) -> tuple[jax.Array, Any]:
    """Step i of the sampler on `latents` (B, h, w, C), the whole latent or a slab, with the
    denoiser's `predict` (`Denoiser.predict`): (latents, scheduler state) after it. `noise`:
    step i's fresh noise as `latents` holds it (`slab_noise`), for samplers that draw some.
    With `cfg_split` this device computes one guidance half and gets the other's prediction
    from the mesh axis "cfg"."""
    schedule = sampling.schedule
    model_input = schedule.scale_model_input(latents, i)
    guided = sampling.guidance_scale is not None
    if guided and not cfg_split:
        model_input = jnp.concatenate([model_input, model_input])
    noise_pred = predict(model_input, schedule.timesteps[i], sampling.conditioning)
    if guided:
        if cfg_split:
            noise_pred = jax.lax.all_gather(noise_pred, CFG_AXIS, tiled=True)
        noise_pred = guide(noise_pred, sampling.guidance_scale)
    state, latents = schedule.step(state, noise_pred, latents, i, noise)
    return latents, state


def denoise(
    denoiser: Denoiser,
    sampling: Sampling,
    latents: jax.Array,
    parallel: ParallelConfig = SINGLE,
) -> jax.Array:
    """Runs every step of the schedule from `latents` (B, h, w, C) NHWC, already scaled by
    init_noise_sigma, and returns the final latents (same shape and dtype), on one device
    or patch parallel as `parallel` says; patch parallel, they stay split over the mesh as
    the loop leaves them (`latent_spec`), never gathered on one device, where the slabs are
    equal; unequal ones (`sharding.split`) are laid out for the devices and back here."""
    graphdef, weights = nnx.split(denoiser)
    if parallel.mode == "single":
        return run_schedule(Loop.start(graphdef, weights, sampling, parallel), latents)
    slab, axis = latent_spec(parallel), split_axis(parallel)
    layout = Layout.of(denoiser, latents.shape, parallel)

    def per_device(weights, sampling, latents):
        return run_schedule(Loop.start(graphdef, weights, sampling, parallel, layout), latents)

    run = jax.shard_map(
        per_device,
        mesh=parallel.mesh(),
        in_specs=(P(), sampling_spec(parallel), slab),
        out_specs=slab,
        check_vma=False,
    )
    latents = layout.split.pad(latents, axis)
    return layout.split.unpad(run(weights, group_batches(sampling, parallel), latents), axis)


def latent_spec(parallel: ParallelConfig) -> P:
    """How the (B, h, w, C) latent is split over the mesh: the batch over "data", by rows,
    or by columns for naive column slabs; replicated over "cfg"."""
    if parallel.mode == "naive" and parallel.naive_split == "col":
        return P(DATA_AXIS, None, AXIS)
    return P(DATA_AXIS, AXIS)


def split_axis(parallel: ParallelConfig) -> int:
    """The latent's axis that the patch devices split (`latent_spec`): 1 (rows) or 2."""
    return tuple(latent_spec(parallel)).index(AXIS)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the patch devices hold a (B, h, w, C) latent: `split`, the slabs of the side
    they split (`split_axis`: rows, or columns for naive column slabs), and for naive
    alternate slabs `columns`, the width's slabs of their odd steps (else None)."""

    split: Split
    columns: Split | None = None

    @classmethod
    def of(cls, denoiser: Denoiser, shape: tuple[int, ...], parallel: ParallelConfig) -> "Layout":
        """The slabs of a latent of `shape` at the denoiser's `row_unit`."""
        unit = denoiser.row_unit
        split = Split.of(shape[split_axis(parallel)], parallel.patches, unit)
        columns = None
        if parallel.mode == "naive" and parallel.naive_split == "alternate":
            columns = Split.of(shape[2], parallel.patches, unit)
        return cls(split, columns)


def sampling_spec(parallel: ParallelConfig) -> Sampling:
    """Everything replicated, but the conditioning split over "data" (B / D prompts per
    group, as `group_batches` lays it out) and over "cfg" with C = 2 (one guidance half
    per cfg device)."""
    conditioning = P((CFG_AXIS, DATA_AXIS)) if parallel.cfg == 2 else P(DATA_AXIS)
    return Sampling(P(), conditioning, P(), P())


def group_batches(sampling: Sampling, parallel: ParallelConfig) -> Sampling:
    """`sampling` with its conditioning laid out for `sampling_spec`'s split over "data".

    The guided conditioning is (2B, ...), [uncond of prompts 0..B-1; cond of them]: split
    over ("cfg", "data") with C = 2 each device gets its group's half as it stands; with
    C = 1 each data group needs both halves of its own B / D prompts, so the batch is
    reordered to [uncond, cond of group 0; uncond, cond of group 1; ...].
    """
    if parallel.data == 1 or parallel.cfg == 2 or sampling.guidance_scale is None:
        return sampling

    def regroup(x: jax.Array) -> jax.Array:
        halves = x.reshape(2, parallel.data, -1, *x.shape[1:])
        return jnp.swapaxes(halves, 0, 1).reshape(x.shape)

    conditioning = jax.tree.map(regroup, sampling.conditioning)
    return dataclasses.replace(sampling, conditioning=conditioning)


NO_BUFFERS = nnx.State({})


@dataclasses.dataclass(frozen=True)
class Loop:
    """What every step of one run shares: the denoiser (graph and weights, with what depends
    on the conditioning only computed once), the sampling inputs, the parallel
    configuration and the latent's `Layout` on the devices (None: one device, or P equal
    row slabs)."""

    graphdef: nnx.GraphDef
    weights: nnx.State
    sampling: Sampling
    parallel: ParallelConfig
    layout: Layout | None = None

    @classmethod
    def start(
        cls,
        graphdef: nnx.GraphDef,
        weights: nnx.State,
        sampling: Sampling,
        parallel: ParallelConfig,
        layout: Layout | None = None,
    ) -> "Loop":
        """The run of the denoiser `graphdef`/`weights`: a copy of it that has cached its
        conditioning (`Denoiser.cache_conditioning`)."""
        denoiser = nnx.merge(graphdef, weights)
        denoiser.cache_conditioning(sampling.conditioning)
        return cls(*nnx.split(denoiser), sampling, parallel, layout)

    def step(
        self,
        context: PatchContext | None,
        latents: jax.Array,
        state: Any,
        buffers: nnx.State,
        i: jax.Array,
    ) -> tuple[jax.Array, Any, nnx.State]:
        """Step i on this device: (latents, scheduler state, stale buffers) after it."""
        model = nnx.merge(self.graphdef, self.weights)
        nnx.update(model, buffers)
        set_patch_context(model, context)
        parallel = self.parallel

        def step_with(predict):
            def step(latents, state, noise):
                return sampler_step(
                    predict, self.sampling, latents, state, i, noise, cfg_split=parallel.cfg == 2
                )

            return step

        layout = self.layout
        split = None if layout is None else layout.split
        noise = slab_noise(self.sampling, latents, i, parallel, split)
        if parallel.mode != "naive":
            latents, state = step_with(model.predict)(latents, state, noise)
        elif parallel.naive_split == "alternate":
            rows = step_with(predict_real(model.predict, split, 1))
            # The odd steps' column slabs: a copy of the model that knows it (a module is not
            # changed inside the branches of `cond`).
            on_columns = nnx.merge(self.graphdef, self.weights)
            column_context = dataclasses.replace(context, side="col", naive_slabs=layout.columns)
            set_patch_context(on_columns, column_context)
            columns = step_with(predict_real(on_columns.predict, layout.columns, 2))
            columns = column_step(columns, split, layout.columns)
            latents, state = jax.lax.cond(i % 2, columns, rows, latents, state, noise)
        else:
            predict = predict_real(model.predict, split, split_axis(parallel))
            latents, state = step_with(predict)(latents, state, noise)
        return latents, state, nnx.state(model, StaleBuffer)

    def scan(
        self,
        context: PatchContext | None,
        latents: jax.Array,
        state: Any,
        buffers: nnx.State,
        steps: range,
    ) -> tuple[jax.Array, Any, nnx.State]:
        """The steps `steps` as one scan whose carry holds the latent (slab), the scheduler
        state and the stale buffers.

        Steps that keep stale buffers (the warm-up) read none, they only write them: their
        scan starts from zeros of the shapes one such step gives them. That step is traced
        once, under `jax.jit`, whose cache hands the same trace to the scan's body.
        """
        parallel = self.parallel
        if context is not None and context.keep_stale:

            @jax.jit
            def warm_step(latents, state, i):
                return self.step(context, latents, state, NO_BUFFERS, i)

            shapes = jax.eval_shape(warm_step, latents, state, jnp.int32(steps.start))[2]
            buffers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, i):
                latents, state, _ = carry
                return warm_step(latents, state, i), None
        elif context is not None and context.exchange == "displaced" and parallel.kv_refresh > 1:
            # Each step a branch: keep K/V to send (every kv_refresh-th step), exchange the
            # kept K/V (the step after), or neither; never both with kv_refresh > 1.
            run_steps = self.sampling.schedule.timesteps.shape[0]
            variants = [
                dataclasses.replace(context, receive_kv=receive, send_kv=send)
                for receive, send in ((False, False), (True, False), (False, True))
            ]

            def body(carry, i):
                receive = parallel.refreshes_kv(i - 1, run_steps).astype(jnp.int32)
                send = parallel.refreshes_kv(i, run_steps).astype(jnp.int32)
                branches = [lambda carry, c=c: self.step(c, *carry, i) for c in variants]
                return jax.lax.switch(receive + 2 * send, branches, carry), None
        else:

            def body(carry, i):
                return self.step(context, *carry, i), None

        indices = jnp.arange(steps.start, steps.stop, dtype=jnp.int32)
        return jax.lax.scan(body, (latents, state, buffers), indices)[0]


def step_context(
    kind: StepKind, parallel: ParallelConfig, split: Split | None = None, width: int = 0
) -> PatchContext | None:
    """How the primitives behave in a step of `kind` (see `ParallelConfig.schedule`) on a
    latent of `width` columns whose rows (columns, for naive column slabs: `split_axis`)
    split as `split` says; None on one device. Naive steps run each slab's real rows
    (columns) alone (`predict_real`): their primitives see no split, but learn where their
    slab begins (`PatchContext.naive_slabs`: a transformer's positions are those of the
    whole image). Naive "alternate" steps: the context of their row slabs (the even steps;
    `Loop.step` gives the odd ones the column slabs)."""
    if kind == "single":
        return None
    exchange = {"sync": "sync", "warm-up": "sync", "naive": "none", "displaced": "displaced"}
    naive = kind == "naive"
    columns = naive and parallel.naive_split == "col"
    return PatchContext(
        parallel.patches,
        exchange[kind],
        parallel.group_norm,
        keep_stale=kind == "warm-up",
        compress=parallel.compress,
        hold_kv=parallel.kv_refresh > 1,
        split=None if naive else split,
        width=width,
        naive_slabs=split if naive else None,
        side="col" if columns else "row",
    )


def run_schedule(loop: Loop, latents: jax.Array) -> jax.Array:
    """The whole loop on this device, one scan per entry of `ParallelConfig.schedule`:
    `latents` is the whole latent on one device, this device's slab inside `shard_map`."""
    parallel = loop.parallel
    schedule = parallel.schedule(loop.sampling.schedule.timesteps.shape[0])
    state = loop.sampling.schedule.init_state(latents)
    buffers = NO_BUFFERS
    carry = (latents, state, buffers)
    for kind, steps in schedule:
        split = None if loop.layout is None else loop.layout.split
        context = step_context(kind, parallel, split, latents.shape[2])
        carry = loop.scan(context, *carry, steps)
    return carry[0]


def step_function(
    denoiser: Denoiser,
    parallel: ParallelConfig,
    context: PatchContext,
    mesh: Mesh | AbstractMesh | None = None,
    layout: Layout | None = None,
):
    """One step of the patch-parallel program as a function of global arrays, for analysis
    and tests (the loops run the same step inside their scans):

        (weights, buffers, sampling, latents, state, i) -> (latents, state, buffers)

    weights: `nnx.split(denoiser)[1]`. buffers: the `StaleBuffer` state of its primitives,
    each leaf the per-device buffers concatenated along axis 0 in mesh order (an empty
    `nnx.State({})` before the first step; `jax.eval_shape` of a step with
    `context.keep_stale` gives their shapes). latents: (B, h, w, C), the whole latent, laid
    out for the devices where `layout` (`Layout.of`) is uneven (`Split.pad`, P x slab
    rows; `context.split` is its split, but in naive steps).
    mesh: default `parallel.mesh()`; `parallel.mesh(abstract=True)` to trace without the
    devices.
    """
    graphdef, _ = nnx.split(denoiser)
    slab, per_device = latent_spec(parallel), P((DATA_AXIS, CFG_AXIS, AXIS))

    def grouped(weights, buffers, sampling, latents, state, i):
        # Without a layout, the latent's own: P equal slabs.
        laid_out = layout or Layout.of(denoiser, latents.shape, parallel)

        def run(weights, buffers, sampling, latents, state, i):
            loop = Loop.start(graphdef, weights, sampling, parallel, laid_out)
            return loop.step(context, latents, state, buffers, i)

        step = jax.shard_map(
            run,
            mesh=parallel.mesh() if mesh is None else mesh,
            in_specs=(P(), per_device, sampling_spec(parallel), slab, slab, P()),
            out_specs=(slab, slab, per_device),
            check_vma=False,
        )
        return step(weights, buffers, group_batches(sampling, parallel), latents, state, i)

    return grouped


def predict_real(
    predict: Callable[[jax.Array, jax.Array, Any], jax.Array], split: Split | None, axis: int
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """`predict` for a naive slab whose real rows (columns, along `axis`) are its first
    `split.real_rows(patch)`: the denoiser runs on the real part alone, as on one device
    (zero padding at its edges), and the prediction is padded back with zeros. One branch
    per distinct slab size; every device takes its own. Equal slabs: `predict` itself."""
    if split is None or split.even:
        return predict
    sizes = sorted(set(split.counts))
    which = jnp.asarray([sizes.index(count) for count in split.counts])

    def on_real_part(size: int):
        def run(x, timestep, conditioning):
            out = predict(jax.lax.slice_in_dim(x, 0, size, axis=axis), timestep, conditioning)
            padding = [(0, split.slab - size if a == axis else 0) for a in range(out.ndim)]
            return jnp.pad(out, padding)

        return run

    def run(x, timestep, conditioning):
        branches = [on_real_part(size) for size in sizes]
        return jax.lax.switch(which[jax.lax.axis_index(AXIS)], branches, x, timestep, conditioning)

    return run


def column_step(step, row_split: Split, column_split: Split):
    """`step` run on column slabs: the row slabs (latent, scheduler state and the step's
    noise) are traded for column slabs by an all-to-all, and (latent and state) back
    afterwards. Unequal slabs (`row_split`, `column_split`): each side laid out for the
    devices before the all-to-all and its padding dropped after it, so that a column slab
    holds the whole image's rows and a row slab its whole width."""

    def to_columns(x):
        x = jax.lax.all_to_all(
            column_split.pad(x, 2), AXIS, split_axis=2, concat_axis=1, tiled=True
        )
        return row_split.unpad(x, 1)

    def to_rows(x):
        x = jax.lax.all_to_all(row_split.pad(x, 1), AXIS, split_axis=1, concat_axis=2, tiled=True)
        return column_split.unpad(x, 2)

    def run(latents, state, noise):
        latents, state = step(*jax.tree.map(to_columns, (latents, state, noise)))
        return jax.tree.map(to_rows, (latents, state))

    return run

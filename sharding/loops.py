"""The denoising loops, one per mode, each a whole sampling run inside one compiled program.

What they run is any `Denoiser` (the SDXL UNet, or a transformer) built from the primitives
of this package, and any sampler `Schedule`. `single` is a `jax.lax.scan` over the sampler's
steps on one device. The patch-parallel modes run the loop inside `jax.shard_map` over the
(cfg, patch) mesh: the latent stays split into row slabs (one per patch device) for the whole
loop and after it (the VAE decodes it split, `sharding.rows`); the scheduler and the guidance
combination work on the slab.

The scans of a run are `ParallelConfig.schedule`'s: displaced mode (DistriFusion) runs steps
0..W synchronously (the warm-up, one scan), then steps W+1..T-1 displaced (a second scan);
the carry of both holds the latent slab, the scheduler state and the primitives' stale
buffers. The primitives learn the step's behaviour from a `PatchContext` set on a copy of the
denoiser inside the program; the denoiser itself is unchanged.
"""

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from sharding.context import AXIS, PatchContext, StaleBuffer, set_patch_context
from sharding.parallel import CFG_AXIS, ParallelConfig, StepKind

SINGLE = ParallelConfig()


class Denoiser(Protocol):
    """What the loops run: an `nnx.Module` whose spatial layers are this package's
    primitives (`Conv2d`, `GroupNorm`, `KVExchange`), so that it runs on a row slab."""

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
    so they run on a row slab unchanged (`jaxfusion.schedulers.make_schedule` makes one)."""

    timesteps: jax.Array

    def init_state(self, sample: jax.Array) -> Any: ...

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array: ...

    def step(
        self, state: Any, model_output: jax.Array, sample: jax.Array, i: jax.Array
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
    """

    schedule: Schedule
    conditioning: Any
    guidance_scale: jax.Array | None


jax.tree_util.register_dataclass(Sampling)


def sampler_step(
    denoiser: Denoiser,
    sampling: Sampling,
    latents: jax.Array,
    state: Any,
    i: jax.Array,
    *,
    cfg_split: bool = False,
) -> tuple[jax.Array, Any]:
    """Step i of the sampler on `latents` (B, h, w, C), the whole latent or a slab:
    (latents, scheduler state) after it. With `cfg_split` this device computes one guidance
    half and gets the other's prediction from the mesh axis "cfg"."""
    schedule = sampling.schedule
    model_input = schedule.scale_model_input(latents, i)
    guided = sampling.guidance_scale is not None
    if guided and not cfg_split:
        model_input = jnp.concatenate([model_input, model_input])
    noise_pred = denoiser.predict(model_input, schedule.timesteps[i], sampling.conditioning)
    if guided:
        if cfg_split:
            noise_pred = jax.lax.all_gather(noise_pred, CFG_AXIS, tiled=True)
        noise_pred = guide(noise_pred, sampling.guidance_scale)
    state, latents = schedule.step(state, noise_pred, latents, i)
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
    the loop leaves them (`latent_spec`), never gathered on one device."""
    graphdef, weights = nnx.split(denoiser)
    if parallel.mode == "single":
        return run_schedule(Loop.start(graphdef, weights, sampling, parallel), latents)
    slab = latent_spec(parallel)

    def per_device(weights, sampling, latents):
        return run_schedule(Loop.start(graphdef, weights, sampling, parallel), latents)

    run = jax.shard_map(
        per_device,
        mesh=parallel.mesh(),
        in_specs=(P(), sampling_spec(parallel), slab),
        out_specs=slab,
        check_vma=False,
    )
    return run(weights, sampling, latents)


def latent_spec(parallel: ParallelConfig) -> P:
    """How the (B, h, w, C) latent is split over the mesh: by rows, or by columns for naive
    column slabs; replicated over "cfg"."""
    if parallel.mode == "naive" and parallel.naive_split == "col":
        return P(None, None, AXIS)
    return P(None, AXIS)


def sampling_spec(parallel: ParallelConfig) -> Sampling:
    """Everything replicated, but the conditioning split over "cfg" with C = 2."""
    return Sampling(P(), P(CFG_AXIS) if parallel.cfg == 2 else P(), P())


NO_BUFFERS = nnx.State({})


@dataclasses.dataclass(frozen=True)
class Loop:
    """What every step of one run shares: the denoiser (graph and weights, with what depends
    on the conditioning only computed once), the sampling inputs and the parallel
    configuration."""

    graphdef: nnx.GraphDef
    weights: nnx.State
    sampling: Sampling
    parallel: ParallelConfig

    @classmethod
    def start(
        cls,
        graphdef: nnx.GraphDef,
        weights: nnx.State,
        sampling: Sampling,
        parallel: ParallelConfig,
    ) -> "Loop":
        """The run of the denoiser `graphdef`/`weights`: a copy of it that has cached its
        conditioning (`Denoiser.cache_conditioning`)."""
        denoiser = nnx.merge(graphdef, weights)
        denoiser.cache_conditioning(sampling.conditioning)
        return cls(*nnx.split(denoiser), sampling, parallel)

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

        def step(latents, state):
            return sampler_step(
                model, self.sampling, latents, state, i, cfg_split=parallel.cfg == 2
            )

        if parallel.mode == "naive" and parallel.naive_split == "alternate":
            latents, state = jax.lax.cond(i % 2, column_step(step), step, latents, state)
        else:
            latents, state = step(latents, state)
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
        if context is not None and context.keep_stale:

            @jax.jit
            def warm_step(latents, state, i):
                return self.step(context, latents, state, NO_BUFFERS, i)

            shapes = jax.eval_shape(warm_step, latents, state, jnp.int32(steps.start))[2]
            buffers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, i):
                latents, state, _ = carry
                return warm_step(latents, state, i), None
        else:

            def body(carry, i):
                return self.step(context, *carry, i), None

        indices = jnp.arange(steps.start, steps.stop, dtype=jnp.int32)
        return jax.lax.scan(body, (latents, state, buffers), indices)[0]


def step_context(kind: StepKind, parallel: ParallelConfig) -> PatchContext | None:
    """How the primitives behave in a step of `kind` (see `ParallelConfig.schedule`); None
    on one device."""
    if kind == "single":
        return None
    exchange = {"sync": "sync", "warm-up": "sync", "naive": "none", "displaced": "displaced"}
    return PatchContext(
        parallel.patches, exchange[kind], parallel.group_norm, keep_stale=kind == "warm-up"
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
        carry = loop.scan(step_context(kind, parallel), *carry, steps)
    return carry[0]


def step_function(
    denoiser: Denoiser,
    parallel: ParallelConfig,
    context: PatchContext,
    mesh: Mesh | AbstractMesh | None = None,
):
    """One step of the patch-parallel program as a function of global arrays, for analysis
    and tests (the loops run the same step inside their scans):

        (weights, buffers, sampling, latents, state, i) -> (latents, state, buffers)

    weights: `nnx.split(denoiser)[1]`. buffers: the `StaleBuffer` state of its primitives,
    each leaf the per-device buffers concatenated along axis 0 in mesh order (an empty
    `nnx.State({})` before the first step; `jax.eval_shape` of a step with
    `context.keep_stale` gives their shapes). latents: (B, h, w, C), the whole latent.
    mesh: default `parallel.mesh()`; `parallel.mesh(abstract=True)` to trace without the
    devices.
    """
    graphdef, _ = nnx.split(denoiser)
    slab, per_device = latent_spec(parallel), P((CFG_AXIS, AXIS))

    def run(weights, buffers, sampling, latents, state, i):
        loop = Loop.start(graphdef, weights, sampling, parallel)
        return loop.step(context, latents, state, buffers, i)

    return jax.shard_map(
        run,
        mesh=parallel.mesh() if mesh is None else mesh,
        in_specs=(P(), per_device, sampling_spec(parallel), slab, slab, P()),
        out_specs=(slab, slab, per_device),
        check_vma=False,
    )


def column_step(step):
    """`step` run on column slabs: the row slabs (latent and scheduler state) are traded
    for column slabs by an all-to-all, and back afterwards."""

    def to_columns(x):
        return jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)

    def to_rows(x):
        return jax.lax.all_to_all(x, AXIS, split_axis=1, concat_axis=2, tiled=True)

    def run(latents, state):
        latents, state = step(*jax.tree.map(to_columns, (latents, state)))
        return jax.tree.map(to_rows, (latents, state))

    return run

"""The denoising loops, one per mode, each a whole sampling run inside one compiled program.

`single` is a `jax.lax.scan` over the sampler's steps on one device. The patch-parallel modes
run the loop inside `jax.shard_map` over the (cfg, patch) mesh: the latent stays split into
row slabs (one per patch device) for the whole loop and after it (the VAE decodes it split,
`sharding.rows`); the scheduler and the guidance combination work on the slab.

`displaced` (DistriFusion) runs step 0 and the warm-up steps 1..W synchronously (one scan),
then steps W+1..T-1 displaced (a second scan); the carry of both scans holds the latent
slab, the scheduler state and the primitives' stale buffers. The primitives learn the step's
behaviour from a `PatchContext` set on a copy of the UNet inside the program; the UNet itself
is unchanged.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from jaxfusion import schedulers
from jaxfusion.models import UNet2DConditionModel
from jaxfusion.models.attention import cache_text_kv
from sharding.context import AXIS, PatchContext, StaleBuffer
from sharding.parallel import CFG_AXIS, ParallelConfig

SINGLE = ParallelConfig()


class Conditioning(NamedTuple):
    """What the UNet is conditioned on besides the latent and the timestep, batch first.

    encoder_hidden_states: (B, tokens, cross_attention_dim) text hidden states.
    text_embeds: (B, D) pooled text embedding (SDXL), else None.
    time_ids: (B, 6) original size, crop top-left, target size (SDXL), else None.
    """

    encoder_hidden_states: jax.Array
    text_embeds: jax.Array | None = None
    time_ids: jax.Array | None = None


def concat_batches(first: Conditioning, second: Conditioning) -> Conditioning:
    """`first` then `second` along the batch: the (unconditional, conditional) CFG batch."""
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
    conditioning: batch 2B (unconditional first) with guidance, else B. Inside the
        patch-parallel program with C = 2, each cfg device holds its half, B.
    guidance_scale: () float32, or None for no classifier-free guidance.
    """

    schedule: schedulers.Schedule
    conditioning: Conditioning
    guidance_scale: jax.Array | None


jax.tree_util.register_dataclass(Sampling)


def sampler_step(
    unet: UNet2DConditionModel,
    sampling: Sampling,
    latents: jax.Array,
    state: schedulers.State,
    i: jax.Array,
    *,
    cfg_split: bool = False,
) -> tuple[jax.Array, schedulers.State]:
    """Step i of the sampler on `latents` (B, h, w, C), the whole latent or a slab:
    (latents, scheduler state) after it. With `cfg_split` this device computes one guidance
    half and gets the other's prediction from the mesh axis "cfg"."""
    schedule = sampling.schedule
    model_input = schedulers.scale_model_input(schedule, latents, i)
    guided = sampling.guidance_scale is not None
    if guided and not cfg_split:
        model_input = jnp.concatenate([model_input, model_input])
    noise_pred = unet(model_input, schedule.timesteps[i], *sampling.conditioning)
    if guided:
        if cfg_split:
            noise_pred = jax.lax.all_gather(noise_pred, CFG_AXIS, tiled=True)
        noise_pred = guide(noise_pred, sampling.guidance_scale)
    state, latents = schedulers.step(schedule, state, noise_pred, latents, i)
    return latents, state


def denoise(
    unet: UNet2DConditionModel,
    sampling: Sampling,
    latents: jax.Array,
    parallel: ParallelConfig = SINGLE,
) -> jax.Array:
    """Runs every step of the schedule from `latents` (B, h, w, C) NHWC, already scaled by
    init_noise_sigma, and returns the final latents (same shape and dtype), on one device
    or patch parallel as `parallel` says; patch parallel, they stay split over the mesh as
    the loop leaves them (`latent_spec`), never gathered on one device."""
    graphdef, weights = nnx.split(unet)
    if parallel.mode == "single":
        state = schedulers.init_state(sampling.schedule, latents)
        steps = jnp.arange(sampling.schedule.timesteps.shape[0])
        loop = Loop.start(graphdef, weights, sampling, parallel)
        return loop.scan(None, latents, state, NO_BUFFERS, steps)[0]
    mesh = parallel.mesh()
    slab = latent_spec(parallel)

    def per_device(weights, sampling, latents):
        return patch_parallel_loop(Loop.start(graphdef, weights, sampling, parallel), latents)

    run = jax.shard_map(
        per_device,
        mesh=mesh,
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
    """What every step of one run shares: the UNet (graph and weights, with the text keys
    and values of its cross-attentions computed once), the sampling inputs and the parallel
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
        """The run of the UNet `graphdef`/`weights`: stores the text keys and values (see
        `cache_text_kv`) in a copy of it."""
        unet = nnx.merge(graphdef, weights)
        cache_text_kv(unet, sampling.conditioning.encoder_hidden_states)
        return cls(*nnx.split(unet), sampling, parallel)

    def step(
        self,
        context: PatchContext | None,
        latents: jax.Array,
        state: schedulers.State,
        buffers: nnx.State,
        i: jax.Array,
    ) -> tuple[jax.Array, schedulers.State, nnx.State]:
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
        state: schedulers.State,
        buffers: nnx.State,
        steps: jax.Array,
    ) -> tuple[jax.Array, schedulers.State, nnx.State]:
        """`steps` (a range of step indices) as one scan whose carry holds the latent (slab),
        the scheduler state and the stale buffers."""

        def body(carry, i):
            return self.step(context, *carry, i), None

        if steps.shape[0] == 0:  # not even traced: one UNet fewer to compile
            return latents, state, buffers
        return jax.lax.scan(body, (latents, state, buffers), steps)[0]


def patch_parallel_loop(loop: Loop, latents: jax.Array) -> jax.Array:
    """The whole loop on one device of the mesh (inside `shard_map`): `latents` is its slab."""
    parallel = loop.parallel
    steps = loop.sampling.schedule.timesteps.shape[0]
    state = schedulers.init_state(loop.sampling.schedule, latents)
    context = PatchContext(parallel.patches, "sync", parallel.group_norm)
    if parallel.mode in ("sync", "naive"):
        if parallel.mode == "naive":
            context = dataclasses.replace(context, exchange="none")
        return loop.scan(context, latents, state, NO_BUFFERS, jnp.arange(steps))[0]
    warm = min(parallel.warmup_steps + 1, steps)
    warmup = dataclasses.replace(context, keep_stale=True)
    # The scans' carry needs the stale buffers from the start: zeros of the shapes a warm-up
    # step gives them (traced, not compiled). Warm-up steps only write them.
    shapes = jax.eval_shape(
        lambda latents, state: loop.step(warmup, latents, state, NO_BUFFERS, jnp.int32(0))[2],
        latents,
        state,
    )
    buffers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    carry = loop.scan(warmup, latents, state, buffers, jnp.arange(warm))
    displaced = dataclasses.replace(context, exchange="displaced")
    return loop.scan(displaced, *carry, jnp.arange(warm, steps))[0]


def step_function(
    unet: UNet2DConditionModel,
    parallel: ParallelConfig,
    context: PatchContext,
    mesh: Mesh | AbstractMesh | None = None,
):
    """One step of the patch-parallel program as a function of global arrays, for analysis
    and tests (the loops run the same step inside their scans):

        (weights, buffers, sampling, latents, state, i) -> (latents, state, buffers)

    weights: `nnx.split(unet)[1]`. buffers: the `StaleBuffer` state of the UNet's primitives,
    each leaf the per-device buffers concatenated along axis 0 in mesh order (an empty
    `nnx.State({})` before the first step; `jax.eval_shape` of a step with
    `context.keep_stale` gives their shapes). latents: (B, h, w, C), the whole latent.
    mesh: default `parallel.mesh()`; `parallel.mesh(abstract=True)` to trace without the
    devices.
    """
    graphdef, _ = nnx.split(unet)
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


def set_patch_context(unet: UNet2DConditionModel, context: PatchContext | None) -> None:
    """Tells every patch-parallel primitive of `unet` how to behave in this step. `conv_in`
    always takes its halo from the current latent (4 channels: cheap) and keeps no stale
    buffer; in naive and local steps it takes none."""
    unet.set_attributes(patch=context, raise_if_not_found=False)
    if context is not None:
        exchange = "sync" if context.exchanges else "none"
        unet.conv_in.patch = dataclasses.replace(context, exchange=exchange, keep_stale=False)

"""The denoising loops, one per mode, each a whole sampling run inside one compiled program.

`single` is a `jax.lax.scan` over the sampler's steps on one device. The patch-parallel modes
run the loop inside `jax.shard_map` over the (cfg, patch) mesh: the latent stays split into
row slabs (one per patch device) for the whole loop, the scheduler and the guidance
combination work on the slab, and the full latent is gathered once, at the end.

`displaced` (DistriFusion) runs step 0 and the warm-up steps 1..W synchronously, then steps
W+1..T-1 displaced; the carry of both scans holds the latent slab, the scheduler state and
the primitives' stale buffers. The primitives learn the step's behaviour from a
`PatchContext` set on a copy of the UNet inside the program; the UNet itself is unchanged.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfusion import schedulers
from jaxfusion.models import UNet2DConditionModel
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
    or patch parallel as `parallel` says."""
    if parallel.mode == "single":
        steps = jnp.arange(sampling.schedule.timesteps.shape[0])
        state = schedulers.init_state(sampling.schedule, latents)
        latents, _ = scan_steps(unet, None, sampling, latents, state, steps)
        return latents
    mesh = parallel.mesh()
    slab = latent_spec(parallel)
    conditioning = P(CFG_AXIS) if parallel.cfg == 2 else P()
    sampling_spec = Sampling(P(), conditioning, P())
    graphdef, weights = nnx.split(unet)

    def per_device(weights, sampling, latents):
        unet = nnx.merge(graphdef, weights)
        return patch_parallel_loop(unet, sampling, latents, parallel)

    run = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), sampling_spec, slab),
        out_specs=slab,
        check_vma=False,
    )
    latents = run(weights, sampling, latents)
    return jax.lax.with_sharding_constraint(latents, NamedSharding(mesh, P()))


def latent_spec(parallel: ParallelConfig) -> P:
    """How the (B, h, w, C) latent is split over the mesh: by rows, or by columns for naive
    column slabs; replicated over "cfg"."""
    if parallel.mode == "naive" and parallel.naive_split == "col":
        return P(None, None, AXIS)
    return P(None, AXIS)


def patch_parallel_loop(
    unet: UNet2DConditionModel, sampling: Sampling, latents: jax.Array, parallel: ParallelConfig
) -> jax.Array:
    """The loop on one device of the mesh (inside `shard_map`): latents is its slab."""
    steps = sampling.schedule.timesteps.shape[0]
    state = schedulers.init_state(sampling.schedule, latents)
    context = PatchContext(parallel.patches, "sync", parallel.group_norm)
    if parallel.mode == "sync":
        return scan_steps(unet, context, sampling, latents, state, jnp.arange(steps), parallel)[0]
    if parallel.mode == "naive":
        naive = dataclasses.replace(context, exchange="none")
        return scan_steps(unet, naive, sampling, latents, state, jnp.arange(steps), parallel)[0]
    warm = min(parallel.warmup_steps + 1, steps)
    warmup = dataclasses.replace(context, keep_stale=True)
    # Step 0 runs outside the scans: it creates the stale buffers, whose shapes the scans'
    # carry needs.
    set_patch_context(unet, warmup)
    latents, state = sampler_step(unet, sampling, latents, state, 0, cfg_split=parallel.cfg == 2)
    latents, state = scan_steps(
        unet, warmup, sampling, latents, state, jnp.arange(1, warm), parallel
    )
    displaced = dataclasses.replace(context, exchange="displaced")
    return scan_steps(unet, displaced, sampling, latents, state, jnp.arange(warm, steps), parallel)[
        0
    ]


def scan_steps(
    unet: UNet2DConditionModel,
    context: PatchContext | None,
    sampling: Sampling,
    latents: jax.Array,
    state: schedulers.State,
    steps: jax.Array,
    parallel: ParallelConfig = SINGLE,
) -> tuple[jax.Array, schedulers.State]:
    """`steps` (a range of step indices) as one scan whose carry holds the latent (slab),
    the scheduler state and the UNet's stale buffers, which `unet` holds again afterwards."""
    graphdef, params, buffers = nnx.split(unet, nnx.Param, StaleBuffer)
    cfg_split = parallel.cfg == 2
    by_columns = parallel.mode == "naive" and parallel.naive_split == "alternate"

    def body(carry, i):
        latents, state, buffers = carry
        model = nnx.merge(graphdef, params, buffers)
        set_patch_context(model, context)
        step = lambda latents, state: sampler_step(  # noqa: E731
            model, sampling, latents, state, i, cfg_split=cfg_split
        )
        if by_columns:
            latents, state = jax.lax.cond(i % 2, column_step(step), step, latents, state)
        else:
            latents, state = step(latents, state)
        return (latents, state, nnx.state(model, StaleBuffer)), None

    (latents, state, buffers), _ = jax.lax.scan(body, (latents, state, buffers), steps)
    nnx.update(unet, buffers)
    return latents, state


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
    buffer; in naive patches it takes none."""
    unet.set_attributes(patch=context, raise_if_not_found=False)
    if context is not None:
        exchange = "none" if context.exchange == "none" else "sync"
        unet.conv_in.patch = dataclasses.replace(context, exchange=exchange, keep_stale=False)

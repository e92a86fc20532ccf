"""The denoising loop on one device: every step of the sampler as one `jax.lax.scan`."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxfusion import schedulers
from jaxfusion.models import UNet2DConditionModel


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


def denoise(
    unet: UNet2DConditionModel,
    schedule: schedulers.Schedule,
    latents: jax.Array,
    conditioning: Conditioning,
    guidance_scale: jax.Array | None,
) -> jax.Array:
    """Runs every step of `schedule` from `latents` and returns the final latents.

    Args:
      latents: (B, h, w, C) NHWC, already scaled by the schedule's init_noise_sigma; the
        loop keeps their dtype.
      conditioning: batch 2B (unconditional first) with guidance, else B.
      guidance_scale: () float32 for classifier-free guidance, None for none.
    """

    def step(carry, i):
        latents, state = carry
        model_input = schedulers.scale_model_input(schedule, latents, i)
        if guidance_scale is not None:
            model_input = jnp.concatenate([model_input, model_input])
        noise_pred = unet(model_input, schedule.timesteps[i], *conditioning)
        if guidance_scale is not None:
            noise_pred = guide(noise_pred, guidance_scale)
        state, latents = schedulers.step(schedule, state, noise_pred, latents, i)
        return (latents, state), None

    steps = jnp.arange(schedule.timesteps.shape[0])
    state = schedulers.init_state(schedule, latents)
    (latents, _), _ = jax.lax.scan(step, (latents, state), steps)
    return latents

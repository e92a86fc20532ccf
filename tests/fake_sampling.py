"""A whole sampling loop with a fake model, `fake_model`, run by diffusers' schedulers step by
step (`diffusers_sample`) and by jaxfusion's as one compiled scan (`jax_sample`), and the
scheduler config of SDXL's folder (tests/test_schedulers.py, tests/test_few_step.py)."""

import contextlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxfusion import schedulers
from jaxfusion.diffusers_backend import given_step_noise
from jaxfusion.schedulers import SCHEDULERS, Kind
from sharding.loops import step_noise

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def configured(base: dict, **overrides) -> dict:
    """base with overrides; an overridden key no longer counts as a default."""
    used_defaults = [k for k in base.get("_use_default_values", []) if k not in overrides]
    return {**base, **overrides, "_use_default_values": used_defaults}


def fake_model(sample, t, sin):
    return 0.1 * sample + sin(t / 100)


def diffusers_scheduler(kind: Kind) -> type:
    """The diffusers scheduler class the sampler `kind` stands for."""
    return getattr(diffusers, SCHEDULERS[kind].class_name)


def set_timesteps(scheduler, steps: int, image_seq_len: int | None = None) -> None:
    """`scheduler.set_timesteps` for `steps` steps as the diffusers pipeline of its kind
    calls it: a FlowMatchEulerDiscreteScheduler as FluxPipeline does, with the sigmas
    linspace(1, 1 / steps, steps) and the shift mu of an image of `image_seq_len` tokens."""
    if not isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(steps)
        return
    # Imported here: diffusers' Flux pipeline module imports transformers.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config, mu = scheduler.config, None
    if image_seq_len is not None:
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


def diffusers_sample(
    kind: Kind,
    config: dict,
    steps: int,
    noise: np.ndarray,
    fresh: np.ndarray | None = None,
    image_seq_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, final sample) of the diffusers scheduler of `kind` made from config, from
    the NCHW `noise`, its timesteps set as its pipeline sets them (`set_timesteps`); a
    scheduler that draws noise in its steps draws fresh[i] in step i. Flow matching has no
    init_noise_sigma nor scale_model_input: 1 and the identity."""
    scheduler = diffusers_scheduler(kind).from_config(config)
    set_timesteps(scheduler, steps, image_seq_len)
    sample = torch.from_numpy(noise) * getattr(scheduler, "init_noise_sigma", 1.0)
    drawn = contextlib.nullcontext() if fresh is None else given_step_noise(scheduler, fresh)
    with drawn:
        for t in scheduler.timesteps:
            model_input = sample
            if hasattr(scheduler, "scale_model_input"):
                model_input = scheduler.scale_model_input(sample, t)
            model_output = fake_model(model_input, t.to(torch.float32), torch.sin)
            sample = scheduler.step(model_output, t, sample).prev_sample
    return scheduler.timesteps.numpy(), sample.numpy()


@jax.jit
def jax_sample(
    schedule: schedulers.Schedule, noise: jax.Array, key: jax.Array | None = None
) -> jax.Array:
    """The final sample of one compiled scan over all steps; samplers that draw fresh noise
    add `step_noise(key, i)` at step i."""

    def body(carry, i):
        sample, state = carry
        model_input = schedulers.scale_model_input(schedule, sample, i)
        model_output = fake_model(model_input, schedule.timesteps[i], jnp.sin)
        fresh = step_noise(key, i, sample.shape) if schedule.draws_noise else None
        state, sample = schedulers.step(schedule, state, model_output, sample, i, fresh)
        return (sample, state), None

    sample = noise * schedule.init_noise_sigma
    carry = (sample, schedulers.init_state(schedule, sample))
    (sample, _), _ = jax.lax.scan(body, carry, jnp.arange(schedule.timesteps.shape[0]))
    return sample

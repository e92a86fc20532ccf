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


def diffusers_sample(
    kind: Kind, config: dict, steps: int, noise: np.ndarray, fresh: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, final sample) of the diffusers scheduler of `kind` made from config, from
    the NCHW `noise`; a scheduler that draws noise in its steps draws fresh[i] in step i."""
    scheduler = diffusers_scheduler(kind).from_config(config)
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(noise) * scheduler.init_noise_sigma
    drawn = contextlib.nullcontext() if fresh is None else given_step_noise(scheduler, fresh)
    with drawn:
        for t in scheduler.timesteps:
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

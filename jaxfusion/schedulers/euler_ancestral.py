"""Euler ancestral: diffusers' EulerAncestralDiscreteScheduler. Each step goes down to a
lower noise level than Euler's by the ODE, then adds fresh noise back up to it; the noise is
given to `step` (the loop draws it, `sharding.loops.step_noise`)."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfusion.schedulers import euler
from jaxfusion.schedulers.config import SchedulerConfig


@struct.dataclass
class EulerAncestralSchedule(euler.EulerSchedule):
    """The Euler ancestral sampler's S steps, precomputed: `EulerSchedule`'s, and

    sigma_down, sigma_up: (S,) float32, the levels of step i's ODE step and of its fresh
        noise: sigma_up^2 = sigmas[i+1]^2 (sigmas[i]^2 - sigmas[i+1]^2) / sigmas[i]^2 and
        sigma_down^2 + sigma_up^2 = sigmas[i+1]^2, so the sample lands at sigmas[i + 1].
    """

    sigma_down: jax.Array
    sigma_up: jax.Array
    draws_noise: ClassVar[bool] = True

    def step(
        self,
        state: tuple[()],
        model_output: jax.Array,
        sample: jax.Array,
        i: jax.Array,
        noise: jax.Array,
    ) -> tuple[tuple[()], jax.Array]:
        """(state, the sample at noise level sigmas[i + 1]): an Euler step of the probability
        flow ODE to sigma_down[i], plus `noise` (standard normal, sample's shape) times
        sigma_up[i]."""
        x = sample.astype(jnp.float32)
        prev = x + self.eps(model_output, x, i) * (self.sigma_down[i] - self.sigmas[i])
        prev = prev + noise.astype(jnp.float32) * self.sigma_up[i]
        return state, prev.astype(sample.dtype)

    def restrict(self, steps: range) -> "EulerAncestralSchedule":
        """Steps `steps` (contiguous) alone: what diffusers runs after `set_begin_index`."""
        part = euler.EulerSchedule.restrict(self, steps)
        return part.replace(
            sigma_down=self.sigma_down[steps.start : steps.stop],
            sigma_up=self.sigma_up[steps.start : steps.stop],
        )


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> EulerAncestralSchedule:
    """The Euler ancestral schedule diffusers' `set_timesteps(num_inference_steps)` sets up:
    Euler's timesteps and noise levels (final sigma 0)."""
    base = euler.make_schedule(config, num_inference_steps)
    sigmas = np.asarray(base.sigmas, np.float64)
    start, end = sigmas[:-1], sigmas[1:]
    sigma_up = np.sqrt(end**2 * (start**2 - end**2) / start**2)
    sigma_down = np.sqrt(end**2 - sigma_up**2)
    fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(base)}
    return EulerAncestralSchedule(
        **fields,
        sigma_down=jnp.asarray(sigma_down, jnp.float32),
        sigma_up=jnp.asarray(sigma_up, jnp.float32),
    )

"""Euler: diffusers' EulerDiscreteScheduler (deterministic, s_churn = 0)."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfusion.schedulers.common import (
    alphas_cumprod,
    noised,
    predict_x0_eps,
    sigmas_at,
    spaced_timesteps,
)
from jaxfusion.schedulers.config import SchedulerConfig


@struct.dataclass
class EulerSchedule:
    """The Euler sampler's S steps, precomputed. The sample lives in the variance-exploding
    form `x0 + sigma * eps`.

    timesteps: (S,) float32, what the model is called with at step i.
    sigmas: (S + 1,) float32, the sample's noise level before step i; sigmas[S] after the last.
    input_scale: (S,) float32, 1 / sqrt(sigmas[i]^2 + 1): the model sees sample * input_scale[i].
    init_noise_sigma: () float32, the standard deviation of the initial noise.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    input_scale: jax.Array
    init_noise_sigma: jax.Array
    prediction_type: str = struct.field(pytree_node=False)
    draws_noise: ClassVar[bool] = False

    def init_state(self, sample: jax.Array) -> tuple[()]:
        """Euler keeps no state between steps."""
        return ()

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The model's input at step i: the sample scaled to unit variance, same shape."""
        return (sample * self.input_scale[i]).astype(sample.dtype)

    def step(
        self,
        state: tuple[()],
        model_output: jax.Array,
        sample: jax.Array,
        i: jax.Array,
        noise: None = None,
    ) -> tuple[tuple[()], jax.Array]:
        """(state, the sample at noise level sigmas[i + 1]): an Euler step of the probability
        flow ODE dx / dsigma = eps."""
        x = sample.astype(jnp.float32)
        prev = x + self.eps(model_output, x, i) * (self.sigmas[i + 1] - self.sigmas[i])
        return state, prev.astype(sample.dtype)

    def eps(self, model_output: jax.Array, x: jax.Array, i: jax.Array) -> jax.Array:
        """The noise eps = dx / dsigma that the model's output at step i implies for the
        float32 sample x (same shape), float32."""
        alpha = self.input_scale[i]
        _, eps = predict_x0_eps(
            self.prediction_type,
            model_output.astype(jnp.float32),
            x * alpha,
            alpha,
            self.sigmas[i] * alpha,
        )
        return eps

    def add_noise(self, sample: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """Clean `sample` noised to step i's level, float32: sample + sigmas[i] * noise
        (diffusers' `add_noise` before step i)."""
        return noised(sample, noise, 1.0, self.sigmas[i])

    def restrict(self, steps: range) -> "EulerSchedule":
        """Steps `steps` (contiguous) alone: what diffusers runs after `set_begin_index`."""
        start, stop = steps.start, steps.stop
        return self.replace(
            timesteps=self.timesteps[start:stop],
            sigmas=self.sigmas[start : stop + 1],
            input_scale=self.input_scale[start:stop],
        )


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> EulerSchedule:
    """The Euler schedule diffusers' `set_timesteps(num_inference_steps)` sets up."""
    timesteps = spaced_timesteps(config, num_inference_steps).astype(np.float32)
    sigmas = sigmas_at(config, alphas_cumprod(config), timesteps)
    wide = sigmas.astype(np.float64)
    init_noise_sigma = wide.max()
    if config.timestep_spacing == "leading":
        init_noise_sigma = (init_noise_sigma**2 + 1) ** 0.5
    return EulerSchedule(
        timesteps=jnp.asarray(timesteps),
        sigmas=jnp.asarray(sigmas),
        input_scale=jnp.asarray(1 / np.sqrt(wide[:-1] ** 2 + 1), jnp.float32),
        init_noise_sigma=jnp.asarray(init_noise_sigma, jnp.float32),
        prediction_type=config.prediction_type,
    )

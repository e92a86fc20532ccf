"""DDIM: diffusers' DDIMScheduler with eta = 0 (deterministic), as SD pipelines run it."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfusion.schedulers.common import alphas_cumprod, noised, predict_x0_eps, spaced_timesteps
from jaxfusion.schedulers.config import SchedulerConfig


@struct.dataclass
class DDIMSchedule:
    """The DDIM sampler's S steps, precomputed. The sample lives in the variance-preserving
    form `alpha * x0 + sigma * eps`.

    timesteps: (S,) float32, what the model is called with at step i.
    alpha, sigma: (S,) float32, sqrt(alpha_bar) and sqrt(1 - alpha_bar) at timesteps[i].
    alpha_prev, sigma_prev: (S,) float32, the same where step i lands: at timesteps[i] -
        num_train_timesteps // num_inference_steps (diffusers' rule for every spacing), and
        alpha_bar = 1 (set_alpha_to_one) or alpha_bar_0 below timestep 0.
    init_noise_sigma: () float32, 1.
    clip_sample_range: the predicted x0 is clipped to [-range, range]; None: not clipped.
    """

    timesteps: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    alpha_prev: jax.Array
    sigma_prev: jax.Array
    init_noise_sigma: jax.Array
    prediction_type: str = struct.field(pytree_node=False)
    clip_sample_range: float | None = struct.field(pytree_node=False)
    draws_noise: ClassVar[bool] = False

    def init_state(self, sample: jax.Array) -> tuple[()]:
        """DDIM keeps no state between steps."""
        return ()

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The model's input at step i: the sample itself."""
        return sample

    def step(
        self,
        state: tuple[()],
        model_output: jax.Array,
        sample: jax.Array,
        i: jax.Array,
        noise: None = None,
    ) -> tuple[tuple[()], jax.Array]:
        """(state, the sample at step i's target timestep), same shape and dtype as sample."""
        x0, eps = self.x0_eps(model_output, sample, i)
        prev = self.alpha_prev[i] * x0 + self.sigma_prev[i] * eps
        return state, prev.astype(sample.dtype)

    def x0_eps(
        self, model_output: jax.Array, sample: jax.Array, i: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """The clean sample (clipped to clip_sample_range, if any) and the noise that the
        model's output at step i implies: float32, sample's shape."""
        x0, eps = predict_x0_eps(
            self.prediction_type,
            model_output.astype(jnp.float32),
            sample.astype(jnp.float32),
            self.alpha[i],
            self.sigma[i],
        )
        if self.clip_sample_range is not None:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def add_noise(self, sample: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """Clean `sample` noised to step i's level, float32: alpha[i] * sample +
        sigma[i] * noise (diffusers' `add_noise` at timesteps[i])."""
        return noised(sample, noise, self.alpha[i], self.sigma[i])

    def restrict(self, steps: range) -> "DDIMSchedule":
        """Steps `steps` (contiguous) alone: what diffusers runs from timesteps[steps.start]."""
        names = ("timesteps", "alpha", "sigma", "alpha_prev", "sigma_prev")
        return self.replace(
            **{name: getattr(self, name)[steps.start : steps.stop] for name in names}
        )


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> DDIMSchedule:
    """The DDIM schedule diffusers' `set_timesteps(num_inference_steps)` sets up."""
    timesteps = np.round(spaced_timesteps(config, num_inference_steps)).astype(np.int64)
    alpha_bar = alphas_cumprod(config).astype(np.float64)
    target = timesteps - config.num_train_timesteps // num_inference_steps
    final = 1.0 if config.set_alpha_to_one else alpha_bar[0]
    alpha_bar_prev = np.where(target >= 0, alpha_bar[np.maximum(target, 0)], final)
    # Index like diffusers: the timestep -1 of the trailing quirk reads alpha_bar[-1].
    return DDIMSchedule(**schedule_fields(config, timesteps, alpha_bar[timesteps], alpha_bar_prev))


def schedule_fields(
    config: SchedulerConfig,
    timesteps: np.ndarray,
    alpha_bar_t: np.ndarray,
    alpha_bar_prev: np.ndarray,
) -> dict:
    """`DDIMSchedule`'s fields for (S,) timesteps and the float64 alpha_bar of each step's
    timestep and of the one it steps to."""
    return dict(
        timesteps=jnp.asarray(timesteps, jnp.float32),
        alpha=jnp.asarray(np.sqrt(alpha_bar_t), jnp.float32),
        sigma=jnp.asarray(np.sqrt(1 - alpha_bar_t), jnp.float32),
        alpha_prev=jnp.asarray(np.sqrt(alpha_bar_prev), jnp.float32),
        sigma_prev=jnp.asarray(np.sqrt(1 - alpha_bar_prev), jnp.float32),
        init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
    )

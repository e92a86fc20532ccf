"""DPM-Solver++ 2M: diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++",
solver_order 2, solver_type "midpoint"."""

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
class DPMSolverSchedule:
    """The DPM-Solver++ 2M sampler's S steps, precomputed as the coefficients of

        x_{i+1} = sample_coef[i] * x_i + x0_coef[i] * D0 + d1_coef[i] * (D0 - D0_prev)

    where D0 is step i's predicted x0 and D0_prev step i - 1's (the state). The sample lives
    in the variance-preserving form `alpha * x0 + sigma * eps`; lambda = log(alpha / sigma),
    h_i = lambda_{i+1} - lambda_i.

    timesteps: (S,) float32, what the model is called with at step i.
    alpha, sigma: (S,) float32 at step i.
    sample_coef: (S,) float32, sigma_{i+1} / sigma_i.
    x0_coef: (S,) float32, alpha_{i+1} * (1 - exp(-h_i)).
    d1_coef: (S,) float32, x0_coef[i] * h_i / (2 h_{i-1}) on second-order steps; 0 on
        first-order ones (the first, and the last as diffusers' lower_order_final,
        euler_at_final and final_sigmas_type "zero" say).
    init_noise_sigma: () float32, 1.
    """

    timesteps: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    sample_coef: jax.Array
    x0_coef: jax.Array
    d1_coef: jax.Array
    init_noise_sigma: jax.Array
    prediction_type: str = struct.field(pytree_node=False)
    draws_noise: ClassVar[bool] = False

    def init_state(self, sample: jax.Array) -> jax.Array:
        """The previous step's predicted x0: float32, sample's shape (unused at step 0)."""
        return jnp.zeros(sample.shape, jnp.float32)

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The model's input at step i: the sample itself."""
        return sample

    def step(
        self,
        state: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        i: jax.Array,
        noise: None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(this step's predicted x0 as the new state, the next sample)."""
        x = sample.astype(jnp.float32)
        x0, _ = predict_x0_eps(
            self.prediction_type, model_output.astype(jnp.float32), x, self.alpha[i], self.sigma[i]
        )
        prev = self.sample_coef[i] * x + self.x0_coef[i] * x0 + self.d1_coef[i] * (x0 - state)
        return x0, prev.astype(sample.dtype)

    def add_noise(self, sample: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """Clean `sample` noised to step i's level, float32: alpha[i] * sample +
        sigma[i] * noise (diffusers' `add_noise` before step i)."""
        return noised(sample, noise, self.alpha[i], self.sigma[i])

    def restrict(self, steps: range) -> "DPMSolverSchedule":
        """Steps `steps` (contiguous) alone: what diffusers runs after `set_begin_index`,
        whose first step is first order (no previous x0) and whose last keeps the order it
        has in the whole schedule."""
        names = ("timesteps", "alpha", "sigma", "sample_coef", "x0_coef", "d1_coef")
        part = {name: getattr(self, name)[steps.start : steps.stop] for name in names}
        part["d1_coef"] = part["d1_coef"].at[0].set(0.0)
        return self.replace(**part)


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> DPMSolverSchedule:
    """The DPM-Solver++ 2M schedule diffusers' `set_timesteps(num_inference_steps)` sets up."""
    if config.timestep_spacing == "trailing":
        grid = spaced_timesteps(config, num_inference_steps)
    else:  # num_inference_steps + 1 points, without the last
        grid = spaced_timesteps(config, num_inference_steps + 1)[:-1]
    timesteps = np.round(grid).astype(np.int64)
    sigmas = sigmas_at(config, alphas_cumprod(config), timesteps).astype(np.float64)
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma = 0 at the end: lambda = inf
        lam = np.log(alpha) - np.log(sigma)
        h = lam[1:] - lam[:-1]
        x0_coef = alpha[1:] * (1 - np.exp(-h))
        d1_coef = 0.5 * x0_coef * h / np.append(np.nan, h[:-1])
    steps = len(timesteps)
    last_first_order = (
        config.euler_at_final
        or (config.lower_order_final and steps < 15)
        or config.final_sigmas_type == "zero"
    )
    index = np.arange(steps)
    second_order = (index > 0) & ~((index == steps - 1) & last_first_order)
    return DPMSolverSchedule(
        timesteps=jnp.asarray(timesteps, jnp.float32),
        alpha=jnp.asarray(alpha[:-1], jnp.float32),
        sigma=jnp.asarray(sigma[:-1], jnp.float32),
        sample_coef=jnp.asarray(sigma[1:] / sigma[:-1], jnp.float32),
        x0_coef=jnp.asarray(x0_coef, jnp.float32),
        d1_coef=jnp.asarray(np.where(second_order, d1_coef, 0.0), jnp.float32),
        init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        prediction_type=config.prediction_type,
    )

"""LCM: diffusers' LCMScheduler, the multi-step sampler of latent consistency models (LCM
checkpoints and LCM-LoRA). Each step predicts the clean sample through the consistency
boundary condition, then noises it afresh to the next step's level (the noise is given to
`step`; the loop draws it, `sharding.loops.step_noise`); the last step returns the clean
prediction."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfusion.schedulers.common import alphas_cumprod
from jaxfusion.schedulers.config import SchedulerConfig
from jaxfusion.schedulers.ddim import DDIMSchedule, schedule_fields

SIGMA_DATA = 0.5  # diffusers' get_scalings_for_boundary_condition_discrete


@struct.dataclass
class LCMSchedule(DDIMSchedule):
    """The LCM sampler's S steps, precomputed: `DDIMSchedule`'s fields, where alpha_prev and
    sigma_prev are those of the next step's timestep (1 and 0 after the last step, which
    adds no noise), and

    c_skip, c_out: (S,) float32, the boundary condition at step i: the denoised sample is
        c_out * x0 + c_skip * sample, with s = timesteps[i] * timestep_scaling,
        c_skip = SIGMA_DATA^2 / (s^2 + SIGMA_DATA^2), c_out = s / sqrt(s^2 + SIGMA_DATA^2).
    """

    c_skip: jax.Array
    c_out: jax.Array
    draws_noise: ClassVar[bool] = True

    def step(
        self,
        state: tuple[()],
        model_output: jax.Array,
        sample: jax.Array,
        i: jax.Array,
        noise: jax.Array,
    ) -> tuple[tuple[()], jax.Array]:
        """(state, the denoised sample noised with `noise` (standard normal, sample's shape)
        to the next step's level), same shape and dtype as sample."""
        x0, _ = self.x0_eps(model_output, sample, i)
        denoised = self.c_out[i] * x0 + self.c_skip[i] * sample.astype(jnp.float32)
        prev = self.alpha_prev[i] * denoised + self.sigma_prev[i] * noise.astype(jnp.float32)
        return state, prev.astype(sample.dtype)

    def restrict(self, steps: range) -> "LCMSchedule":
        """Steps `steps` (contiguous) alone: what diffusers runs from timesteps[steps.start]."""
        part = DDIMSchedule.restrict(self, steps)
        return part.replace(
            c_skip=self.c_skip[steps.start : steps.stop], c_out=self.c_out[steps.start : steps.stop]
        )


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> LCMSchedule:
    """The LCM schedule diffusers' `set_timesteps(num_inference_steps)` sets up: of the
    `original_inference_steps` timesteps k - 1, 2k - 1, ... (k = num_train_timesteps //
    original_inference_steps), num_inference_steps evenly spaced by index, descending."""
    original = config.original_inference_steps
    k = config.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, original, num_inference_steps, endpoint=False))
    timesteps = origin[indices.astype(np.int64)]
    alpha_bar = alphas_cumprod(config).astype(np.float64)
    alpha_bar_t = alpha_bar[timesteps]
    alpha_bar_prev = np.append(alpha_bar[timesteps[1:]], 1.0)
    scaled = timesteps * config.timestep_scaling
    return LCMSchedule(
        **schedule_fields(config, timesteps, alpha_bar_t, alpha_bar_prev),
        c_skip=jnp.asarray(SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), jnp.float32),
        c_out=jnp.asarray(scaled / np.sqrt(scaled**2 + SIGMA_DATA**2), jnp.float32),
    )

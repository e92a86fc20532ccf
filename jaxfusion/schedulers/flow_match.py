"""Flow matching Euler: diffusers' FlowMatchEulerDiscreteScheduler as Flux.1's pipeline runs
it. The sample is the straight-line mix `(1 - sigma) * x0 + sigma * noise`, the model
predicts the velocity `noise - x0`, and each step is an Euler step of that ODE in sigma.

The noise levels are those of diffusers' `FluxPipeline`: it hands `set_timesteps` the sigmas
`linspace(1, 1 / n, n)` (n steps) and, with `use_dynamic_shifting`, the shift
`mu = calculate_shift(image_seq_len, ...)` of the image's token count; the scheduler shifts
them (`shift_levels`). (`set_timesteps(n)` alone, as SD3's pipeline calls it, spaces other
levels: not what this module makes.)

Image-to-image: `add_noise` is diffusers' `scale_noise` and `restrict` its
`set_begin_index`; note that Flux's img2img pipeline starts at step int(n - n * strength),
where `schedulers.denoising_steps` (SDXL's rule) starts at n - int(n * strength).
"""

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfusion.schedulers.common import noised
from jaxfusion.schedulers.config import SchedulerConfig


@struct.dataclass
class FlowMatchSchedule:
    """The flow matching Euler sampler's S steps, precomputed.

    timesteps: (S,) float32, what the model is called with at step i: sigmas[i] *
        num_train_timesteps.
    sigmas: (S + 1,) float32, the sample's noise level before step i; sigmas[S] = 0.
    init_noise_sigma: () float32, 1: the sample starts as pure noise.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    draws_noise: ClassVar[bool] = False

    def init_state(self, sample: jax.Array) -> tuple[()]:
        """Euler keeps no state between steps."""
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
        """(state, the sample at noise level sigmas[i + 1]): sample + (sigmas[i + 1] -
        sigmas[i]) * model_output (the velocity), in float32; same shape and dtype as
        sample."""
        x = sample.astype(jnp.float32)
        prev = x + (self.sigmas[i + 1] - self.sigmas[i]) * model_output.astype(jnp.float32)
        return state, prev.astype(sample.dtype)

    def add_noise(self, sample: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """Clean `sample` noised to step i's level, float32: (1 - sigmas[i]) * sample +
        sigmas[i] * noise (diffusers' `scale_noise` before step i)."""
        return noised(sample, noise, 1 - self.sigmas[i], self.sigmas[i])

    def restrict(self, steps: range) -> "FlowMatchSchedule":
        """Steps `steps` (contiguous) alone: what diffusers runs after `set_begin_index`."""
        start, stop = steps.start, steps.stop
        return self.replace(
            timesteps=self.timesteps[start:stop], sigmas=self.sigmas[start : stop + 1]
        )


def shift_mu(config: SchedulerConfig, image_seq_len: int) -> float:
    """The dynamic shift mu for an image of `image_seq_len` tokens: diffusers'
    `calculate_shift`, linear from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len (and beyond them)."""
    m = (config.max_shift - config.base_shift) / (
        config.max_image_seq_len - config.base_image_seq_len
    )
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def shift_levels(
    config: SchedulerConfig, sigmas: np.ndarray, image_seq_len: int | None
) -> np.ndarray:
    """float32 `sigmas` (in (0, 1]) shifted as `set_timesteps(sigmas=..., mu=...)` shifts
    them, in the same float32 arithmetic: dynamically by mu = `shift_mu(config,
    image_seq_len)` (exponential: e^mu / (e^mu + 1/sigma - 1); linear: mu / (mu + 1/sigma
    - 1)), else statically (shift * sigma / (1 + (shift - 1) * sigma)); then stretched to
    end at shift_terminal, where that is set (ValueError if the last level is 1: one step)."""
    if config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError(
                "the flow_match scheduler with use_dynamic_shifting needs image_seq_len, the "
                "image's token count ((latent height / 2) * (latent width / 2) for Flux)"
            )
        mu = shift_mu(config, image_seq_len)
        scale = math.exp(mu) if config.time_shift_type == "exponential" else mu
        sigmas = scale / (scale + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    if config.shift_terminal:
        if sigmas[-1] == 1:
            raise ValueError(
                f"shift_terminal={config.shift_terminal} stretches the noise levels to end "
                "there: it needs a last level below 1 (2 or more steps)"
            )
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    return sigmas.astype(np.float32)


def make_schedule(
    config: SchedulerConfig, num_inference_steps: int, image_seq_len: int | None = None
) -> FlowMatchSchedule:
    """The schedule of diffusers' FluxPipeline: `set_timesteps(sigmas=linspace(1, 1 / n, n),
    mu=calculate_shift(image_seq_len, ...))` for n = num_inference_steps. image_seq_len: the
    image's token count, which dynamic shifting needs (ValueError without it); unread
    otherwise."""
    levels = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
    sigmas = shift_levels(config, levels, image_seq_len)
    timesteps = sigmas * np.float32(config.num_train_timesteps)
    return FlowMatchSchedule(
        timesteps=jnp.asarray(timesteps),
        sigmas=jnp.asarray(np.append(sigmas, np.float32(0))),
        init_noise_sigma=jnp.asarray(1.0, jnp.float32),
    )

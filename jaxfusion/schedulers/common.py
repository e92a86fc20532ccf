"""What the schedulers share: the training noise schedule, the inference timesteps, and the
meaning of the model's output.

Host-side functions (numpy) reproduce diffusers' `__init__` / `set_timesteps` arithmetic: the
timesteps exactly, the noise levels to float32 rounding (torch's own float32 linspace and sqrt
are not those of numpy). `predict_x0_eps` runs inside the compiled loop.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxfusion.schedulers.config import SchedulerConfig


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """(num_train_timesteps,) float32: alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    else:  # scaled_linear
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    # torch accumulates a float32 cumprod in float64.
    return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)


def spaced_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """(num_steps,) float64, descending: `num_steps` of the training timesteps spread as
    `config.timestep_spacing` says (Table 2 of arXiv 2305.08891), not rounded ("linspace" gives
    fractions). "trailing" gives num_steps + 1 values for some counts (61 of 1000, say), the
    last of them -1; diffusers keeps that, and so do we.
    """
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps)[::-1]
    if config.timestep_spacing == "leading":
        return (np.arange(num_steps) * (n // num_steps))[::-1] + float(config.steps_offset)
    return np.round(np.arange(n, 0, -n / num_steps)) - 1  # trailing


def sigmas_at(config: SchedulerConfig, alpha_bar: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """(len(timesteps) + 1,) float32: the noise level sigma = sqrt((1 - alpha_bar) / alpha_bar)
    at each timestep, interpolated linearly between training timesteps, then the final sigma
    (0, or the smallest training sigma for final_sigmas_type "sigma_min")."""
    table = ((1 - alpha_bar) / alpha_bar) ** 0.5
    final = 0.0 if config.final_sigmas_type == "zero" else table[0]
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    return np.append(sigmas, final).astype(np.float32)


def noised(sample: jax.Array, noise: jax.Array, signal, level) -> jax.Array:
    """signal * sample + level * noise in float32 (signal and level scalars): a clean
    sample brought to a noise level, as diffusers' `add_noise`."""
    return signal * sample.astype(jnp.float32) + level * noise.astype(jnp.float32)


def predict_x0_eps(
    prediction_type: str, model_output: jax.Array, sample: jax.Array, alpha, sigma
) -> tuple[jax.Array, jax.Array]:
    """The clean sample x0 and the noise eps implied by the model's output, for a sample
    `alpha * x0 + sigma * eps` (alpha^2 + sigma^2 = 1). Elementwise: arrays of any one shape,
    alpha and sigma scalars. The model predicts eps ("epsilon") or v = alpha * eps - sigma * x0
    ("v_prediction")."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample

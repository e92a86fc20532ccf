"""Diffusion schedulers as pure JAX functions, for a sampling loop compiled as one program.

A host-side `make_schedule` precomputes everything the steps need into a pytree of arrays;
`scale_model_input` and `step` then index it with the (traced) step number `i`. They work
elementwise per pixel, so they run unchanged on a row slab of the latent. Results match the
diffusers scheduler of the same name and configuration (see `SchedulerConfig`).

    config = SchedulerConfig.from_diffusers(json.load(f), kind="dpmpp")
    schedule = make_schedule(config, num_inference_steps=50)
    latents = noise * schedule.init_noise_sigma

    def body(carry, i):
        latents, state = carry
        t = schedule.timesteps[i]
        model_output = unet(scale_model_input(schedule, latents, i), t, ...)
        state, latents = step(schedule, state, model_output, latents, i)
        return (latents, state), None

    steps = jnp.arange(schedule.timesteps.shape[0])
    (latents, _), _ = jax.lax.scan(body, (latents, init_state(schedule, latents)), steps)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jaxfusion.schedulers.config import CLASS_NAMES, KINDS, Kind, SchedulerConfig
from sharding.lazy import lazy_attributes

if TYPE_CHECKING:
    import jax

    from jaxfusion.schedulers.ddim import DDIMSchedule
    from jaxfusion.schedulers.dpmpp import DPMSolverSchedule
    from jaxfusion.schedulers.euler import EulerSchedule

    Schedule = EulerSchedule | DDIMSchedule | DPMSolverSchedule

# The samplers (modules named as their kind) import JAX: on first use, so that the command
# line reads `KINDS` without it.
_lazy_getattr, __dir__ = lazy_attributes(
    __name__,
    {
        "DDIMSchedule": "jaxfusion.schedulers.ddim",
        "DPMSolverSchedule": "jaxfusion.schedulers.dpmpp",
        "EulerSchedule": "jaxfusion.schedulers.euler",
    },
)
State = Any  # a small pytree: () for euler and ddim, the previous predicted x0 for dpmpp


def __getattr__(name: str) -> Any:
    """`Schedule` (the union of the schedule classes), the schedule classes and the
    submodules, imported on first use (PEP 562)."""
    if name != "Schedule":
        return _lazy_getattr(name)
    schedule = _lazy_getattr("EulerSchedule") | _lazy_getattr("DDIMSchedule")
    globals()[name] = schedule | _lazy_getattr("DPMSolverSchedule")
    return globals()[name]


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> Schedule:
    """The precomputed schedule of `config.kind` for `num_inference_steps` steps, as diffusers'
    `set_timesteps(num_inference_steps)`. It has `schedule.timesteps.shape[0]` steps: that
    many, except where diffusers' "trailing" spacing adds one (61 of 1000, say)."""
    # DPM-Solver spaces num_inference_steps + 1 points: as many as there are training
    # timesteps would repeat some.
    limit = config.num_train_timesteps - (config.kind == "dpmpp")
    if not 1 <= num_inference_steps <= limit:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is not supported by the {config.kind} "
            f"scheduler with num_train_timesteps={config.num_train_timesteps} (use 1..{limit})"
        )
    sampler = importlib.import_module(f"{__name__}.{config.kind}")
    return sampler.make_schedule(config, num_inference_steps)


def init_state(schedule: Schedule, sample: jax.Array) -> State:
    """The scheduler's state before the first step, for a sample (or slab) of this shape."""
    return schedule.init_state(sample)


def scale_model_input(schedule: Schedule, sample: jax.Array, i: jax.Array) -> jax.Array:
    """The model's input at step i: the sample, scaled as the scheduler needs (same shape)."""
    return schedule.scale_model_input(sample, i)


def step(
    schedule: Schedule, state: State, model_output: jax.Array, sample: jax.Array, i: jax.Array
) -> tuple[State, jax.Array]:
    """Step i: (the new state, the next sample) from the model's output at timesteps[i].
    Computes in float32; the sample keeps its shape and dtype."""
    return schedule.step(state, model_output, sample, i)


__all__ = [
    "CLASS_NAMES",
    "KINDS",
    "DDIMSchedule",
    "DPMSolverSchedule",
    "EulerSchedule",
    "Kind",
    "Schedule",
    "SchedulerConfig",
    "State",
    "init_state",
    "make_schedule",
    "scale_model_input",
    "step",
]

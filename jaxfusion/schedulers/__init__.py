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

flow_match (Flux.1's rectified flow) also takes the image's token count, `make_schedule(config,
steps, image_seq_len=...)`, where its config shifts the noise levels by image size.

The ancestral and consistency samplers (`schedule.draws_noise`: euler_a, lcm) also take
each step's fresh noise, `step(..., noise)`; the denoising loops draw it from a key and the
step index (`sharding.loops.step_noise`).
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jaxfusion.schedulers.config import (
    CLASS_NAMES,
    KINDS,
    SCHEDULERS,
    Kind,
    SchedulerConfig,
    SchedulerKind,
)
from nnxtools.lazy import lazy_attributes

if TYPE_CHECKING:
    import jax

    from jaxfusion.schedulers.ddim import DDIMSchedule
    from jaxfusion.schedulers.dpmpp import DPMSolverSchedule
    from jaxfusion.schedulers.euler import EulerSchedule
    from jaxfusion.schedulers.euler_ancestral import EulerAncestralSchedule
    from jaxfusion.schedulers.flow_match import FlowMatchSchedule
    from jaxfusion.schedulers.lcm import LCMSchedule

    Schedule = (
        EulerSchedule
        | DDIMSchedule
        | DPMSolverSchedule
        | EulerAncestralSchedule
        | LCMSchedule
        | FlowMatchSchedule
    )

# The samplers' modules import JAX: on first use, so that the command line reads `KINDS`
# without it.
_lazy_getattr, __dir__ = lazy_attributes(
    __name__, {entry.schedule: f"{__name__}.{entry.module}" for entry in SCHEDULERS.values()}
)
# A small pytree: () for all but dpmpp, whose state is the previous predicted x0.
State = Any


def __getattr__(name: str) -> Any:
    """`Schedule` (the union of the schedule classes), the schedule classes and the
    submodules, imported on first use (PEP 562)."""
    if name != "Schedule":
        return _lazy_getattr(name)
    classes = (_lazy_getattr(entry.schedule) for entry in SCHEDULERS.values())
    globals()[name] = functools.reduce(operator.or_, classes)
    return globals()[name]


def make_schedule(
    config: SchedulerConfig, num_inference_steps: int, *, image_seq_len: int | None = None
) -> Schedule:
    """The precomputed schedule of `config.kind` for `num_inference_steps` steps, as diffusers'
    `set_timesteps(num_inference_steps)`. It has `schedule.timesteps.shape[0]` steps: that
    many, except where diffusers' "trailing" spacing adds one (61 of 1000, say).

    image_seq_len: the image's token count, which flow_match's dynamic shifting
    (`config.use_dynamic_shifting`, Flux.1 dev) needs: (latent height / 2) * (latent width /
    2) for Flux (4096 at 1024x1024). flow_match makes the schedule of diffusers' FluxPipeline,
    `set_timesteps(sigmas=linspace(1, 1 / n, n), mu=calculate_shift(image_seq_len, ...))`.
    The other kinds do not depend on the image's size and ignore it."""
    # DPM-Solver spaces num_inference_steps + 1 points: as many as there are training
    # timesteps would repeat some. LCM picks its steps among original_inference_steps.
    limit, of = config.num_train_timesteps, f"num_train_timesteps={config.num_train_timesteps}"
    if config.kind == "dpmpp":
        limit -= 1
    elif config.kind == "lcm":
        limit = config.original_inference_steps
        of = f"original_inference_steps={limit}"
    if not 1 <= num_inference_steps <= limit:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is not supported by the {config.kind} "
            f"scheduler with {of} (use 1..{limit})"
        )
    sampler = importlib.import_module(f"{__name__}.{SCHEDULERS[config.kind].module}")
    if config.kind == "flow_match":
        return sampler.make_schedule(config, num_inference_steps, image_seq_len)
    return sampler.make_schedule(config, num_inference_steps)


def denoising_steps(
    timesteps: Sequence[float],
    num_inference_steps: int,
    num_train_timesteps: int,
    *,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> range:
    """The steps of a schedule (its `timesteps`, descending) that one run denoises, as
    diffusers' SDXL pipelines choose them (every sampler here has order 1). T is
    num_train_timesteps, n num_inference_steps.

    strength s (image-to-image, `get_timesteps`): the last min(int(n * s), n) of the n
    steps; the image is noised to the first of them. denoising_start f (the refiner after
    the base; strength is then ignored): the steps whose timestep is below
    round(T - f * T). denoising_end f (the base before the refiner): of those, the ones
    whose timestep is at least round(T - f * T). None: no such limit. Raises ValueError for
    a value out of its range, or a choice that leaves no step.
    """
    if strength is not None and not 0 <= strength <= 1:
        raise ValueError(f"strength={strength} must be in [0, 1]")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name}={value} must be strictly between 0 and 1")
    if None not in (denoising_start, denoising_end) and denoising_start >= denoising_end:
        raise ValueError(
            f"denoising_start={denoising_start} must be below denoising_end={denoising_end}"
        )

    def cutoff(fraction: float) -> int:
        return round(num_train_timesteps - fraction * num_train_timesteps)

    timesteps = list(map(float, timesteps))
    start = 0
    if denoising_start is not None:
        start = len(timesteps) - sum(t < cutoff(denoising_start) for t in timesteps)
    elif strength is not None:
        start = max(
            num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0
        )
    stop = len(timesteps)
    if denoising_end is not None:
        stop = start + sum(t >= cutoff(denoising_end) for t in timesteps[start:])
    if stop <= start:
        raise ValueError(
            f"no denoising step is left of {num_inference_steps} (strength={strength}, "
            f"denoising_start={denoising_start}, denoising_end={denoising_end}): raise "
            "num_inference_steps or strength, or widen the denoising range"
        )
    return range(start, stop)


def add_noise(schedule: Schedule, sample: jax.Array, noise: jax.Array) -> jax.Array:
    """Clean `sample` (the VAE's scaled latents of an image) noised with unit `noise` to
    the level of the schedule's first step, as diffusers' `add_noise` before a run that
    starts there (image-to-image); float32, sample's shape."""
    return schedule.add_noise(sample, noise, 0)


def restrict(schedule: Schedule, steps: range) -> Schedule:
    """The steps `steps` of `schedule` (a `denoising_steps` range) as a schedule of their
    own, the first run as diffusers runs a schedule's first step after `set_begin_index`."""
    return schedule.restrict(steps)


def init_state(schedule: Schedule, sample: jax.Array) -> State:
    """The scheduler's state before the first step, for a sample (or slab) of this shape."""
    return schedule.init_state(sample)


def scale_model_input(schedule: Schedule, sample: jax.Array, i: jax.Array) -> jax.Array:
    """The model's input at step i: the sample, scaled as the scheduler needs (same shape)."""
    return schedule.scale_model_input(sample, i)


def step(
    schedule: Schedule,
    state: State,
    model_output: jax.Array,
    sample: jax.Array,
    i: jax.Array,
    noise: jax.Array | None = None,
) -> tuple[State, jax.Array]:
    """Step i: (the new state, the next sample) from the model's output at timesteps[i].
    Computes in float32; the sample keeps its shape and dtype. `noise`: step i's fresh
    standard normal noise, sample's shape, for the samplers that draw some
    (`schedule.draws_noise`: euler_a, lcm); None for the others."""
    return schedule.step(state, model_output, sample, i, noise)


__all__ = [
    "CLASS_NAMES",
    "KINDS",
    "SCHEDULERS",
    "DDIMSchedule",
    "DPMSolverSchedule",
    "EulerAncestralSchedule",
    "EulerSchedule",
    "FlowMatchSchedule",
    "Kind",
    "LCMSchedule",
    "Schedule",
    "SchedulerConfig",
    "SchedulerKind",
    "State",
    "add_noise",
    "denoising_steps",
    "init_state",
    "make_schedule",
    "restrict",
    "scale_model_input",
    "step",
]

"""Which sampler runs, on which noise schedule: `SchedulerConfig`, read from diffusers configs."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

Kind = Literal["euler", "ddim", "dpmpp", "euler_a", "lcm", "flow_match"]

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclasses.dataclass(frozen=True)
class SchedulerKind:
    """A sampler kind as it is registered (`SCHEDULERS`).

    class_name: the diffusers scheduler it stands for.
    module, schedule: its module of `jaxfusion.schedulers` (imported on first use: it
      imports JAX) and the schedule class there.
    keys: the diffusers `__init__` arguments it implements, read into `SchedulerConfig`.
    defaults: that class's `__init__` defaults that differ from SchedulerConfig's (which are
      those of the other kinds): what `from_diffusers` takes for a key the config lacks.
    fixed: the `__init__` arguments that change the result but are not implemented, with
      the values accepted (diffusers' defaults). The other arguments change nothing for the
      values these accept (sigma_min/sigma_max, the thresholding and flow-shift parameters)
      and are ignored, like arguments of other scheduler classes.
    """

    class_name: str
    module: str
    schedule: str
    keys: tuple[str, ...]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, tuple] = dataclasses.field(default_factory=dict)


_COMMON_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
)
_OFF = (False, None)
_SIGMAS_OFF = {"use_karras_sigmas": _OFF, "use_exponential_sigmas": _OFF, "use_beta_sigmas": _OFF}
_ZERO_SNR_OFF = {"rescale_betas_zero_snr": _OFF}

# Every sampler kind, registered once: the command line's choices, `SchedulerConfig`, the
# samplers' modules and the diffusers backend read it.
SCHEDULERS: dict[Kind, SchedulerKind] = {
    "euler": SchedulerKind(
        "EulerDiscreteScheduler",
        "euler",
        "EulerSchedule",
        keys=(*_COMMON_KEYS, "final_sigmas_type"),
        fixed={
            "interpolation_type": ("linear",),
            **_SIGMAS_OFF,
            "timestep_type": ("discrete",),
            **_ZERO_SNR_OFF,
        },
    ),
    "ddim": SchedulerKind(
        "DDIMScheduler",
        "ddim",
        "DDIMSchedule",
        keys=(*_COMMON_KEYS, "clip_sample", "clip_sample_range", "set_alpha_to_one"),
        fixed={"thresholding": _OFF, **_ZERO_SNR_OFF},
    ),
    "dpmpp": SchedulerKind(
        "DPMSolverMultistepScheduler",
        "dpmpp",
        "DPMSolverSchedule",
        keys=(*_COMMON_KEYS, "final_sigmas_type", "lower_order_final", "euler_at_final"),
        fixed={
            "algorithm_type": ("dpmsolver++",),
            "solver_order": (2,),
            "solver_type": ("midpoint",),
            "thresholding": _OFF,
            **_SIGMAS_OFF,
            "use_lu_lambdas": _OFF,
            "use_flow_sigmas": _OFF,
            "lambda_min_clipped": (-math.inf,),
            "variance_type": (None,),
            **_ZERO_SNR_OFF,
        },
    ),
    "euler_a": SchedulerKind(
        "EulerAncestralDiscreteScheduler",
        "euler_ancestral",
        "EulerAncestralSchedule",
        keys=_COMMON_KEYS,
        fixed=_ZERO_SNR_OFF,
    ),
    "lcm": SchedulerKind(
        "LCMScheduler",
        "lcm",
        "LCMSchedule",
        keys=(
            *_COMMON_KEYS,
            "clip_sample",
            "clip_sample_range",
            "original_inference_steps",
            "timestep_scaling",
        ),
        defaults={
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
        },
        fixed={"thresholding": _OFF, **_ZERO_SNR_OFF},
    ),
    "flow_match": SchedulerKind(
        "FlowMatchEulerDiscreteScheduler",
        "flow_match",
        "FlowMatchSchedule",
        keys=(
            "num_train_timesteps",
            "shift",
            "use_dynamic_shifting",
            "base_shift",
            "max_shift",
            "base_image_seq_len",
            "max_image_seq_len",
            "shift_terminal",
            "time_shift_type",
        ),
        fixed={"invert_sigmas": _OFF, **_SIGMAS_OFF, "stochastic_sampling": _OFF},
    ),
}
KINDS: tuple[Kind, ...] = tuple(SCHEDULERS)
assert get_args(Kind) == KINDS, "Kind names the registered kinds, in order"
CLASS_NAMES: dict[str, Kind] = {entry.class_name: kind for kind, entry in SCHEDULERS.items()}


def _check(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported (use one of {list(valid)})")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A sampler (`kind`) and its noise schedule. Field names, meanings and defaults are those
    of the diffusers scheduler `kind` stands for: euler = EulerDiscreteScheduler,
    ddim = DDIMScheduler (eta = 0), dpmpp = DPMSolverMultistepScheduler (DPM-Solver++ 2M),
    euler_a = EulerAncestralDiscreteScheduler, lcm = LCMScheduler (these two draw fresh
    noise at each step), flow_match = FlowMatchEulerDiscreteScheduler (rectified flow, as
    Flux.1 runs it). LCMScheduler's own defaults of the noise schedule and clip_sample
    differ: `from_diffusers` fills those in for lcm; the defaults here are the others'.

    `timestep_spacing=None` means that scheduler's default: "leading" for ddim and lcm,
    "linspace" otherwise (lcm reads none: its timesteps are every k-th of
    `original_inference_steps` evenly spaced ones, k = num_train_timesteps //
    original_inference_steps). Fields a kind does not read are ignored (clip_sample and
    clip_sample_range are ddim's and lcm's, set_alpha_to_one ddim's, final_sigmas_type is
    euler's and dpmpp's, lower_order_final and euler_at_final are dpmpp's,
    original_inference_steps and timestep_scaling (of LCM's boundary conditions
    c_skip, c_out) are lcm's).

    flow_match reads num_train_timesteps and its own fields, which no other kind reads (the
    noise schedule, prediction_type and timestep_spacing are not its): a static `shift` of
    the noise levels, or, with `use_dynamic_shifting`, a shift that grows with the image's
    token count (`make_schedule`'s image_seq_len) from base_shift at base_image_seq_len to
    max_shift at max_image_seq_len, applied as `time_shift_type` says; `shift_terminal`
    (None or 0: off) stretches the shifted levels to end there.
    """

    kind: Kind
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    def __post_init__(self):
        _check("scheduler", self.kind, KINDS)
        if self.timestep_spacing is None:
            spacing = "leading" if self.kind in ("ddim", "lcm") else "linspace"
            object.__setattr__(self, "timestep_spacing", spacing)
        _check("timestep_spacing", self.timestep_spacing, SPACINGS)
        _check("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.trained_betas is None:
            _check("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        else:
            object.__setattr__(self, "trained_betas", tuple(map(float, self.trained_betas)))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.trained_betas)} values; "
                    f"num_train_timesteps={self.num_train_timesteps} needs one per timestep"
                )
        _check("time_shift_type", self.time_shift_type, TIME_SHIFT_TYPES)
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift} is not supported (use a positive shift)")
        if self.shift_terminal and not 0 < self.shift_terminal < 1:
            raise ValueError(
                f"shift_terminal={self.shift_terminal} is not supported (use None, or a value "
                "strictly between 0 and 1)"
            )
        if self.use_dynamic_shifting and None in (self.base_shift, self.max_shift):
            raise ValueError(
                f"use_dynamic_shifting needs base_shift and max_shift (got {self.base_shift} "
                f"and {self.max_shift})"
            )
        if self.use_dynamic_shifting and self.base_image_seq_len == self.max_image_seq_len:
            raise ValueError(
                f"base_image_seq_len and max_image_seq_len are both {self.max_image_seq_len}: "
                "dynamic shifting interpolates between them, they must differ"
            )
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps={self.original_inference_steps} is not supported "
                f"(use 1..num_train_timesteps={self.num_train_timesteps})"
            )

    @classmethod
    def from_diffusers(
        cls, config: Mapping[str, Any], kind: str | None = None
    ) -> "SchedulerConfig":
        """From a diffusers `scheduler_config.json` dict (or a diffusers scheduler's `.config`).

        kind: one of `KINDS` overrides the config's `_class_name`, as diffusers'
        `Scheduler.from_config(config)` does: only that scheduler's arguments are read, and
        the ones missing (or listed in `_use_default_values`) take its defaults. None: the
        config's own class, which must be one of `CLASS_NAMES`.
        Raises ValueError for an unknown kind or class, or an unsupported value.
        """
        if kind is None:
            class_name = config.get("_class_name")
            if class_name not in CLASS_NAMES:
                raise ValueError(
                    f"scheduler class {class_name!r} is not supported: choose a scheduler "
                    f"(one of {list(KINDS)}) or use a config of one of {list(CLASS_NAMES)}"
                )
            kind = CLASS_NAMES[class_name]
        _check("scheduler", kind, KINDS)
        defaults = set(config.get("_use_default_values", ()))
        given = {key: value for key, value in config.items() if key not in defaults}
        registered = SCHEDULERS[kind]
        for key, valid in registered.fixed.items():
            if key in given and given[key] not in valid:
                raise ValueError(
                    f"{key}={given[key]!r} is not supported by the {kind} scheduler "
                    f"(use one of {list(valid)})"
                )
        values = {**registered.defaults, **given}
        return cls(kind=kind, **{key: values[key] for key in registered.keys if key in values})

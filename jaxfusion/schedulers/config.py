"""Which sampler runs, on which noise schedule: `SchedulerConfig`, read from diffusers configs."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

Kind = Literal["euler", "ddim", "dpmpp", "euler_a", "lcm"]

CLASS_NAMES: dict[str, Kind] = {
    "EulerDiscreteScheduler": "euler",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LCMScheduler": "lcm",
}
KINDS: tuple[Kind, ...] = tuple(CLASS_NAMES.values())
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

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
# The diffusers __init__ arguments each kind implements: read into SchedulerConfig's fields.
_KEYS: dict[Kind, tuple[str, ...]] = {
    "euler": (*_COMMON_KEYS, "final_sigmas_type"),
    "ddim": (*_COMMON_KEYS, "clip_sample", "clip_sample_range", "set_alpha_to_one"),
    "dpmpp": (*_COMMON_KEYS, "final_sigmas_type", "lower_order_final", "euler_at_final"),
    "euler_a": _COMMON_KEYS,
    "lcm": (
        *_COMMON_KEYS,
        "clip_sample",
        "clip_sample_range",
        "original_inference_steps",
        "timestep_scaling",
    ),
}
# The diffusers __init__ defaults of a kind that differ from SchedulerConfig's (which are
# those of the other kinds): what `from_diffusers` takes for a key the config does not give.
_DEFAULTS: dict[Kind, dict[str, Any]] = {
    "lcm": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
    },
}
_OFF = (False, None)
# The diffusers __init__ arguments that change the result but are not implemented: the values
# accepted (diffusers' defaults). The other arguments change nothing for the values these accept
# (sigma_min/sigma_max, the thresholding and flow-shift parameters) and are ignored, like
# arguments of other scheduler classes.
_FIXED: dict[Kind, dict[str, tuple]] = {
    "euler": {
        "interpolation_type": ("linear",),
        "use_karras_sigmas": _OFF,
        "use_exponential_sigmas": _OFF,
        "use_beta_sigmas": _OFF,
        "timestep_type": ("discrete",),
        "rescale_betas_zero_snr": _OFF,
    },
    "ddim": {"thresholding": _OFF, "rescale_betas_zero_snr": _OFF},
    "dpmpp": {
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (2,),
        "solver_type": ("midpoint",),
        "thresholding": _OFF,
        "use_karras_sigmas": _OFF,
        "use_exponential_sigmas": _OFF,
        "use_beta_sigmas": _OFF,
        "use_lu_lambdas": _OFF,
        "use_flow_sigmas": _OFF,
        "lambda_min_clipped": (-math.inf,),
        "variance_type": (None,),
        "rescale_betas_zero_snr": _OFF,
    },
    "euler_a": {"rescale_betas_zero_snr": _OFF},
    "lcm": {"thresholding": _OFF, "rescale_betas_zero_snr": _OFF},
}


def _check(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported (use one of {list(valid)})")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A sampler (`kind`) and its noise schedule. Field names, meanings and defaults are those
    of the diffusers scheduler `kind` stands for: euler = EulerDiscreteScheduler,
    ddim = DDIMScheduler (eta = 0), dpmpp = DPMSolverMultistepScheduler (DPM-Solver++ 2M),
    euler_a = EulerAncestralDiscreteScheduler, lcm = LCMScheduler (the last two draw fresh
    noise at each step). LCMScheduler's own defaults of the noise schedule and clip_sample
    differ: `from_diffusers` fills those in for lcm; the defaults here are the others'.

    `timestep_spacing=None` means that scheduler's default: "leading" for ddim and lcm,
    "linspace" otherwise (lcm reads none: its timesteps are every k-th of
    `original_inference_steps` evenly spaced ones, k = num_train_timesteps //
    original_inference_steps). Fields a kind does not read are ignored (clip_sample and
    clip_sample_range are ddim's and lcm's, set_alpha_to_one ddim's, final_sigmas_type is
    euler's and dpmpp's, lower_order_final and euler_at_final are dpmpp's,
    original_inference_steps and timestep_scaling (of LCM's boundary conditions
    c_skip, c_out) are lcm's).
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
        for key, valid in _FIXED[kind].items():
            if key in given and given[key] not in valid:
                raise ValueError(
                    f"{key}={given[key]!r} is not supported by the {kind} scheduler "
                    f"(use one of {list(valid)})"
                )
        values = {**_DEFAULTS.get(kind, {}), **given}
        return cls(kind=kind, **{key: values[key] for key in _KEYS[kind] if key in values})

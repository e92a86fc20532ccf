"""jaxfusion's schedulers against diffusers' (PyTorch, CPU): a whole sampling loop with a fake
model, run by diffusers step by step and by jaxfusion as one compiled scan."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDIMScheduler
from diffusers_models import relative_l2
from fake_sampling import SDXL, configured, diffusers_sample, jax_sample

from jaxfusion import schedulers
from jaxfusion.schedulers import SchedulerConfig

# The samplers that draw no noise (euler_a and lcm: tests/test_few_step.py).
DETERMINISTIC = ("euler", "ddim", "dpmpp")
# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (SDXL's: fake_sampling.SDXL):
# a class we do not implement, no timestep_spacing.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# A diffusers scheduler's own .config: every value a default, listed in _use_default_values.
DEFAULTS = dict(DDIMScheduler().config)
BASES = {"sdxl": SDXL, "sd15": SD15, "defaults": DEFAULTS}
TOLERANCE = 1e-6
# DDIM's clipping of x0 drives the fake model's sample towards 0; relative to that small result
# float32 roundings (up to 5e-6 observed) show more.
CLIPPED_TOLERANCE = 1e-5


def check_parity(kind: str, config: dict, steps: int = 10, tolerance: float = TOLERANCE) -> int:
    """Asserts equal timesteps and final samples within tolerance; returns the step count."""
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16), np.float32)
    expected_timesteps, expected = diffusers_sample(kind, config, steps, noise)
    schedule = schedulers.make_schedule(SchedulerConfig.from_diffusers(config, kind), steps)
    np.testing.assert_array_equal(schedule.timesteps, expected_timesteps.astype(np.float32))
    error = relative_l2(np.asarray(jax_sample(schedule, jnp.asarray(noise))), expected)
    print(f"{kind}: relative L2 error {error:.1e}")
    assert error <= tolerance
    return len(expected_timesteps)


@pytest.mark.parametrize(
    ("base", "kind", "spacing", "prediction_type"),
    list(
        itertools.product(
            BASES,
            DETERMINISTIC,
            [None, "leading", "trailing", "linspace"],
            ["epsilon", "v_prediction"],
        )
    ),
)
def test_matches_diffusers(base, kind, spacing, prediction_type):
    """spacing None: the config's own, or the scheduler's default where it has none."""
    overrides = {"prediction_type": prediction_type}
    if spacing is not None:
        overrides["timestep_spacing"] = spacing
    check_parity(kind, configured(BASES[base], **overrides))


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("euler", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
        ("dpmpp", {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
        ("dpmpp", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}),
        ("ddim", {"set_alpha_to_one": True}),
    ],
)
def test_final_step_variants(kind, overrides, steps):
    check_parity(kind, configured(SDXL, **overrides), steps)


@pytest.mark.parametrize("clip_sample_range", [1.0, 1.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_clip_sample(prediction_type, clip_sample_range):
    overrides = {"clip_sample_range": clip_sample_range, "prediction_type": prediction_type}
    config = configured(SDXL, clip_sample=True, **overrides)
    check_parity("ddim", config, steps=20, tolerance=CLIPPED_TOLERANCE)


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_trained_betas(kind):
    betas = np.linspace(0.0002, 0.015, 1000) ** 1.2
    check_parity(kind, configured(SD15, trained_betas=betas.tolist(), beta_schedule="unused"))


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_trailing_extra_step(kind):
    """diffusers' trailing spacing makes 62 steps of 61, the last at timestep -1."""
    assert check_parity(kind, configured(SD15, timestep_spacing="trailing"), steps=61) == 62


def test_folder_class_is_the_default():
    assert SchedulerConfig.from_diffusers(SDXL).kind == "euler"
    ddim = SchedulerConfig.from_diffusers({**SDXL, "_class_name": "DDIMScheduler"})
    assert (ddim.kind, ddim.clip_sample, ddim.set_alpha_to_one) == ("ddim", False, False)
    dpmpp = SchedulerConfig.from_diffusers(SD15, "dpmpp")
    assert (dpmpp.kind, dpmpp.timestep_spacing) == ("dpmpp", "linspace")


def test_keys_of_other_schedulers_are_ignored():
    """Like diffusers' from_config: DDIM has no karras sigmas, Euler no clipping."""
    SchedulerConfig.from_diffusers({**SDXL, "use_karras_sigmas": True}, "ddim")
    SchedulerConfig.from_diffusers({**SDXL, "clip_sample": True, "thresholding": True}, "euler")


@pytest.mark.parametrize(
    ("config", "kind", "named"),
    [
        (SDXL, "heun", ["'heun'", "euler", "ddim", "dpmpp"]),
        (SD15, None, ["PNDMScheduler", "euler", "EulerDiscreteScheduler"]),
        ({**SDXL, "timestep_spacing": "karras"}, None, ["timestep_spacing", "'karras'", "leading"]),
        ({**SDXL, "prediction_type": "sample"}, "ddim", ["prediction_type", "'sample'", "epsilon"]),
        ({**SDXL, "beta_schedule": "squaredcos_cap_v2"}, "euler", ["squaredcos_cap_v2", "linear"]),
        ({**SDXL, "final_sigmas_type": "one"}, "dpmpp", ["final_sigmas_type", "sigma_min"]),
        ({**SDXL, "use_karras_sigmas": True}, "euler", ["use_karras_sigmas", "True"]),
        ({**SDXL, "interpolation_type": "log_linear"}, "euler", ["interpolation_type", "linear"]),
        ({**SDXL, "rescale_betas_zero_snr": True}, "ddim", ["rescale_betas_zero_snr"]),
        ({**SDXL, "thresholding": True}, "ddim", ["thresholding"]),
        ({**SDXL, "algorithm_type": "sde-dpmsolver++"}, "dpmpp", ["algorithm_type", "dpmsolver++"]),
        ({**SDXL, "solver_order": 3}, "dpmpp", ["solver_order", "3"]),
        ({**SDXL, "solver_type": "heun"}, "dpmpp", ["solver_type", "midpoint"]),
        ({**SDXL, "lambda_min_clipped": -5.1}, "dpmpp", ["lambda_min_clipped", "-5.1"]),
        ({**SDXL, "trained_betas": [0.01] * 10}, None, ["trained_betas", "num_train_timesteps"]),
    ],
)
def test_refuses_unsupported(config, kind, named):
    with pytest.raises(ValueError) as error:
        SchedulerConfig.from_diffusers(config, kind)
    for text in named:
        assert text in str(error.value)


@pytest.mark.parametrize(("kind", "steps"), [("euler", 0), ("ddim", 1001), ("dpmpp", 1000)])
def test_refuses_step_counts(kind, steps):
    with pytest.raises(ValueError, match=f"num_inference_steps={steps}"):
        schedulers.make_schedule(SchedulerConfig.from_diffusers(SDXL, kind), steps)


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_row_slabs_sample_independently(kind):
    """Elementwise per pixel: the latent's row slabs, sampled apart, give the whole latent."""
    schedule = schedulers.make_schedule(SchedulerConfig.from_diffusers(SDXL, kind), 10)
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 6, 4), np.float32))
    whole = jax_sample(schedule, noise)
    slabs = [jax_sample(schedule, noise[:, rows]) for rows in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(jnp.concatenate(slabs, axis=1), whole, rtol=1e-6, atol=1e-7)

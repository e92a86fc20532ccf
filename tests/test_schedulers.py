"""jaxfusion's schedulers against diffusers' (PyTorch, CPU): a whole sampling loop with a fake
model, run by diffusers step by step and by jaxfusion as one compiled scan."""

import itertools

import diffusers
import fake_sampling
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers_models import relative_l2
from fake_sampling import SDXL, configured, diffusers_sample, jax_sample

from convert.files import read_json
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


# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLOW_CONFIGS = {
    "dev": FLUX_DEV,
    "schnell": FLUX_SCHNELL,
    "static_shift_3": {**FLUX_SCHNELL, "shift": 3.0},
    "linear": {**FLUX_DEV, "time_shift_type": "linear"},
    "shift_terminal": {**FLUX_DEV, "shift_terminal": 0.1},
}
# Image token counts: (latent height / 2) * (latent width / 2), 256 at 256x256 pixels.
SEQ_LENS = (256, 1024, 4096, 16384)


def flow_reference(config: dict, steps: int, image_seq_len: int | None):
    """diffusers' scheduler with its timesteps set as FluxPipeline sets them."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    fake_sampling.set_timesteps(scheduler, steps, image_seq_len)
    return scheduler


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize(
    ("name", "image_seq_len"),
    [("dev", n) for n in SEQ_LENS]
    + [("schnell", None), ("schnell", 4096), ("static_shift_3", None)]
    + [("linear", 1024), ("linear", 16384)],
)
def test_flow_match_levels(name, image_seq_len, steps):
    """The timesteps and noise levels of diffusers' FluxPipeline, to the float32 bit."""
    config = FLOW_CONFIGS[name]
    reference = flow_reference(config, steps, image_seq_len)
    ours = schedulers.make_schedule(
        SchedulerConfig.from_diffusers(config), steps, image_seq_len=image_seq_len
    )
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, reference.sigmas.numpy())
    assert ours.timesteps.dtype == ours.sigmas.dtype == jnp.float32
    assert float(ours.init_noise_sigma) == 1.0


@pytest.mark.parametrize(
    ("name", "steps", "image_seq_len"),
    [("dev", 28, 1024), ("dev", 4, 16384), ("schnell", 4, None), ("shift_terminal", 10, 4096)],
)
def test_flow_match_loop(name, steps, image_seq_len):
    """N steps of the fake model, diffusers' `step` loop against our compiled scan."""
    config = FLOW_CONFIGS[name]
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16), np.float32)
    _, expected = diffusers_sample("flow_match", config, steps, noise, image_seq_len=image_seq_len)
    schedule = schedulers.make_schedule(
        SchedulerConfig.from_diffusers(config), steps, image_seq_len=image_seq_len
    )
    error = relative_l2(np.asarray(jax_sample(schedule, jnp.asarray(noise))), expected)
    print(f"flow_match {name}, {steps} steps: relative L2 error {error:.1e}")
    assert error <= TOLERANCE


def test_flow_match_from_saved_folder(tmp_path):
    """A scheduler folder written by diffusers' save_config loads as flow_match."""
    diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV).save_config(tmp_path)
    config = SchedulerConfig.from_diffusers(read_json(tmp_path / "scheduler_config.json"))
    assert config.kind == "flow_match"
    assert (config.use_dynamic_shifting, config.base_shift, config.max_shift) == (True, 0.5, 1.15)
    assert (config.base_image_seq_len, config.max_image_seq_len, config.shift) == (256, 4096, 3.0)
    reference = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    fake_sampling.set_timesteps(reference, 28, 4096)
    schedule = schedulers.make_schedule(config, 28, image_seq_len=4096)
    np.testing.assert_array_equal(schedule.timesteps, reference.timesteps.numpy())


def test_flow_match_add_noise_and_restrict():
    """diffusers' scale_noise after set_begin_index(k); restrict keeps steps k.. of it."""
    schedule = schedulers.make_schedule(
        SchedulerConfig.from_diffusers(FLUX_DEV), 10, image_seq_len=1024
    )
    reference = flow_reference(FLUX_DEV, 10, 1024)
    reference.set_begin_index(3)
    rng = np.random.default_rng(2)
    sample, noise = rng.standard_normal((2, 1, 4, 8, 8), np.float32)
    expected = reference.scale_noise(
        torch.from_numpy(sample), reference.timesteps[3:4], torch.from_numpy(noise)
    )
    part = schedulers.restrict(schedule, range(3, 10))
    np.testing.assert_array_equal(part.timesteps, schedule.timesteps[3:])
    np.testing.assert_array_equal(part.sigmas, schedule.sigmas[3:])
    ours = schedulers.add_noise(part, jnp.asarray(sample), jnp.asarray(noise))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_flow_match_row_slabs_sample_independently():
    schedule = schedulers.make_schedule(SchedulerConfig.from_diffusers(FLUX_SCHNELL), 4)
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 6, 16), np.float32))
    whole = jax_sample(schedule, noise)
    slabs = [jax_sample(schedule, noise[:, rows]) for rows in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(jnp.concatenate(slabs, axis=1), whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"use_karras_sigmas": True}, ["use_karras_sigmas", "flow_match"]),
        ({"use_exponential_sigmas": True}, ["use_exponential_sigmas"]),
        ({"use_beta_sigmas": True}, ["use_beta_sigmas"]),
        ({"invert_sigmas": True}, ["invert_sigmas"]),
        ({"stochastic_sampling": True}, ["stochastic_sampling"]),
        ({"time_shift_type": "cosine"}, ["time_shift_type", "'cosine'", "exponential"]),
        ({"shift_terminal": 1.5}, ["shift_terminal=1.5"]),
        ({"shift": 0.0}, ["shift=0.0"]),
        ({"max_shift": None}, ["max_shift"]),
        ({"max_image_seq_len": 256}, ["base_image_seq_len", "max_image_seq_len"]),
    ],
)
def test_flow_match_refuses_unsupported(overrides, named):
    with pytest.raises(ValueError) as error:
        SchedulerConfig.from_diffusers(configured(FLUX_DEV, **overrides))
    for text in named:
        assert text in str(error.value)


def test_flow_match_refusals_at_schedule_time():
    dev = SchedulerConfig.from_diffusers(FLUX_DEV)
    with pytest.raises(ValueError, match="image_seq_len"):
        schedulers.make_schedule(dev, 28)
    terminal = SchedulerConfig.from_diffusers({**FLUX_DEV, "shift_terminal": 0.1})
    with pytest.raises(ValueError, match="shift_terminal"):
        schedulers.make_schedule(terminal, 1, image_seq_len=4096)


def test_image_seq_len_is_ignored_by_the_other_kinds():
    config = SchedulerConfig.from_diffusers(SDXL, "euler")
    plain = schedulers.make_schedule(config, 10)
    sized = schedulers.make_schedule(config, 10, image_seq_len=4096)
    np.testing.assert_array_equal(plain.sigmas, sized.sigmas)

"""Few-step sampling: Euler ancestral and LCM (fresh noise at every step, given explicitly to
both sides) against diffusers' schedulers and pipelines, guidance off (guidance_scale 0, as
SDXL-Turbo runs) against diffusers, the same step noise on every patch device (each layout
equals single; the pipeline under sync: tests/test_features_parallel.py), and the warm-up
of displaced mode for short runs."""

import json
import shutil

import fake_sampling
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import LCMScheduler
from diffusers_models import relative_l2
from fake_sampling import SDXL, configured, jax_sample
from flax import nnx
from pipelines import LATENT_SIZE, MIN_PSNR, PROMPT, SIZE, initial_latents, save_random_pipeline

import jaxfusion
from jaxfusion import schedulers
from jaxfusion.cli import build_parser
from jaxfusion.diffusers_backend import load_diffusers_pipeline, run_diffusers
from jaxfusion.images import psnr
from jaxfusion.schedulers import SchedulerConfig
from sharding.loops import Sampling, denoise, slab_noise, step_noise
from sharding.parallel import ParallelConfig

STEPS = 4
TOLERANCE = 1e-6  # as tests/test_schedulers.py
KEY = jax.random.key(7)


def diffusers_sample(kind: str, config: dict, steps: int, noise: np.ndarray) -> np.ndarray:
    """diffusers' scheduler `kind`, step by step on the fake model, its step i drawing
    `step_noise(KEY, i)` (NCHW)."""
    shape = noise.transpose(0, 2, 3, 1).shape
    fresh = [np.asarray(step_noise(KEY, i, shape)).transpose(0, 3, 1, 2) for i in range(steps)]
    return fake_sampling.diffusers_sample(kind, config, steps, noise, np.stack(fresh))[1]


@pytest.mark.parametrize(
    ("kind", "overrides", "steps"),
    [
        ("euler_a", {"timestep_spacing": "trailing"}, 4),
        ("euler_a", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, 4),
        ("euler_a", {"timestep_spacing": "linspace"}, 10),
        ("lcm", {}, 4),
        ("lcm", {"prediction_type": "v_prediction", "original_inference_steps": 40}, 6),
        ("lcm", {"clip_sample": True, "timestep_scaling": 5.0}, 1),
    ],
)
def test_schedulers_match_diffusers(kind, overrides, steps):
    """The sampling loop of the fake model of test_schedulers.py, the noise each step adds
    drawn by us and handed to diffusers' step."""
    config = configured(SDXL, **overrides)
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16), np.float32)
    expected = diffusers_sample(kind, config, steps, noise)
    schedule = schedulers.make_schedule(SchedulerConfig.from_diffusers(config, kind), steps)
    reference = fake_sampling.diffusers_scheduler(kind).from_config(config)
    reference.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.timesteps, reference.timesteps.numpy())
    actual = np.asarray(jax_sample(schedule, jnp.asarray(noise.transpose(0, 2, 3, 1)), KEY))
    error = relative_l2(actual.transpose(0, 3, 1, 2), expected)
    print(f"{kind} {overrides}: relative L2 error {error:.1e}")
    assert error <= TOLERANCE


def test_lcm_defaults_are_lcm_schedulers():
    """A config without the noise schedule (diffusers' defaults in _use_default_values) takes
    LCMScheduler's own defaults, not DDIM's."""
    config = dict(LCMScheduler().config)
    ours = SchedulerConfig.from_diffusers(config, "lcm")
    expected = (0.00085, 0.012, "scaled_linear", False, 50, 10.0)
    got = (ours.beta_start, ours.beta_end, ours.beta_schedule, ours.clip_sample,
           ours.original_inference_steps, ours.timestep_scaling)  # fmt: skip
    assert got == expected


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory):
    """The tiny random SDXL pipeline with an SDXL-Turbo-style scheduler config: Euler
    ancestral, trailing timestep spacing."""
    folder = save_random_pipeline(tmp_path_factory.mktemp("turbo"), "sdxl")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    index_file = folder / "model_index.json"  # where diffusers reads the scheduler class
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "scheduler": ["diffusers", config["_class_name"]]}))
    return folder


@pytest.fixture(scope="module")
def turbo(turbo_folder):
    return jaxfusion.SDXLPipeline.from_pretrained(turbo_folder, dtype="float32")


def compare(folder, pipe, scheduler: str | None, guidance_scale: float, label: str) -> None:
    """Both pipelines from the same initial latents and the same noise at every step."""
    latents = initial_latents(1, 4, LATENT_SIZE, LATENT_SIZE, seed=0)
    options = dict(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance_scale
    )
    torch_pipe = load_diffusers_pipeline(folder, scheduler=scheduler, device="cpu")
    noise = pipe.step_noises(1, SIZE, SIZE, seed=3, steps=STEPS)
    expected = run_diffusers(torch_pipe, PROMPT, latents=latents, step_noise=noise, **options)
    actual = pipe(PROMPT, latents=latents, seed=3, scheduler=scheduler, **options)
    value = psnr(actual, expected)
    print(f"PSNR {label}: {value:.1f} dB")
    assert value >= MIN_PSNR, (label, value)
    # The step noise matters: diffusers with other noise is far off.
    other = run_diffusers(torch_pipe, PROMPT, latents=latents, step_noise=noise[::-1], **options)
    assert psnr(actual, other) < 60


def test_turbo_style_euler_a_without_guidance_matches_diffusers(turbo_folder, turbo):
    """guidance_scale 0 (the UNet on the conditional batch alone), the folder's own Euler
    ancestral scheduler with trailing spacing, 4 steps."""
    compare(turbo_folder, turbo, None, 0.0, "euler_a trailing, guidance 0")


@pytest.mark.slow
def test_lcm_with_low_guidance_matches_diffusers(turbo_folder, turbo):
    """LCM-LoRA style: LCMScheduler from the folder's config, guidance 1.5 (CFG on)."""
    compare(turbo_folder, turbo, "lcm", 1.5, "lcm, guidance 1.5")


class Elementwise(nnx.Module):
    """A denoiser without spatial layers: every parallel mode gives the single-device
    result, if and only if each device adds its part of the same step noise."""

    row_unit = 1

    def __init__(self):
        self.scale = nnx.Param(jnp.float32(0.1))

    def predict(self, latents, timestep, conditioning):
        return latents * self.scale[...] + jnp.sin(timestep / 100)

    def cache_conditioning(self, conditioning):
        pass


@pytest.mark.parametrize("kind", ["euler_a", "lcm"])
@pytest.mark.parametrize("size", [(8, 8), (10, 7)], ids=["equal", "unequal"])
def test_every_layout_adds_the_same_step_noise(kind, size):
    """Row slabs (sync, displaced), column slabs (naive "col") and both in turn (naive
    "alternate", the noise traded to columns with the latent) on 4 devices; equal slabs,
    and unequal ones (10 rows: 3, 3, 2, 2; 7 columns: 2, 2, 2, 1)."""
    schedule = schedulers.make_schedule(SchedulerConfig.from_diffusers(SDXL, kind), STEPS)
    graphdef, weights = nnx.split(Elementwise())
    noise = np.random.default_rng(0).standard_normal((2, *size, 4))
    latents = jnp.asarray(noise, jnp.float32)

    def run(parallel: ParallelConfig, key=KEY) -> np.ndarray:
        sampling = Sampling(schedule, None, None, key)
        go = jax.jit(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
        return np.asarray(go(weights, sampling, latents * schedule.init_noise_sigma))

    single = run(ParallelConfig())
    for parallel in [
        ParallelConfig(4, mode="sync"),
        ParallelConfig(4, mode="displaced", warmup_steps=0),
        ParallelConfig(4, mode="naive", naive_split="col"),
        ParallelConfig(4, mode="naive", naive_split="alternate"),
    ]:
        assert relative_l2(run(parallel), single) < TOLERANCE, parallel  # float32 rounding
    assert relative_l2(run(ParallelConfig(), jax.random.key(8)), single) > 1e-2


def test_default_warmup_keeps_displaced_steps_in_short_runs():
    """The default warm-up: 4 synchronous steps after step 0 from 16 steps on (50-step runs
    as DistriFusion), about a quarter of a short run, never step 0 alone; a chosen one is
    kept. Every run of 3 steps or more has displaced steps."""
    default = ParallelConfig(4)
    assert [default.warmup(n) for n in (1, 2, 4, 7, 8, 12, 16, 50)] == [1, 1, 1, 1, 2, 3, 4, 4]
    assert all(default.has_displaced_steps(n) for n in range(3, 60))
    assert dict(default.schedule(4)) == {"warm-up": range(2), "displaced": range(2, 4)}
    assert ParallelConfig(4, warmup_steps=0).warmup(4) == 0
    assert default.for_steps(8) == ParallelConfig(4, warmup_steps=2)


def test_refusals(turbo_folder, turbo, tmp_path):
    with pytest.warns(UserWarning, match=r"warm-up covers all 2 steps \(warmup_steps=1\)"):
        turbo.prepare(PROMPT, num_inference_steps=2, parallel=ParallelConfig(4))
    with pytest.raises(ValueError, match=r"original_inference_steps=50 \(use 1..50\)"):
        turbo.prepare(PROMPT, num_inference_steps=51, scheduler="lcm")
    with pytest.raises(ValueError, match=r"cfg=2 .* guidance is off"):
        turbo.prepare(PROMPT, guidance_scale=0, parallel=ParallelConfig(4, cfg=2))
    sampling = Sampling(schedulers.make_schedule(SchedulerConfig(kind="euler_a"), 2), None, None)
    with pytest.raises(ValueError, match=r"EulerAncestralSchedule draws .* noise_key"):
        slab_noise(sampling, jnp.zeros((1, 4, 4, 4)), jnp.int32(0), ParallelConfig())
    # LCM-distilled UNets take the guidance scale as an embedding (time_cond_proj_dim): not
    # implemented, refused when the folder is read (LCM-LoRA on a base model is the way).
    folder = shutil.copytree(turbo_folder, tmp_path / "lcm-unet")
    unet_config = folder / "unet" / "config.json"
    unet_config.write_text(
        json.dumps({**json.loads(unet_config.read_text()), "time_cond_proj_dim": 256})
    )
    with pytest.raises(ValueError, match="time_cond_proj_dim: 256 is not supported"):
        jaxfusion.load_pipeline(folder, abstract=True)


def test_command_line_takes_few_step_options():
    parser = build_parser()
    for scheduler in ("euler_a", "lcm"):
        args = parser.parse_args(
            ["generate", "--prompt", "x", "--out", "x.png", "--scheduler", scheduler,
             "--guidance", "0", "--steps", "1"]
        )  # fmt: skip
        assert (args.scheduler, args.guidance) == (scheduler, 0.0)

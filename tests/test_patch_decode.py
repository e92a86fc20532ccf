"""The VAE decode split by rows over the mesh (`sharding.rows.map_rows`) against the same
decode on one device, the pipeline's program that keeps the latent split from the loop to
the image, and weights that are placed on a mesh once."""

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers_models import randomize, relative_l2

import jaxfusion
from jaxfusion.bench.schedule import read_schedule
from jaxfusion.builtin import builtin_model_path
from jaxfusion.models import AutoencoderKL, load_vae
from sharding import ParallelConfig
from sharding.rows import map_rows

ROUNDING = 1e-5  # float32, relative L2: what reordering the same sums may change
# The same for a whole generation: three guided steps amplify that rounding (measured up to
# 1.1e-5 on 4 devices, varying from run to run).
GENERATION_ROUNDING = 1e-4
# Four levels and a mid-block attention as SDXL's VAE, narrow enough for a CPU test.
SDXL_LIKE_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    randomize(diffusers.AutoencoderKL(**SDXL_LIKE_VAE), scale=0.2).save_pretrained(folder)
    return {
        "builtin": load_vae(builtin_model_path()),
        "sdxl-like": load_vae(folder),
    }


def decode(vae: AutoencoderKL, latents: np.ndarray, parallel: ParallelConfig) -> np.ndarray:
    run = jax.jit(lambda z: map_rows(vae, AutoencoderKL.decode, z, parallel))
    return np.asarray(run(latents))


@pytest.mark.parametrize("name", ["builtin", "sdxl-like"])
@pytest.mark.parametrize(
    "patches", [pytest.param(2, marks=pytest.mark.slow), 4, pytest.param(8, marks=pytest.mark.slow)]
)
def test_patch_parallel_decode_equals_one_device(vaes, name, patches):
    vae = vaes[name]
    latents = np.random.default_rng(patches).standard_normal((2, 16, 12, 4)).astype("f4")
    expected = np.asarray(jax.jit(vae.decode)(latents))
    actual = decode(vae, latents, ParallelConfig(patches, mode="sync"))
    assert (
        actual.shape
        == expected.shape
        == (2, 16 * vae.config.downscale_factor, 12 * vae.config.downscale_factor, 3)
    )
    assert relative_l2(actual, expected) < ROUNDING
    assert expected.std() > 0.01


def test_decode_with_the_guidance_halves_split(vaes):
    """With C = 2 both cfg rows of the mesh decode the same latent: still the same image."""
    vae = vaes["sdxl-like"]
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype("f4")
    expected = np.asarray(jax.jit(vae.decode)(latents))
    actual = decode(vae, latents, ParallelConfig(8, 2, mode="sync"))
    assert relative_l2(actual, expected) < ROUNDING


@pytest.fixture(scope="module")
def pipe():
    return jaxfusion.load_pipeline(builtin_model_path())


OPTIONS = dict(prompt="a red circle at the top left", height=128, width=128, num_inference_steps=3)


@pytest.mark.slow
def test_latent_and_image_are_never_gathered(pipe):
    """The compiled displaced program returns the image split by rows (the batch over the
    "data" axis, of size 1 here), and none of its collectives has the shape of the whole
    latent or the whole image."""
    parallel = ParallelConfig(4, warmup_steps=1)
    program = pipe.compile(*pipe.prepare(**OPTIONS, parallel=parallel))
    assert program.output_shardings.spec == jax.sharding.PartitionSpec("data", "patch")
    whole = {(1, 128 // 4, 128 // 4, 4), (1, 128, 128, 3), (1, 128 // 4, 128 // 4, 8)}
    shapes = {a.dims for c in read_schedule(program.as_text()).collectives for a in c.arrays}
    assert shapes and not shapes & whole, shapes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "displaced"])
def test_weights_are_placed_once(pipe, mode):
    """A second call on the same mesh copies nothing from device to device (the weights
    were placed on the first) and gives the same image."""
    parallel = ParallelConfig(4, mode=mode, warmup_steps=1)
    first = pipe(**OPTIONS, parallel=parallel)
    with jax.transfer_guard_device_to_device("disallow"):
        second = pipe(**OPTIONS, parallel=parallel)
    np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_sync_generation_equals_single(pipe):
    """Loop and decode both split over 3, 4 and 8 devices: the single-device image (on 3,
    unequal slabs: 12, 12 and 8 of the 32 latent rows, in arrays of 12)."""
    single = pipe(**OPTIONS)
    for devices in (3, 4, 8):
        sync = pipe(**OPTIONS, parallel=ParallelConfig(devices, mode="sync"))
        assert relative_l2(sync, single) < GENERATION_ROUNDING, devices

"""Image sizes that do not halve evenly through the UNet, as diffusers draws them (parity
with diffusers at such sizes: tests/test_unet_parity.py, test_pipelines.py, test_img2img.py,
test_refiner.py)."""

import re

import numpy as np
import pytest
from commands import jaxfusion_command

from jaxfusion.images import read_image
from jaxfusion.pipelines.stable_diffusion_xl import TRAINING_SIZES
from sharding import ParallelConfig


@pytest.mark.slow
@pytest.mark.parametrize(
    ("devices", "height", "width"),
    [
        # 1/30: an 18x32 latent (the built-in VAE's factor 4), odd from the UNet's level 1.
        (1, 72, 128),
        # 1/15: a 36x64 latent over 8 devices, 8 then 4 latent rows each in arrays of 8
        # (unequal slabs, tests/test_uneven.py).
        (8, 144, 256),
    ],
)
def test_command_draws_4k_uhd_proportions(tmp_path, devices, height, width):
    """3840x2160 scaled down for the built-in model, on one device and on eight."""
    out = tmp_path / "uhd.png"
    jaxfusion_command(
        tmp_path / "cache",
        *("generate", "--prompt", "a red circle", "--steps", "2", "--seed", "0"),
        *("--height", str(height), "--width", str(width), "--devices", str(devices)),
        *("--out", str(out)),
    )
    image = read_image(out)
    assert image.shape == (height, width, 3)
    assert np.ptp(image) > 0.1  # drawn, not a blank canvas


@pytest.mark.parametrize(("height", "width"), [*TRAINING_SIZES, (2160, 3840)])
def test_sdxl_buckets_and_4k_uhd_split_over_every_device_count(height, width):
    """Patch parallelism takes SDXL's sizes (8 pixels per latent row, boundaries at 4
    latent rows) on 1 to 8 devices, with and without the guidance halves split."""
    for devices in range(1, 9):
        ParallelConfig(devices).check_size(height, width, 8, 4)
        ParallelConfig(2 * devices, 2).check_size(height, width, 8, 4)


@pytest.mark.parametrize(
    ("parallel", "height", "most", "devices", "least"),
    [
        # SDXL: 32 pixels per row of the coarsest level; 200 pixels have 7 such rows (the
        # last one partly), so at most 7 patches, and 8 need 7 x 32 + 8 = 232 pixels.
        (ParallelConfig(8), 200, 7, "1 to 7 devices", 232),
        (ParallelConfig(16, 2), 200, 7, "2 to 14 devices with CFG parallel", 232),
        (ParallelConfig(4), 64, 2, "1 to 2 devices", 104),
    ],
)
def test_refusal_names_the_device_counts_that_work(parallel, height, most, devices, least):
    """Each patch needs a row of the coarsest level: a size with fewer such rows than
    patches is refused with the most patches it takes and the least size these patches
    take, each of which is then taken (and one row less refused)."""
    message = f"use at most {most} patches ({devices}), or a height of at least {least}"
    with pytest.raises(ValueError, match=re.escape(message)):
        parallel.check_size(height, 1024, 8, 4)
    ParallelConfig(most).check_size(height, 1024, 8, 4)
    parallel.check_size(least, 1024, 8, 4)
    with pytest.raises(ValueError, match="does not split"):
        parallel.check_size(least - 8, 1024, 8, 4)

"""Image sizes that do not halve evenly through the UNet, as diffusers draws them (parity
with diffusers at such sizes: tests/test_unet_parity.py, test_pipelines.py, test_img2img.py,
test_refiner.py)."""

import re

import numpy as np
import pytest
from commands import jaxfusion_command

from jaxfusion.images import read_image
from sharding import ParallelConfig


@pytest.mark.slow
def test_command_draws_4k_uhd_proportions(tmp_path):
    """3840x2160 scaled by 1/30 for the built-in model: 72x128 pixels, a 9x16 latent (odd
    from the start), on one device."""
    out = tmp_path / "uhd.png"
    jaxfusion_command(
        tmp_path / "cache",
        *("generate", "--prompt", "a red circle", "--steps", "2", "--seed", "0"),
        *("--height", "72", "--width", "128", "--out", str(out)),
    )
    image = read_image(out)
    assert image.shape == (72, 128, 3)
    assert np.ptp(image) > 0.1  # drawn, not a blank canvas


@pytest.mark.parametrize(
    ("parallel", "height", "splits"),
    [
        # SDXL: 32 pixels per patch. 1216 = 38 x 32, 1152 = 36 x 32; 1080 is no multiple.
        (ParallelConfig(8), 1152, [1, 2, 3, 4, 6, 9, 12, 18, 36]),
        (ParallelConfig(8, 2), 1216, [1, 2, 19, 38]),
        (ParallelConfig(4), 1080, []),
    ],
)
def test_refusal_names_the_patch_counts_that_split_the_size(parallel, height, splits):
    """Patch parallelism needs equal slabs at every UNet level: a size that does not split
    is refused with the sizes near it and every patch count that splits it (the divisors of
    height / 32), each of which is then taken."""
    counts = ", ".join(map(str, splits[:-1])) + f" or {splits[-1]} patches" if splits else ""
    with pytest.raises(ValueError, match="or " + (re.escape(counts) if splits else "one device")):
        parallel.check_size(height, 1024, 32)
    for patches in splits[1:]:
        ParallelConfig(patches).check_size(height, 1024, 32)

"""Image sizes that do not halve evenly through the UNet, as diffusers draws them (parity
with diffusers at such sizes: tests/test_unet_parity.py, test_pipelines.py, test_img2img.py,
test_refiner.py)."""

import numpy as np
import pytest
from commands import jaxfusion_command

from jaxfusion.images import read_image


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

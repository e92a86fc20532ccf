"""`jaxfusion train` on a few steps: it writes a pipeline folder that both jaxfusion and
diffusers load, with its loss curve and record, and the same seed gives the same weights."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxfusion import cli
from jaxfusion.train import shapes

STEPS = ["--vae-steps", "12", "--unet-steps", "3"]


@pytest.mark.slow
def test_train_writes_a_loadable_pipeline_deterministically(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["train", "--out", str(first), *STEPS]) == 0
    assert cli.main(["train", "--out", str(first), *STEPS]) == 2  # exists: refused
    assert cli.main(["train", "--out", str(second), *STEPS]) == 0

    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        name = "model.safetensors" if "text" in component else "diffusion_pytorch_model.safetensors"
        a, b = (load_file(folder / component / name) for folder in (first, second))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{component}: {key}")

    record = json.loads((first / "training.json").read_text())
    assert record["config"]["vae_steps"] == 12 and record["config"]["unet_steps"] == 3
    assert (first / "loss.png").stat().st_size > 0

    from jaxfusion import diffusers_backend
    from jaxfusion.pipelines import load_pipeline

    ours = load_pipeline(first)
    theirs = diffusers_backend.load_diffusers_pipeline(first)
    assert ours.vae.config.scaling_factor == theirs.vae.config.scaling_factor
    assert ours.vae.config.scaling_factor != 1.0  # set from the trained VAE's latents


def test_scenes_are_deterministic_and_captions_use_the_vocabulary():
    images, captions = shapes.batch(seed=3, index=7, batch_size=8, size=32)
    again, captions_again = shapes.batch(seed=3, index=7, batch_size=8, size=32)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    assert images.shape == (8, 32, 32, 3) and images.min() >= -1 and images.max() <= 1
    assert {word for caption in captions for word in caption.split()} <= set(shapes.WORDS)

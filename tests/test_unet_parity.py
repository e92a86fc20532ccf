"""The Flax UNet against diffusers' UNet2DConditionModel on the same checkpoint files."""

import jax.numpy as jnp
import numpy as np
import pytest
from diffusers_models import (
    SD2_LIKE,
    SD15_LIKE,
    SDXL_LIKE,
    assert_same_parameters,
    jax_unet_output,
    randomize,
    relative_l2,
    save_random_unet,
    torch_unet_output,
    unet_inputs,
)
from flax import nnx

from jaxfusion import UNet2DConditionModel, UNetConfig
from jaxfusion.models import load_unet, save_unet
from jaxfusion.models.resnet import nearest_indices
from jaxfusion.models.scaled_dot_product import set_attention

CONFIGS = {"sdxl": SDXL_LIKE, "sd15": SD15_LIKE, "sd2": SD2_LIKE}
# The issue asks for float32 <= 1e-5; we hold 3e-6 (observed ~1e-6), because a diffusers
# detail such as the transformer GroupNorm's eps (1e-6, not 1e-5) shifts the error only to
# about 4e-6 on these models.
TOLERANCE = {"float32": 3e-6, "bfloat16": 2e-2, "float16": 5e-3}
# Chunks for the chunked attention kernel that divide none of the attention lengths of
# test_non_square_input (40 and 10 image tokens, 7 text tokens).
CHUNKS = dict(query_chunk=6, key_chunk=16)


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
    """name -> (folder, the diffusers model) for every config."""
    saved = {}
    for name, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        saved[name] = (folder, save_random_unet(folder, config))
    return saved


# Every architecture in float32 (the fast tier, -m "not slow", keeps sdxl), the half
# precisions on SDXL, and SD 2.x in float16 too: there diffusers computes the attention
# scores in float32 (its upcast_attention), a path of the reference's own below float32.
@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("sdxl", "float32"),
        *(
            pytest.param(name, dtype, marks=pytest.mark.slow)
            for name, dtype in (
                ("sdxl", "bfloat16"),
                ("sdxl", "float16"),
                ("sd15", "float32"),
                ("sd2", "float32"),
                ("sd2", "float16"),
            )
        ),
    ],
)
def test_matches_diffusers(saved_unets, name, dtype):
    folder, torch_unet = saved_unets[name]
    inputs = unet_inputs(CONFIGS[name])
    expected = torch_unet_output(torch_unet, inputs)
    actual = jax_unet_output(load_unet(folder, dtype=dtype), inputs)
    error = relative_l2(actual, expected)
    print(f"{name} {dtype}: relative L2 error {error:.2e}")
    assert error <= TOLERANCE[dtype]


def test_nearest_indices_match_torch():
    """Upsampling to the skip's size picks PyTorch's rows, up to 4K UHD's 270-row latent."""
    import torch

    for size in (*range(1, 40), 68, 135, 240):
        for output_size in (2 * size - 1, 2 * size):
            source = torch.arange(size, dtype=torch.float32).reshape(1, 1, size, 1)
            expected = torch.nn.functional.interpolate(source, size=(output_size, 1))
            np.testing.assert_array_equal(
                nearest_indices(size, output_size), expected.flatten().numpy().astype(int)
            )


@pytest.mark.parametrize(("height", "width"), [(7, 10), (6, 14)])
def test_sizes_that_do_not_halve_evenly(saved_unets, height, width):
    """A latent that is odd (7: 7 -> 4 -> 2, upsampled 2 -> 4 -> 7) or not a multiple of
    4 (6 -> 3 -> 2 -> 3 -> 6), as diffusers draws them: the down path rounds up, each
    upsampler goes to the size of the skip it meets."""
    folder, torch_unet = saved_unets["sdxl"]
    inputs = unet_inputs(SDXL_LIKE, batch=1, height=height, width=width)
    expected = torch_unet_output(torch_unet, inputs)
    actual = jax_unet_output(load_unet(folder), inputs)
    assert actual.shape == (1, height, width, 4)
    assert relative_l2(actual, expected) <= TOLERANCE["float32"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_non_square_input(saved_unets, backend):
    folder, torch_unet = saved_unets["sdxl"]
    inputs = unet_inputs(SDXL_LIKE, batch=1, height=8, width=20)
    expected = torch_unet_output(torch_unet, inputs)
    unet = load_unet(folder)
    set_attention(unet, backend, **CHUNKS)
    actual = jax_unet_output(unet, inputs)
    assert actual.shape == (1, 8, 20, 4)
    assert relative_l2(actual, expected) <= TOLERANCE["float32"]


@pytest.mark.slow
def test_round_trip_flax_diffusers_flax(tmp_path):
    """A Flax UNet written with save_unet is loaded by diffusers, computes the same, and
    loads back into Flax with identical parameters."""
    from diffusers import UNet2DConditionModel as TorchUNet

    config = UNetConfig(**SDXL_LIKE)
    unet = UNet2DConditionModel(config, rngs=nnx.Rngs(3))
    save_unet(unet, tmp_path)
    torch_unet = TorchUNet.from_pretrained(tmp_path).eval()
    inputs = unet_inputs(SDXL_LIKE, batch=1)
    error = relative_l2(jax_unet_output(unet, inputs), torch_unet_output(torch_unet, inputs))
    assert error <= TOLERANCE["float32"]

    reloaded = load_unet(tmp_path)
    assert_same_parameters(unet, reloaded)


@pytest.mark.slow
def test_pipeline_folder_sharded_and_fp16_variant(tmp_path):
    """A pipeline folder's unet/, written sharded and as the fp16 variant, loads and matches."""
    torch_unet = save_random_unet(tmp_path / "unet", SD15_LIKE, max_shard_size="20KB")
    randomize(torch_unet).half().save_pretrained(tmp_path / "unet", variant="fp16")
    assert len(list((tmp_path / "unet").glob("*.safetensors"))) > 2
    inputs = unet_inputs(SD15_LIKE, batch=1)

    from diffusers import UNet2DConditionModel as TorchUNet

    sharded = TorchUNet.from_pretrained(tmp_path / "unet").eval()
    error = relative_l2(
        jax_unet_output(load_unet(tmp_path), inputs), torch_unet_output(sharded, inputs)
    )
    assert error <= TOLERANCE["float32"]

    half = TorchUNet.from_pretrained(tmp_path / "unet", variant="fp16").float().eval()
    loaded = load_unet(tmp_path, variant="fp16", dtype=jnp.float32)
    error = relative_l2(jax_unet_output(loaded, inputs), torch_unet_output(half, inputs))
    assert error <= TOLERANCE["float32"]

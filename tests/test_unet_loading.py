"""Building UNets from real configurations without weights, and refusing what cannot load."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers_models import SD15_LIKE, save_random_unet
from flax import nnx

from convert.files import PickleWeightsRefused
from convert.state_dict import WeightMismatch, diffusers_key, to_diffusers_shape
from jaxfusion import UNet2DConditionModel, UNetConfig
from jaxfusion.models import load_unet
from jaxfusion.models.configs import UNET_CONFIGS


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_full_size_parameters_match_diffusers(name):
    """Every parameter of the real SD/SDXL UNets, built abstractly, has diffusers' key and
    shape (diffusers' model built on the meta device: no memory either side)."""
    config = UNET_CONFIGS[name]
    abstract = UNet2DConditionModel.abstract(UNetConfig.from_diffusers(config), dtype=jnp.bfloat16)
    ours = {
        diffusers_key(path): to_diffusers_shape(path[-1], var.get_value().shape)
        for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    with torch.device("meta"):
        torch_unet = TorchUNet.from_config(config)
    theirs = {key: tuple(p.shape) for key, p in torch_unet.state_dict().items()}
    assert ours == theirs


def test_sdxl_forward_traces_without_weights():
    abstract = UNet2DConditionModel.abstract(
        UNetConfig.from_diffusers(UNET_CONFIGS["sdxl"]), dtype=jnp.bfloat16
    )
    graphdef, state = nnx.split(abstract)

    def forward(state, sample, t, text, pooled, time_ids):
        return nnx.merge(graphdef, state)(sample, t, text, pooled, time_ids)

    shapes = (
        jax.ShapeDtypeStruct((2, 128, 128, 4), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((2, 77, 2048), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 1280), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 6), jnp.float32),
    )
    out = jax.eval_shape(forward, state, *shapes)
    assert out.shape == (2, 128, 128, 4) and out.dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    save_random_unet(folder, SD15_LIKE)
    return folder


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_unknown_config_keys_and_values_are_named(unet_folder, tmp_path):
    folder = _copy(unet_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(class_embed_type="timestep", frobnicate=3, resnet_time_scale_shift="scale_shift")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_unet(folder)
    for name in ("class_embed_type", "frobnicate", "resnet_time_scale_shift"):
        assert name in str(error.value)


def test_unsupported_block_type_is_named():
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig(**{**SD15_LIKE, "down_block_types": ("SimpleCrossAttnDownBlock2D",) * 4})


def test_missing_unexpected_and_misshaped_keys_in_one_error(unet_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(unet_folder, tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_in.weight"], tensors["mid_block.resnets.0.conv1.bias"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["conv_out.bias"] = np.zeros(5, np.float32)
    save_file(tensors, weights)
    with pytest.raises(WeightMismatch) as error:
        load_unet(folder)
    message = str(error.value)
    for key in (
        "conv_in.weight",
        "mid_block.resnets.0.conv1.bias",
        "extra.weight",
        "conv_out.bias",
    ):
        assert key in message


def test_pickle_weights_refused_unless_opted_in(unet_folder, tmp_path):
    folder = _copy(unet_folder, tmp_path)
    TorchUNet.from_pretrained(folder).save_pretrained(folder, safe_serialization=False)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PickleWeightsRefused, match="allow_pickle"):
        load_unet(folder)
    loaded = load_unet(folder, allow_pickle=True)
    reference = load_unet(unet_folder)
    np.testing.assert_array_equal(loaded.conv_in.kernel[...], reference.conv_in.kernel[...])


def test_missing_weights_and_wrong_folder_are_explained(unet_folder, tmp_path):
    folder = _copy(unet_folder, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        load_unet(folder)
    with pytest.raises(FileNotFoundError, match="unet/"):
        load_unet(tmp_path)


def test_bad_dtype_and_layout_are_refused(unet_folder):
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load_unet(unet_folder, dtype="int8")
    unet = load_unet(unet_folder)
    with pytest.raises(ValueError, match="NHWC"):
        unet(jnp.zeros((1, 4, 16, 16)), 1.0, jnp.zeros((1, 7, 24)))

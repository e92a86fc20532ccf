"""Saving a model's parameters as an orbax checkpoint and restoring them into an abstract model."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from diffusers_models import SDXL_LIKE, unet_inputs
from flax import nnx

from convert.flax_checkpoint import (
    PARAMS_DIR,
    has_flax_params,
    load_flax_params,
    save_flax_params,
)
from convert.state_dict import WeightMismatch
from jaxfusion.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig

TINY_VAE = VAEConfig.from_diffusers(
    dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
    )
)


def random_params(abstract: nnx.Module, seed: int) -> nnx.Module:
    """The abstract module with float32 normal parameters drawn in numpy (fast: no per-shape
    random-number programs to compile, as an eager `nnx.Rngs` initialisation has)."""
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    flat = [
        (path, var.replace(jnp.asarray(0.1 * rng.standard_normal(var.get_value().shape))))
        for path, var in nnx.to_flat_state(params)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def flat_params(module: nnx.Module) -> dict[tuple, np.ndarray]:
    return {
        path: np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def assert_bit_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for path, array in expected.items():
        assert actual[path].dtype == array.dtype, path
        assert actual[path].tobytes() == array.tobytes(), path


@partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict) -> jax.Array:
    return nnx.merge(graphdef, state)(**inputs)


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    """(folder, the random float32 UNet saved there)."""
    config = UNetConfig.from_diffusers(SDXL_LIKE)
    unet = random_params(UNet2DConditionModel.abstract(config), seed=0)
    folder = tmp_path_factory.mktemp("unet")
    assert not has_flax_params(folder)
    assert save_flax_params(unet, folder) == folder / PARAMS_DIR
    assert has_flax_params(folder)
    return folder, unet


def test_round_trip_is_bit_identical(saved_unet):
    folder, unet = saved_unet
    abstract = UNet2DConditionModel.abstract(unet.config, dtype=jnp.float32)
    loaded = load_flax_params(abstract, folder, jnp.float32)
    assert_bit_identical(flat_params(loaded), flat_params(unet))

    inputs = unet_inputs(SDXL_LIKE, batch=1)
    expected = forward(*nnx.split(unet), inputs)
    np.testing.assert_array_equal(forward(*nnx.split(loaded), inputs), expected)


def test_load_casts_to_bfloat16(saved_unet):
    folder, unet = saved_unet
    abstract = UNet2DConditionModel.abstract(unet.config, dtype=jnp.bfloat16)
    loaded = load_flax_params(abstract, folder, "bf16")
    cast = {path: array.astype(jnp.bfloat16) for path, array in flat_params(unet).items()}
    assert_bit_identical(flat_params(loaded), cast)


def test_mismatch_and_missing_checkpoint_are_named(saved_unet, tmp_path):
    folder = saved_unet[0]
    config = UNetConfig.from_diffusers(dict(SDXL_LIKE, in_channels=8, cross_attention_dim=40))
    with pytest.raises(WeightMismatch) as error:
        load_flax_params(UNet2DConditionModel.abstract(config), folder, jnp.float32)
    message = str(error.value)
    assert "conv_in.kernel: checkpoint (3, 3, 4, 16), model (3, 3, 8, 16)" in message
    assert "attn2.to_k.kernel: checkpoint (48, " in message

    with pytest.raises(FileNotFoundError, match="no Flax checkpoint"):
        load_flax_params(AutoencoderKL.abstract(TINY_VAE), tmp_path, jnp.float32)
    save_flax_params(random_params(AutoencoderKL.abstract(TINY_VAE), seed=1), tmp_path)
    without_quant_conv = AutoencoderKL.abstract(
        VAEConfig.from_diffusers(dict(TINY_VAE.to_diffusers(), use_quant_conv=False))
    )
    with pytest.raises(WeightMismatch, match=r"unexpected in the checkpoint \(2\)"):
        load_flax_params(without_quant_conv, tmp_path, jnp.float32)


def test_overwrite_and_failed_write_keep_a_whole_checkpoint(tmp_path, monkeypatch):
    first, second, third = (
        random_params(AutoencoderKL.abstract(TINY_VAE), seed) for seed in (1, 2, 3)
    )
    save_flax_params(first, tmp_path)
    save_flax_params(second, tmp_path)
    abstract = AutoencoderKL.abstract(TINY_VAE)
    assert_bit_identical(
        flat_params(load_flax_params(abstract, tmp_path, jnp.float32)), flat_params(second)
    )

    write = ocp.PyTreeCheckpointHandler.save

    def write_then_fail(self, *args, **kwargs):  # the arrays are written, not finalized
        write(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "save", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_flax_params(third, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [PARAMS_DIR]
    assert_bit_identical(
        flat_params(load_flax_params(abstract, tmp_path, jnp.float32)), flat_params(second)
    )


def test_relative_folders_as_a_user_types_them(tmp_path, monkeypatch):
    """orbax takes absolute paths only; the folders here are relative to the working
    directory, written and read back from there."""
    vae = random_params(AutoencoderKL.abstract(TINY_VAE), seed=4)
    monkeypatch.chdir(tmp_path)
    assert save_flax_params(vae, Path("vae-flax")) == Path("vae-flax").absolute() / PARAMS_DIR
    assert has_flax_params(Path("vae-flax"))
    loaded = load_flax_params(AutoencoderKL.abstract(TINY_VAE), "vae-flax", jnp.float32)
    assert_bit_identical(flat_params(loaded), flat_params(vae))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae-flax"]


def test_an_unreadable_checkpoint_is_named_with_what_to_do(tmp_path):
    save_flax_params(random_params(AutoencoderKL.abstract(TINY_VAE), seed=5), tmp_path)
    (tmp_path / PARAMS_DIR / "_METADATA").write_text("not orbax's")
    with pytest.raises(ValueError, match="not a readable orbax checkpoint") as error:
        load_flax_params(AutoencoderKL.abstract(TINY_VAE), tmp_path, jnp.float32)
    assert str(tmp_path / PARAMS_DIR) in str(error.value)
    assert "jaxfusion convert" in str(error.value)

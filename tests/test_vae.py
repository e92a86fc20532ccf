"""The Flax AutoencoderKL against diffusers' on the same checkpoint files."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers_models import randomize, relative_l2
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.state_dict import diffusers_key, state_dict, to_diffusers_shape
from jaxfusion.models import (
    AutoencoderKL,
    LatentDistribution,
    VAEConfig,
    load_vae,
    load_vae_config,
    save_vae,
)
from jaxfusion.models.scaled_dot_product import set_attention

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)
# Flux.1's VAE (black-forest-labs/FLUX.1-dev vae/config.json): 16 latent channels, no quant
# convs, latents shifted before scaling.
FLUX_VAE = dict(
    _class_name="AutoencoderKL",
    _diffusers_version="0.30.0.dev0",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    force_upcast=True,
    in_channels=3,
    latent_channels=16,
    latents_mean=None,
    latents_std=None,
    layers_per_block=2,
    mid_block_add_attention=True,
    norm_num_groups=32,
    out_channels=3,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_post_quant_conv=False,
    use_quant_conv=False,
)
# TINY shaped as Flux's.
TINY_FLUX = dict(
    TINY,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# Chunks for the chunked attention kernel that divide neither mid-block length of
# test_matches_diffusers (256 tokens encoding, 64 decoding; one head of 16 channels).
CHUNKS = dict(query_chunk=24, key_chunk=40)


def images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """NHWC images in [-1, 1], as diffusers' image processor gives them."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype("f4")


def latents(batch: int, height: int, width: int, seed: int = 1, channels: int = 4) -> np.ndarray:
    shape = (batch, height, width, channels)
    return np.random.default_rng(seed).standard_normal(shape).astype("f4")


def torch_encode(vae, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' latent mean and logvar for NHWC images, returned NHWC."""
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    return dist.mean.permute(0, 2, 3, 1).numpy(), dist.logvar.permute(0, 2, 3, 1).numpy()


def torch_decode(vae, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    return out.permute(0, 2, 3, 1).numpy()


def jax_apply(vae: AutoencoderKL, method: str, x: np.ndarray):
    """`vae.<method>(x)`, compiled once."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def apply(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x)

    return apply(state, x)


def as_f32(array) -> np.ndarray:
    return np.asarray(array.astype(jnp.float32))


def param_dtypes(vae: AutoencoderKL) -> set:
    return {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def random_vae(config: VAEConfig, seed: int = 3) -> AutoencoderKL:
    """A Flax VAE with PyTorch-like random parameters drawn in numpy (an eager `nnx.Rngs`
    initialisation compiles one random-number program per parameter shape: seconds)."""
    graphdef, params, rest = nnx.split(AutoencoderKL.abstract(config), nnx.Param, ...)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        if len(shape) > 1:  # kernels: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            value = rng.uniform(-1, 1, shape) / np.sqrt(np.prod(shape[:-1]))
        else:  # norm scales near one, biases near zero
            value = rng.uniform(-0.1, 0.1, shape) + (path[-1] == "scale")
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    """(folder, the diffusers model) of a tiny random AutoencoderKL."""
    from diffusers import AutoencoderKL as TorchVAE

    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = randomize(TorchVAE(**TINY))
    vae.save_pretrained(folder)
    return folder, vae


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_matches_diffusers(saved_vae, dtype, backend):
    folder, torch_vae = saved_vae
    vae = load_vae(folder, dtype=dtype)
    set_attention(vae, backend, **CHUNKS)
    x, z = images(2, 32, 32), latents(2, 8, 8)
    expected_mean, expected_logvar = torch_encode(torch_vae, x)
    dist = jax_apply(vae, "encode", x)
    decoded = jax_apply(vae, "decode", z)
    f = vae.config.downscale_factor
    assert dist.mean.shape == (2, 32 // f, 32 // f, 4) and decoded.shape == (2, 8 * f, 8 * f, 3)
    assert dist.mean.dtype == decoded.dtype == jnp.dtype(dtype)
    errors = {
        "mean": relative_l2(as_f32(dist.mean), expected_mean),
        "logvar": relative_l2(as_f32(dist.logvar), expected_logvar),
        "decode": relative_l2(as_f32(decoded), torch_decode(torch_vae, z)),
    }
    print(f"{dtype}: relative L2 errors " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE[dtype]


def test_non_square_odd_size(saved_vae):
    """Odd heights go through the bottom/right-padded downsampler as in diffusers."""
    folder, torch_vae = saved_vae
    vae = load_vae(folder)
    x, z = images(1, 17, 24), latents(1, 6, 10)
    mean, logvar = torch_encode(torch_vae, x)
    dist = jax_apply(vae, "encode", x)
    decoded = jax_apply(vae, "decode", z)
    assert dist.mean.shape == (1, 8, 12, 4) and decoded.shape == (1, 12, 20, 3)
    assert relative_l2(dist.mean, mean) <= TOLERANCE["float32"]
    assert relative_l2(dist.logvar, logvar) <= TOLERANCE["float32"]
    assert relative_l2(decoded, torch_decode(torch_vae, z)) <= TOLERANCE["float32"]


def test_round_trip_flax_diffusers_flax(tmp_path):
    """A Flax VAE written with save_vae is loaded by diffusers with the same tensors and
    decodes the same, and loads back into Flax with identical parameters."""
    from diffusers import AutoencoderKL as TorchVAE

    config = VAEConfig(**TINY, shift_factor=0.1, force_upcast=False)
    vae = random_vae(config)
    save_vae(vae, tmp_path)
    torch_vae = TorchVAE.from_pretrained(tmp_path).eval()
    assert torch_vae.config.shift_factor == 0.1 and not torch_vae.config.force_upcast
    ours = state_dict(vae)
    theirs = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    z = latents(1, 8, 8)
    error = relative_l2(jax_apply(vae, "decode", z), torch_decode(torch_vae, z))
    assert error <= TOLERANCE["float32"]

    reloaded = load_vae(tmp_path)
    assert reloaded.config == config
    for key, value in state_dict(reloaded).items():
        np.testing.assert_array_equal(value, ours[key], err_msg=key)


def copy_with_force_upcast(folder, target, force_upcast: bool):
    shutil.copytree(folder, target, dirs_exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "force_upcast": force_upcast}))
    return target


def test_float16_with_force_upcast_runs_float32(saved_vae, tmp_path):
    """As diffusers' pipelines do, a float16 pipeline runs a force_upcast VAE in float32."""
    folder, torch_vae = saved_vae
    copy_with_force_upcast(folder, tmp_path, True)
    assert load_vae_config(tmp_path).compute_dtype(jnp.bfloat16) == jnp.bfloat16
    vae = load_vae(tmp_path, dtype="float16")
    assert vae.dtype == jnp.float32 and param_dtypes(vae) == {jnp.dtype(jnp.float32)}
    z = latents(1, 8, 8)
    decoded = jax_apply(vae, "decode", z)
    assert decoded.dtype == jnp.float32
    assert relative_l2(decoded, torch_decode(torch_vae, z)) <= TOLERANCE["float32"]


def test_float16_without_force_upcast_stays_float16(saved_vae, tmp_path):
    folder, torch_vae = saved_vae
    copy_with_force_upcast(folder, tmp_path, False)
    vae = load_vae(tmp_path, dtype="float16")
    assert vae.dtype == jnp.float16 and param_dtypes(vae) == {jnp.dtype(jnp.float16)}
    z = latents(1, 8, 8)
    decoded = jax_apply(vae, "decode", z)
    assert decoded.dtype == jnp.float16
    assert relative_l2(as_f32(decoded), torch_decode(torch_vae, z)) <= 5e-3


def test_legacy_attention_names(saved_vae, tmp_path):
    """Checkpoints from before diffusers 0.14 (`query`, `key`, `value`, `proj_attn`) load."""
    folder, _ = saved_vae
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in tensors.items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = state_dict(load_vae(tmp_path))
    assert loaded.keys() == tensors.keys()
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_pipeline_folder(saved_vae, tmp_path):
    folder, _ = saved_vae
    shutil.copytree(folder, tmp_path / "vae")
    assert load_vae_config(tmp_path) == load_vae_config(folder)


def test_config_round_trip_and_refusals(saved_vae):
    folder, _ = saved_vae
    config = json.loads((folder / "config.json").read_text())
    ours = VAEConfig.from_diffusers(config).to_diffusers()
    assert {k: v for k, v in config.items() if k in ours} == json.loads(json.dumps(ours))

    bad = {
        **config,
        "latents_mean": [0.0] * 4,
        "norm_type": "spatial",
        "act_fn": "gelu",
        "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    }
    with pytest.raises(ValueError, match="latents_mean") as error:
        VAEConfig.from_diffusers(bad)
    assert "norm_type: unknown key" in str(error.value)
    with pytest.raises(ValueError, match="act_fn") as error:
        VAEConfig.from_diffusers({k: v for k, v in bad.items() if k in ours})
    assert "'AttnUpDecoderBlock2D' is not supported" in str(error.value)


@pytest.mark.parametrize("shift_factor", [None, 0.1159])
def test_scale_latents_as_diffusers_pipelines(shift_factor):
    vae = AutoencoderKL.abstract(
        VAEConfig(**TINY, scaling_factor=0.3611, shift_factor=shift_factor)
    )
    z = latents(1, 4, 4)
    shift = shift_factor or 0.0
    np.testing.assert_allclose(vae.scale_latents(z), (z - shift) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(z), z / 0.3611 + shift, rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)


def test_input_checks():
    vae = AutoencoderKL.abstract(VAEConfig(**TINY))
    with pytest.raises(ValueError, match="NHWC"):
        vae.decode(jnp.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
        vae.encode(jnp.zeros((1, 32, 32)))


def test_latent_sample():
    mean, logvar = jnp.ones((2, 4, 4, 4)), jnp.full((2, 4, 4, 4), -30.0)
    dist = LatentDistribution(mean, logvar)
    sample = dist.sample(jax.random.key(0))
    assert sample.shape == mean.shape
    np.testing.assert_allclose(sample, mean, atol=1e-5)
    assert not np.allclose(LatentDistribution(mean, 0 * logvar).sample(jax.random.key(0)), mean)


def test_flux_like_matches_diffusers(tmp_path):
    """A tiny Flux-like VAE (16 latent channels, no quant convs, shift_factor) written by
    diffusers' save_pretrained loads, encodes and decodes as diffusers'."""
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    torch_vae = randomize(TorchVAE(**TINY_FLUX))
    torch_vae.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert vae.config == VAEConfig(**TINY_FLUX)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert state_dict(vae).keys() == torch_vae.state_dict().keys()
    x, z = images(2, 32, 32), latents(2, 8, 8, channels=16)
    expected_mean, expected_logvar = torch_encode(torch_vae, x)
    dist = jax_apply(vae, "encode", x)
    decoded = jax_apply(vae, "decode", z)
    assert dist.mean.shape == (2, 16, 16, 16) and decoded.shape == (2, 16, 16, 3)
    errors = {
        "mean": relative_l2(dist.mean, expected_mean),
        "logvar": relative_l2(dist.logvar, expected_logvar),
        "decode": relative_l2(decoded, torch_decode(torch_vae, z)),
    }
    print("flux-like: relative L2 errors " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE["float32"]


def test_flux_vae_config_has_diffusers_parameters():
    """Flux.1's own VAE config: read as is, and the model it builds (abstract, nothing
    allocated) has diffusers' parameter names and shapes (diffusers' built on the meta
    device)."""
    from diffusers import AutoencoderKL as TorchVAE

    config = VAEConfig.from_diffusers(FLUX_VAE)
    assert (config.latent_channels, config.downscale_factor) == (16, 8)
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
    params = nnx.to_flat_state(nnx.state(AutoencoderKL.abstract(config), nnx.Param))
    ours = {
        diffusers_key(path): to_diffusers_shape(path[-1], var.get_value().shape)
        for path, var in params
    }
    with torch.device("meta"):
        torch_vae = TorchVAE.from_config(FLUX_VAE)
    assert ours == {key: tuple(value.shape) for key, value in torch_vae.state_dict().items()}

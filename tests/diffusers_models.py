"""Small random diffusers models written with `save_pretrained`, and helpers to compare them
with jaxfusion. The PyTorch side of every parity test."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import nnx

# The noise schedule of SD 1.x, SD 2.x and SDXL (diffusers scheduler arguments).
SD_NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
SDXL_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(2, 2, 4),
    cross_attention_dim=48,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
# SDXL_LIKE with one resnet and one transformer layer per block: still every layer kind the
# patch-parallel exchanges touch (3x3 and stride-2 convs, the upsamplers' convs, GroupNorm,
# self- and cross-attention), at about half the compile time of each program. The tests that
# compare jaxfusion with itself or with the sequential reference use it; the parity tests
# against diffusers (the README's PSNR figures) keep SDXL_LIKE's deeper stacks.
SDXL_LIGHT = dict(SDXL_LIKE, layers_per_block=1, transformer_layers_per_block=(1, 1, 1))
SD15_LIKE = dict(
    sample_size=16,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=24,
    norm_num_groups=8,
)
SD2_LIKE = dict(
    SD15_LIKE,
    attention_head_dim=(2, 4, 4, 8),
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=40,
)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Adds noise to every parameter, so that norm scales are not all ones and biases not all
    zeros: a swapped scale/bias or a missed transpose then shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return module.eval()


def save_random_unet(folder, config: dict, **save_kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = randomize(UNet2DConditionModel(**config))
    unet.save_pretrained(folder, **save_kwargs)
    return unet


def unet_inputs(config: dict, batch=2, height=16, width=16, text_tokens=7, seed=0):
    """Random NHWC inputs (numpy) for a UNet of `config`."""
    rng = np.random.default_rng(seed)
    cross = config["cross_attention_dim"]
    inputs = {
        "sample": rng.standard_normal((batch, height, width, config.get("in_channels", 4))),
        "timesteps": np.array([999.0, 37.0][:batch]),
        "encoder_hidden_states": rng.standard_normal((batch, text_tokens, cross)),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        inputs["text_embeds"] = rng.standard_normal((batch, pooled))
        inputs["time_ids"] = np.tile([1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], (batch, 1))
    return {k: v.astype(np.float32) for k, v in inputs.items()}


def torch_unet_output(unet, inputs: dict) -> np.ndarray:
    """diffusers' prediction for NHWC numpy inputs, returned NHWC."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    added = None
    if "text_embeds" in t:
        added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
    with torch.no_grad():
        out = unet(
            t["sample"].permute(0, 3, 1, 2),
            t["timesteps"],
            t["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def jax_unet_output(unet, inputs: dict) -> np.ndarray:
    graphdef, state = nnx.split(unet)

    @jax.jit
    def apply(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    return np.asarray(apply(state, inputs).astype(np.float32))


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_same_parameters(module: nnx.Module, other: nnx.Module) -> None:
    """The two modules hold the same parameters at the same paths, bit for bit."""
    pairs = zip(
        nnx.to_flat_state(nnx.state(module, nnx.Param)),
        nnx.to_flat_state(nnx.state(other, nnx.Param)),
        strict=True,
    )
    for (path, a), (other_path, b) in pairs:
        assert path == other_path
        np.testing.assert_array_equal(
            np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path)
        )

"""LoRA adapters fused into a pipeline's weights: the formula W + scale * alpha / r * up @ down
(numpy, on the weights as the checkpoint file holds them), exact unfusing, refusals."""

import numpy as np
import pytest
from loras import (
    ALPHA,
    MODULES,
    RANK,
    random_adapters,
    save_kohya_sgm_lora,
    save_kohya_unet_lora,
    write_kohya,
    write_peft,
)
from pipelines import save_random_pipeline
from safetensors.numpy import load_file, save_file

import jaxfusion
from convert.state_dict import state_dict

SCALE = 0.7


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_random_pipeline(tmp_path_factory.mktemp("lora") / "sdxl", "sdxl")


def checkpoint_weight(folder, component: str, module: str) -> np.ndarray:
    name = "model" if component.startswith("text") else "diffusion_pytorch_model"
    tensors = load_file(str(folder / component / f"{name}.safetensors"))
    # transformers may save a text encoder without its `text_model.` prefix.
    return tensors.get(
        f"{module}.weight", tensors.get(f"{module.removeprefix('text_model.')}.weight")
    )


def networks(pipe) -> dict:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoders[0],
            "text_encoder_2": pipe.text_encoders[1]}  # fmt: skip


@pytest.mark.parametrize("write", [write_kohya, write_peft])
def test_fused_weights_follow_the_formula_and_unfuse_exactly(folder, tmp_path, write):
    adapters = random_adapters(0)
    write(tmp_path / "lora.safetensors", adapters)
    pipe = jaxfusion.load_pipeline(folder)
    before = {c: state_dict(n) for c, n in networks(pipe).items()}
    pipe.load_lora(tmp_path / "lora.safetensors", scale=SCALE)
    after = {c: state_dict(n) for c, n in networks(pipe).items()}
    changed = set()
    for _, component, module, _, _ in MODULES:
        down, up = adapters[module]
        base = checkpoint_weight(folder, component, module).astype(np.float64)
        expected = base + SCALE * ALPHA / RANK * (up.astype(np.float64) @ down)
        np.testing.assert_allclose(after[component][f"{module}.weight"], expected, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        changed.add((component, f"{module}.weight"))
    for component, weights in before.items():  # nothing else moved
        for key, array in weights.items():
            if (component, key) not in changed:
                np.testing.assert_array_equal(after[component][key], array)
    pipe.unload_lora()
    for component, network in networks(pipe).items():
        for key, array in state_dict(network).items():
            np.testing.assert_array_equal(array, before[component][key])


def test_two_loras_add_up_and_the_image_changes(folder, tmp_path):
    write_kohya(tmp_path / "a.safetensors", random_adapters(1))
    write_kohya(tmp_path / "b.safetensors", random_adapters(2))
    pipe = jaxfusion.load_pipeline(folder)
    call = dict(prompt="a red circle", num_inference_steps=2, seed=0)
    base = pipe(**call)
    pipe.load_lora(tmp_path / "a.safetensors", scale=0.5)
    pipe.load_lora(tmp_path / "b.safetensors", scale=0.5)
    both = state_dict(pipe.unet)
    assert not np.array_equal(pipe(**call), base)
    pipe.unload_lora()
    np.testing.assert_array_equal(pipe(**call), base)
    key = f"{MODULES[0][2]}.weight"
    a, b = random_adapters(1)[MODULES[0][2]], random_adapters(2)[MODULES[0][2]]
    expected = checkpoint_weight(folder, "unet", MODULES[0][2]).astype(np.float64) + 0.5 * (
        ALPHA / RANK
    ) * (a[1] @ a[0] + b[1] @ b[0])
    np.testing.assert_allclose(both[key], expected, rtol=1e-5, atol=1e-6)


def test_keys_that_match_nothing_are_refused_with_their_names(folder, tmp_path):
    down, up = np.ones((RANK, 32), np.float32), np.ones((32, RANK), np.float32)
    save_file(
        {
            "lora_unet_mid_block_nothing_here.lora_down.weight": down,
            "lora_unet_mid_block_nothing_here.lora_up.weight": up,
        },
        str(tmp_path / "bad.safetensors"),
    )
    pipe = jaxfusion.load_pipeline(folder, abstract=True)  # refused before any weight is read
    with pytest.raises(ValueError, match="match no weight of the unet: mid_block_nothing_here"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    save_file({"something.else": down}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match=r"keys of no LoRA format known here: something\.else"):
        pipe.load_lora(tmp_path / "junk.safetensors")
    save_file(
        {"unet.conv_in.lora_A.weight": down, "unet.conv_in.lora_B.weight": up},
        str(tmp_path / "misfit.safetensors"),
    )
    with pytest.raises(ValueError, match="do not fit its weight"):
        pipe.load_lora(tmp_path / "misfit.safetensors")


LORA_SCALE = 0.8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


def save_peft_lora(folder, out) -> None:
    """Random LoRA weights made by peft on diffusers' networks (rank 4, alpha 8 for the UNet,
    with a conv layer; rank 2, alpha 2 for the text encoders), saved by diffusers."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from jaxfusion.diffusers_backend import load_diffusers_pipeline

    torch.manual_seed(0)
    pipe = load_diffusers_pipeline(folder, device="cpu")
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False),
        "text_encoder": LoraConfig(
            r=2, lora_alpha=2, target_modules=TEXT_TARGETS, init_lora_weights=False
        ),
    }
    layers, metadata = {}, {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        config = configs.get(name, configs["text_encoder"])
        network = getattr(pipe, name)
        inject_adapter_in_model(config, network)  # (transformers' add_adapter wants peft >= 0.22)
        with torch.no_grad():  # small enough that the image changes but stays an image
            for key, parameter in network.named_parameters():
                if "lora_" in key:
                    parameter.mul_(0.3)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(network)
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(out, **layers, **metadata)


@pytest.mark.parametrize(
    "save",
    [
        save_peft_lora,
        pytest.param(save_kohya_unet_lora, marks=pytest.mark.slow),
        pytest.param(save_kohya_sgm_lora, marks=pytest.mark.slow),
    ],
)
def test_lora_matches_diffusers_fuse_lora(folder, tmp_path, save):
    from pipelines import LATENT_SIZE, SIZE, initial_latents

    from jaxfusion.diffusers_backend import load_diffusers_pipeline, run_diffusers
    from jaxfusion.images import psnr

    save(folder, tmp_path / "lora")
    reference = load_diffusers_pipeline(folder, device="cpu")
    reference.load_lora_weights(tmp_path / "lora")
    reference.fuse_lora(lora_scale=LORA_SCALE)
    latents = initial_latents(1, 4, LATENT_SIZE, LATENT_SIZE, 0)
    call = dict(height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=5.0,
                latents=latents)  # fmt: skip
    expected = run_diffusers(reference, "a red circle", "blue square", **call)
    pipe = jaxfusion.load_pipeline(folder)
    base = pipe("a red circle", "blue square", **call)
    pipe.load_lora(tmp_path / "lora", scale=LORA_SCALE)
    actual = pipe("a red circle", "blue square", **call)
    print(f"PSNR with the LoRA {psnr(actual, expected):.1f} dB, base {psnr(base, expected):.1f}")
    assert psnr(actual, expected) >= 120
    assert psnr(base, expected) < 60  # the LoRA changed the image


@pytest.mark.slow
def test_command_line_lora_option(folder, tmp_path):
    """`--lora FILE:SCALE` gives the image of `load_lora(FILE, SCALE)` (the command runs in
    its own process on one device: equal to rounding)."""
    from commands import jaxfusion_command

    write_kohya(tmp_path / "lora.safetensors", random_adapters(6))
    out = tmp_path / "image.npy"
    jaxfusion_command(
        tmp_path / "cache", "generate", "--model", str(folder), "--prompt", "a red circle",
        "--steps", "2", "--lora", f"{tmp_path / 'lora.safetensors'}:0.4", "--out", str(out),
    )  # fmt: skip
    pipe = jaxfusion.load_pipeline(folder)
    base = pipe("a red circle", num_inference_steps=2, seed=0)[0]
    pipe.load_lora(tmp_path / "lora.safetensors", scale=0.4)
    expected = pipe("a red circle", num_inference_steps=2, seed=0)[0]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert np.abs(expected - base).max() > 1e-3

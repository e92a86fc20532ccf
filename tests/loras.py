"""LoRA files of random adapters for the modules of the tiny random SDXL pipeline
(tests/pipelines.py): kohya and PEFT key formats, and kohya's original-SGM UNet names."""

import numpy as np
from safetensors.numpy import save_file

# (file key prefix, pipeline component, module, in, out): a linear layer of each network.
MODULES = [
    ("lora_unet", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32),
    ("lora_unet", "unet", "down_blocks.1.attentions.0.proj_in", 32, 32),
    ("lora_te1", "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 16, 16),
    ("lora_te2", "text_encoder_2", "text_model.encoder.layers.1.mlp.fc1", 32, 37),
]
RANK, ALPHA = 2, 3.0


def random_adapters(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        module: (
            rng.standard_normal((RANK, fan_in)).astype(np.float32),
            rng.standard_normal((fan_out, RANK)).astype(np.float32),
        )
        for _, _, module, fan_in, fan_out in MODULES
    }


def write_kohya(file, adapters) -> None:
    tensors = {}
    for prefix, _, module, _, _ in MODULES:
        name = f"{prefix}_{module.replace('.', '_')}"
        down, up = adapters[module]
        tensors |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": np.array(ALPHA, np.float32),
        }
    save_file(tensors, str(file))


def write_peft(file, adapters) -> None:
    tensors = {}
    for _, component, module, _, _ in MODULES:
        down, up = adapters[module]
        tensors |= {
            f"{component}.{module}.lora_A.weight": down,
            f"{component}.{module}.lora_B.weight": up,
            f"{component}.{module}.alpha": np.array(ALPHA, np.float32),
        }
    save_file(tensors, str(file))


def save_kohya_unet_lora(folder, out) -> None:
    """A kohya-format LoRA of the UNet's modules (diffusers' kohya reader fails on text
    encoder keys with transformers 5, so the text encoders are left to the formula test)."""
    rng = np.random.default_rng(3)
    modules = [m for _, component, m, _, _ in MODULES if component == "unet"]
    out.mkdir()
    tensors = {}
    for module in modules:
        name = "lora_unet_" + module.replace(".", "_")
        tensors |= {
            f"{name}.lora_down.weight": 0.3 * rng.standard_normal((RANK, 32), np.float32),
            f"{name}.lora_up.weight": 0.3 * rng.standard_normal((32, RANK), np.float32),
            f"{name}.alpha": np.array(ALPHA, np.float32),
        }
    save_file(tensors, str(out / "pytorch_lora_weights.safetensors"))


# Kohya's SDXL names (the original SGM UNet's blocks) of modules of the random UNet
# (layers_per_block 2), with the fan-in and fan-out of each.
SGM_MODULES = [
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", (32,), 32),
    ("input_blocks_1_0_in_layers_2", (16, 3, 3), 16),
    ("middle_block_1_proj_in", (64,), 64),
    ("output_blocks_3_1_transformer_blocks_0_attn2_to_k", (48,), 32),
    ("output_blocks_2_2_conv", (64, 3, 3), 64),
]


def save_kohya_sgm_lora(folder, out) -> None:
    rng = np.random.default_rng(5)
    out.mkdir()
    tensors = {}
    for module, fan_in, fan_out in SGM_MODULES:
        name = f"lora_unet_{module}"
        up_shape = (fan_out, RANK) if len(fan_in) == 1 else (fan_out, RANK, 1, 1)
        tensors |= {
            f"{name}.lora_down.weight": 0.3 * rng.standard_normal((RANK, *fan_in), np.float32),
            f"{name}.lora_up.weight": 0.3 * rng.standard_normal(up_shape, np.float32),
            f"{name}.alpha": np.array(ALPHA, np.float32),
        }
    save_file(tensors, str(out / "pytorch_lora_weights.safetensors"))

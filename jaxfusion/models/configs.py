"""The configurations of the public SD, SDXL and FLUX.1 checkpoints, as their
`unet/config.json` (`transformer/config.json`), `vae/config.json`, `text_encoder*/config.json`
and `scheduler/scheduler_config.json` files state them. They let the full-size models be
built abstractly (no weights) for shape checks, compilation and cost analysis."""

_SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

UNET_CONFIGS: dict[str, dict] = {
    # runwayml/stable-diffusion-v1-5
    "sd15": _SD_UNET,
    # stabilityai/stable-diffusion-2-1 (v-prediction; the UNet itself loads the same way)
    "sd21": {
        **_SD_UNET,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": {
        **_SD_UNET,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "class_embed_type": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "time_embedding_type": "positional",
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
    # stabilityai/stable-diffusion-xl-refiner-1.0
    "sdxl-refiner": {
        **_SD_UNET,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536],
        "cross_attention_dim": 1280,
        "down_block_types": [
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "projection_class_embeddings_input_dim": 2560,
        "sample_size": 128,
        "transformer_layers_per_block": 4,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
}

_FLUX_TRANSFORMER = {  # black-forest-labs/FLUX.1-dev and -schnell, transformer/config.json
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# FLUX.1's transformers: [dev] embeds the guidance scale (guidance-distilled), [schnell]
# (timestep-distilled, a few steps) does not.
FLUX_CONFIGS: dict[str, dict] = {
    "flux-dev": {**_FLUX_TRANSFORMER, "guidance_embeds": True},
    "flux-schnell": {**_FLUX_TRANSFORMER, "guidance_embeds": False},
}

_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}

_FLUX_VAE = {  # 16 latent channels, no quant_conv / post_quant_conv
    **_SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# The VAE of each pipeline of UNET_CONFIGS and FLUX_CONFIGS that jaxfusion runs whole.
VAE_CONFIGS: dict[str, dict] = {
    "sd15": {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
    "sd21": {**_SD_VAE, "sample_size": 768, "scaling_factor": 0.18215},
    "sdxl": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
    **{name: _FLUX_VAE for name in FLUX_CONFIGS},
}

_CLIP_L = {  # openai/clip-vit-large-patch14
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

# The CLIP text encoders of each pipeline, in the pipeline's order (FLUX.1's `text_encoder`,
# whose pooled output it takes; its T5 `text_encoder_2` is in T5_CONFIGS).
TEXT_ENCODER_CONFIGS: dict[str, tuple[dict, ...]] = {
    "sd15": (_CLIP_L,),
    "sd21": (  # OpenCLIP ViT-H/14, the penultimate layer kept (23 of 24)
        {
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "projection_dim": 512,
        },
    ),
    "sdxl": (
        {**_CLIP_L, "bos_token_id": 0, "eos_token_id": 2},
        {  # OpenCLIP ViT-bigG/14, with its projection
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    ),
}

# FLUX.1's `text_encoder_2`: the encoder of google/t5-v1_1-xxl.
_T5_XXL = {
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
}
TEXT_ENCODER_CONFIGS.update({name: (_CLIP_L,) for name in FLUX_CONFIGS})
T5_CONFIGS: dict[str, dict] = {name: _T5_XXL for name in FLUX_CONFIGS}

# FLUX.1's scheduler/scheduler_config.json: [dev] shifts the noise levels by the image's
# token count, [schnell] does not shift them.
_FLOW_MATCH = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
}
SCHEDULER_CONFIGS: dict[str, dict] = {
    "flux-dev": {**_FLOW_MATCH, "shift": 3.0, "use_dynamic_shifting": True},
    "flux-schnell": {**_FLOW_MATCH, "shift": 1.0, "use_dynamic_shifting": False},
}

"""The configurations of the public SD and SDXL checkpoints, as their `unet/config.json`,
`vae/config.json` and `text_encoder*/config.json` files state them. They let the full-size
models be built abstractly (no weights) for shape checks, compilation and cost analysis."""

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

_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}

# The VAE of each pipeline of UNET_CONFIGS that jaxfusion runs whole.
VAE_CONFIGS: dict[str, dict] = {
    "sd15": {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
    "sd21": {**_SD_VAE, "sample_size": 768, "scaling_factor": 0.18215},
    "sdxl": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
}

_CLIP_L = {  # openai/clip-vit-large-patch14
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

# The text encoders of each pipeline, in the pipeline's order.
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

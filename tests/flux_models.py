"""The tiny random Flux.1 transformer configuration of the tests (diffusers'
FluxTransformer2DModel arguments, guidance_embeds aside): every layer kind of Flux.1, two of
each block, at a size that compiles in seconds."""

FLUX_CONFIG = dict(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    in_channels=16,  # 4 latent channels, packed 2x2
    axes_dims_rope=(2, 2, 4),
)

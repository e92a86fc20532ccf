"""Flax NNX models that mirror diffusers' module trees, and their loading from pretrained
folders (`pretrained`). The names below are imported (with JAX) on first use, so that
`jaxfusion.models.names` is cheap to import."""

from typing import TYPE_CHECKING

from nnxtools.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "AutoencoderKL": "jaxfusion.models.vae",
        "CLIPTextConfig": "jaxfusion.models.clip",
        "CLIPTextModel": "jaxfusion.models.clip",
        "CLIPTextModelWithProjection": "jaxfusion.models.clip",
        "CLIPTextOutput": "jaxfusion.models.clip",
        "Conditioning": "jaxfusion.models.unet_2d_condition",
        "FluxConfig": "jaxfusion.models.transformer_flux",
        "FluxTransformer2DModel": "jaxfusion.models.transformer_flux",
        "LatentDistribution": "jaxfusion.models.vae",
        "T5Config": "jaxfusion.models.t5",
        "T5EncoderModel": "jaxfusion.models.t5",
        "UNet2DConditionModel": "jaxfusion.models.unet_2d_condition",
        "UNetConfig": "jaxfusion.models.unet_2d_condition",
        "VAEConfig": "jaxfusion.models.vae",
        "load_t5_encoder": "jaxfusion.models.pretrained",
        "load_flux_transformer": "jaxfusion.models.pretrained",
        "load_flux_transformer_config": "jaxfusion.models.pretrained",
        "load_text_encoder": "jaxfusion.models.pretrained",
        "load_unet": "jaxfusion.models.pretrained",
        "load_unet_config": "jaxfusion.models.pretrained",
        "load_vae": "jaxfusion.models.pretrained",
        "load_vae_config": "jaxfusion.models.pretrained",
        "save_t5_encoder": "jaxfusion.models.pretrained",
        "save_flux_transformer": "jaxfusion.models.pretrained",
        "save_text_encoder": "jaxfusion.models.pretrained",
        "save_unet": "jaxfusion.models.pretrained",
        "save_vae": "jaxfusion.models.pretrained",
    },
)

if TYPE_CHECKING:
    from jaxfusion.models.clip import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTextOutput,
    )
    from jaxfusion.models.pretrained import (
        load_flux_transformer,
        load_flux_transformer_config,
        load_t5_encoder,
        load_text_encoder,
        load_unet,
        load_unet_config,
        load_vae,
        load_vae_config,
        save_flux_transformer,
        save_t5_encoder,
        save_text_encoder,
        save_unet,
        save_vae,
    )
    from jaxfusion.models.t5 import T5Config, T5EncoderModel
    from jaxfusion.models.transformer_flux import FluxConfig, FluxTransformer2DModel
    from jaxfusion.models.unet_2d_condition import Conditioning, UNet2DConditionModel, UNetConfig
    from jaxfusion.models.vae import AutoencoderKL, LatentDistribution, VAEConfig

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "Conditioning",
    "FluxConfig",
    "FluxTransformer2DModel",
    "LatentDistribution",
    "T5Config",
    "T5EncoderModel",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "load_flux_transformer",
    "load_flux_transformer_config",
    "load_t5_encoder",
    "load_text_encoder",
    "load_unet",
    "load_unet_config",
    "load_vae",
    "load_vae_config",
    "save_flux_transformer",
    "save_t5_encoder",
    "save_text_encoder",
    "save_unet",
    "save_vae",
]

"""Flax NNX models that mirror diffusers' module trees."""

from jaxfusion.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
)
from jaxfusion.models.unet_2d_condition import UNet2DConditionModel, UNetConfig
from jaxfusion.models.vae import AutoencoderKL, LatentDistribution, VAEConfig

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "LatentDistribution",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]

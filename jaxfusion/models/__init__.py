"""Flax NNX models that mirror diffusers' module trees."""

from jaxfusion.models.unet_2d_condition import UNet2DConditionModel, UNetConfig

__all__ = ["UNet2DConditionModel", "UNetConfig"]

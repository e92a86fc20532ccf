"""diffusers checkpoint folders (config.json + safetensors) to Flax models and back."""

from jaxfusion.convert.files import PickleWeightsRefused
from jaxfusion.convert.state_dict import WeightMismatch
from jaxfusion.convert.text_encoder import load_text_encoder, save_text_encoder
from jaxfusion.convert.unet import load_unet, load_unet_config, save_unet
from jaxfusion.convert.vae import load_vae, load_vae_config, save_vae

__all__ = [
    "PickleWeightsRefused",
    "WeightMismatch",
    "load_text_encoder",
    "load_unet",
    "load_unet_config",
    "load_vae",
    "load_vae_config",
    "save_text_encoder",
    "save_unet",
    "save_vae",
]

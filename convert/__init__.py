"""diffusers checkpoint folders (config.json + safetensors) to Flax models and back."""

from convert.files import PickleWeightsRefused
from convert.state_dict import WeightMismatch
from convert.unet import load_unet, load_unet_config, save_unet

__all__ = ["PickleWeightsRefused", "WeightMismatch", "load_unet", "load_unet_config", "save_unet"]

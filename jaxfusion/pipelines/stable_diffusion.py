"""SD 1.x/2.x: diffusers' `StableDiffusionPipeline` (without the safety checker), and its
`StableDiffusionImg2ImgPipeline` when given a starting image."""

import jax

from jaxfusion.models import Conditioning
from jaxfusion.pipelines.base import Models, TextToImagePipeline


class SDPipeline(TextToImagePipeline):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder whose last hidden state (or, with
    `clip_skip=k`, the final-layer-normed output of the layer k before the last) is the UNet's
    text conditioning.

        pipe = SDPipeline.from_pretrained("path/to/sd15", dtype="bfloat16")
        images = pipe("a photo of a cat", num_inference_steps=30, seed=0)  # (1, 512, 512, 3)
        edited = pipe("a photo of a dog", image=images[0], strength=0.6)  # image-to-image
    """

    pipeline_class = "StableDiffusionPipeline"
    text_components = (("tokenizer", "text_encoder"),)
    default_guidance_scale = 7.5
    default_strength = 0.8  # StableDiffusionImg2ImgPipeline's

    def encode_prompt(
        self,
        models: Models,
        token_ids: tuple[jax.Array, ...],
        time_ids: jax.Array | None,
        clip_skip: int | None,
    ) -> Conditioning:
        (encoder,) = models.text_encoders
        output = encoder(token_ids[0])
        if clip_skip is None:
            return Conditioning(output.last_hidden_state)
        return Conditioning(encoder.final_layer_norm(output.hidden_states[-(clip_skip + 1)]))

"""SDXL text-to-image: diffusers' `StableDiffusionXLPipeline` (base model, no watermark)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfusion.models import Conditioning
from jaxfusion.pipelines.base import Models, TextToImagePipeline

TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)


class SDXLPipeline(TextToImagePipeline):
    """Stable Diffusion XL: two CLIP text encoders. The UNet's text states are both encoders'
    penultimate hidden states concatenated on features; the pooled projection of the second
    and the micro-conditioning `time_ids` enter through its `text_time` embedding.

        pipe = SDXLPipeline.from_pretrained("path/to/sdxl", dtype="bfloat16")
        images = pipe("a photo of a cat", height=1024, width=1024, seed=0)  # (1, 1024, 1024, 3)
    """

    pipeline_class = "StableDiffusionXLPipeline"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    default_guidance_scale = 5.0

    def check_components(self) -> None:
        super().check_components()
        unet = self.unet.config
        pooled = getattr(self.text_encoders[1].config, "projection_dim", 0)
        expected = unet.addition_time_embed_dim * TIME_IDS + pooled
        if unet.addition_embed_type != "text_time" or (
            unet.projection_class_embeddings_input_dim != expected
        ):
            raise ValueError(
                "the unet does not take SDXL base conditioning (addition_embed_type 'text_time' "
                f"with {TIME_IDS} time ids and the {pooled}-wide pooled text embedding); the "
                "SDXL refiner (aesthetic score) is not supported"
            )

    def encode_prompt(
        self,
        models: Models,
        token_ids: tuple[jax.Array, ...],
        time_ids: jax.Array | None,
        clip_skip: int | None,
    ) -> Conditioning:
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        outputs = [
            encoder(ids) for encoder, ids in zip(models.text_encoders, token_ids, strict=True)
        ]
        states = jnp.concatenate([output.hidden_states[layer] for output in outputs], axis=-1)
        return Conditioning(states, outputs[-1].text_embeds, time_ids)

    def added_conditioning(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        original_size: Sequence[int] | None = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Sequence[int] | None = None,
    ) -> np.ndarray:
        """SDXL's micro-conditioning, (B, 6) float32 for both CFG halves: original_size and
        target_size default to (height, width), as in diffusers."""
        values = [
            *(original_size or (height, width)),
            *crops_coords_top_left,
            *(target_size or (height, width)),
        ]
        if len(values) != TIME_IDS:
            raise ValueError(
                "original_size, crops_coords_top_left and target_size are pairs (height, width), "
                f"(top, left), (height, width); got {values}"
            )
        return np.tile(np.asarray(values, np.float32), (batch, 1))

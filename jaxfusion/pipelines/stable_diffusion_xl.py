"""SDXL, of the Stable Diffusion family (`stable_diffusion`): diffusers'
`StableDiffusionXLPipeline` (base model, no watermark), with its image-to-image from a
starting image, and its variant `StableDiffusionXLImg2ImgPipeline` (the refiner: the second
text encoder only, aesthetic-score conditioning)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfusion.models import Conditioning
from jaxfusion.pipelines.stable_diffusion import Models, StableDiffusionFamily

TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)
AESTHETIC_TIME_IDS = 5  # original size (h, w), crop top-left (y, x), aesthetic score
# SDXL's multi-aspect training sizes near one megapixel, (height, width).
TRAINING_SIZES = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)


class SDXLPipeline(StableDiffusionFamily):
    """Stable Diffusion XL: two CLIP text encoders. The UNet's text states are both encoders'
    penultimate hidden states concatenated on features; the pooled projection of the second
    and the micro-conditioning `time_ids` enter through its `text_time` embedding.

        pipe = SDXLPipeline.from_pretrained("path/to/sdxl", dtype="bfloat16")
        images = pipe("a photo of a cat", height=1024, width=1024, seed=0)  # (1, 1024, 1024, 3)
        edited = pipe("a photo of a dog", image=images[0], strength=0.5)  # image-to-image
    """

    pipeline_class = "StableDiffusionXLPipeline"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    default_guidance_scale = 5.0
    default_strength = 0.3  # StableDiffusionXLImg2ImgPipeline's

    @property
    def requires_aesthetics_score(self) -> bool:
        """Whether the UNet is conditioned on an aesthetic score instead of the target size
        (the refiner)."""
        return False

    def check_components(self) -> None:
        super().check_components()
        unet = self.unet.config
        pooled = getattr(self.text_encoders[-1].config, "projection_dim", 0)
        count = AESTHETIC_TIME_IDS if self.requires_aesthetics_score else TIME_IDS
        expected = unet.addition_time_embed_dim * count + pooled
        actual = unet.projection_class_embeddings_input_dim
        if unet.addition_embed_type == "text_time" and actual == expected:
            return
        hints = {
            unet.addition_time_embed_dim * AESTHETIC_TIME_IDS + pooled: "; it takes the "
            "refiner's aesthetic score: a refiner folder's model_index.json names "
            "StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score true",
            unet.addition_time_embed_dim * TIME_IDS + pooled: "; it takes the base's target "
            "size: requires_aesthetics_score must be false",
        }
        raise ValueError(
            "the unet does not take this pipeline's SDXL conditioning (addition_embed_type "
            f"'text_time' with {count} time ids and the {pooled}-wide pooled text embedding: "
            f"projection_class_embeddings_input_dim {expected}, not {actual})"
            + hints.get(actual, "")
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
        negative: bool = False,
        original_size: Sequence[int] | None = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Sequence[int] | None = None,
    ) -> np.ndarray:
        """SDXL's micro-conditioning, (B, 6) float32, the same for both CFG halves:
        original_size and target_size default to (height, width), as in diffusers."""
        values = [
            *_pair("original_size", original_size or (height, width)),
            *_pair("crops_coords_top_left", crops_coords_top_left),
            *_pair("target_size", target_size or (height, width)),
        ]
        return np.tile(np.asarray(values, np.float32), (batch, 1))


class SDXLImg2ImgPipeline(SDXLPipeline):
    """diffusers' `StableDiffusionXLImg2ImgPipeline`: image-to-image only. The refiner's
    folder has the second text encoder only (`"text_encoder": [null, null]` in
    model_index.json) and `requires_aesthetics_score`: its time ids are the original size,
    the crop and an aesthetic score (6 for the prompt, 2.5 for the negative, as diffusers).

        refiner = SDXLImg2ImgPipeline.from_pretrained("path/to/sdxl-refiner")
        images = refiner("a photo of a cat", image=photo, strength=0.3)

    After a base pipeline (the ensemble of experts), on the base's latents:

        latents = base(prompt, denoising_end=0.8, output="latents")
        images = refiner(prompt, image_latents=latents, denoising_start=0.8)
    """

    pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    requires_image = True

    @property
    def requires_aesthetics_score(self) -> bool:
        return bool(self.model_index.get("requires_aesthetics_score", False))

    def added_conditioning(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        negative: bool = False,
        original_size: Sequence[int] | None = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Sequence[int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> np.ndarray:
        """The refiner's time ids, (B, 5) float32: original_size (default (height,
        width)), the crop (the negative half's (0, 0), diffusers' default
        negative_crops_coords_top_left) and the aesthetic score of the half. Without
        `requires_aesthetics_score`, the base's (B, 6)."""
        if not self.requires_aesthetics_score:
            return super().added_conditioning(
                batch,
                height,
                width,
                original_size=original_size,
                crops_coords_top_left=crops_coords_top_left,
                target_size=target_size,
            )
        if target_size is not None:
            raise ValueError(
                "this refiner is conditioned on an aesthetic score, not a target size: "
                "leave out target_size"
            )
        crops = (0, 0) if negative else crops_coords_top_left
        values = [
            *_pair("original_size", original_size or (height, width)),
            *_pair("crops_coords_top_left", crops),
            negative_aesthetic_score if negative else aesthetic_score,
        ]
        return np.tile(np.asarray(values, np.float32), (batch, 1))


def _pair(name: str, values: Sequence[int]) -> tuple[int, int]:
    """A (height, width) or (top, left) pair, anything else refused."""
    if len(values) != 2:
        raise ValueError(
            f"{name} is a pair ((height, width), or (top, left) for the crop); got {values}"
        )
    return tuple(values)

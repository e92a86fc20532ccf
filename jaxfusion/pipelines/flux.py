"""The Flux.1 family: diffusers' `FluxPipeline` ([dev] and [schnell]) run in JAX.

A `FluxTransformer2DModel` denoises the 16-channel latents of an `AutoencoderKL` by flow
matching (`jaxfusion.schedulers.flow_match`), conditioned on two text encoders: CLIP's
pooled output (`text_encoder`, a `CLIPTextModel`) and T5's last hidden state
(`text_encoder_2`, a `T5EncoderModel`, FluxPipeline's 512 tokens by default). [dev] is
guidance-distilled: its guidance scale is an input of the transformer (`guidance_embeds`),
not classifier-free guidance, so the denoiser runs once per step; [schnell] takes none.

What a user passes or gets as latents is FluxPipeline's packed layout, (B, tokens, 4 x C)
with tokens row-major over (h/2, w/2) (`transformer_flux.pack_latents`): `latents=` is what
diffusers' pipeline takes as `latents`, so a diffusers image can be reproduced exactly.

Not supported yet, refused by name: image-to-image (FluxImg2ImgPipeline), true CFG
(`true_cfg_scale`, negative prompts), Flux LoRAs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextModel,
    FluxTransformer2DModel,
    T5EncoderModel,
    pretrained,
)
from jaxfusion.models.scaled_dot_product import AttentionBackend
from jaxfusion.models.transformer_flux import PACK, pack_latents, unpack_latents
from jaxfusion.pipelines.base import (
    LoraAdapters,
    PromptInputs,
    Stage,
    TextToImagePipeline,
    checked_latents,
)
from jaxfusion.pipelines.request import Request
from jaxfusion.tokenizer import (
    T5_MAX_SEQUENCE_LENGTH,
    load_t5_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenize,
    tokenize_t5,
)

# FluxPipeline's default_sample_size: the default image is this many latent pixels a side.
DEFAULT_LATENT_SIZE = 128
# The folders of a FluxPipeline, in the order its model_index.json lists them.
COMPONENTS = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "transformer",
    "vae",
)


class FluxModels(nnx.Module):
    """The family's networks, as one module so that they enter the program as one state."""

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: T5EncoderModel,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    @property
    def denoiser(self) -> FluxTransformer2DModel:
        return self.transformer


class FluxTextInputs(NamedTuple):
    """A batch of B prompts as the program takes them (a pytree).

    clip_ids: (B, 77) int32, CLIP's token ids (the pooled embedding).
    t5_ids: (B, L) int32, T5's (L = max_sequence_length).
    guidance: (B,) float32, the guidance scale of a guidance-distilled transformer
        ([dev]); None for one without (`guidance_embeds` off: [schnell]).
    """

    clip_ids: jax.Array
    t5_ids: jax.Array
    guidance: jax.Array | None


class FluxPipeline(TextToImagePipeline):
    """diffusers' `FluxPipeline` (text-to-image), FLUX.1 [dev] or [schnell]:

        pipe = FluxPipeline.from_pretrained("path/to/FLUX.1-dev", dtype="bfloat16")
        images = pipe("a cat", num_inference_steps=28, guidance_scale=3.5, seed=0)

    Its own options (a call's keyword arguments, as diffusers'): `prompt_2` (T5's prompts,
    default the prompts) and `max_sequence_length` (T5's tokens, at most 512).
    """

    pipeline_class = "FluxPipeline"
    scheduler_kinds = ("flow_match",)
    default_guidance_scale = 3.5
    default_strength = 0.6  # FluxImg2ImgPipeline's (image-to-image is not supported yet)
    takes_image = False

    def __init__(
        self,
        models: FluxModels,
        tokenizers: tuple[Any, Any],
        scheduler_config: dict[str, Any],
        model_index: dict[str, Any] | None = None,
        *,
        attention: AttentionBackend = "auto",
    ):
        """Args:
        models: the networks.
        tokenizers: transformers' CLIPTokenizer and T5TokenizerFast.
        scheduler_config, model_index, attention: as `TextToImagePipeline`.
        """
        self.tokenizers = tuple(tokenizers)
        super().__init__(models, scheduler_config, model_index, attention=attention)

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.models.transformer

    @property
    def vae(self) -> AutoencoderKL:
        return self.models.vae

    @property
    def dtype(self) -> jnp.dtype:
        return self.transformer.dtype

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @classmethod
    def component_folders(cls, model_index: dict[str, Any]) -> list[str]:
        return list(COMPONENTS)

    @classmethod
    def load_components(
        cls,
        folder: Path,
        model_index: dict[str, Any],
        scheduler_config: dict[str, Any],
        *,
        attention: AttentionBackend,
        stage: Stage,
        **weights: Any,
    ) -> FluxPipeline:
        with stage("loading text_encoder"):
            clip_tokenizer = load_tokenizer(folder, "tokenizer")
            clip = pretrained.load_text_encoder(folder, "text_encoder", **weights)
        with stage("loading text_encoder_2"):
            t5_tokenizer = load_t5_tokenizer(folder, "tokenizer_2")
            t5 = pretrained.load_t5_encoder(folder, "text_encoder_2", **weights)
        with stage("loading transformer"):
            transformer = pretrained.load_flux_transformer(folder, **weights)
        with stage("loading vae"):
            vae = pretrained.load_vae(folder, **weights)
        models = FluxModels(transformer, vae, clip, t5)
        tokenizers = (clip_tokenizer, t5_tokenizer)
        return cls(models, tokenizers, scheduler_config, model_index, attention=attention)

    def save_components(self, folder: Path, *, dtype: Any, flax: bool) -> dict[str, list]:
        weights = dict(dtype=dtype, flax=flax)
        models = self.models
        pretrained.save_flux_transformer(models.transformer, folder / "transformer", **weights)
        pretrained.save_vae(models.vae, folder / "vae", **weights)
        pretrained.save_text_encoder(models.text_encoder, folder / "text_encoder", **weights)
        pretrained.save_t5_encoder(models.text_encoder_2, folder / "text_encoder_2", **weights)
        clip_tokenizer, t5_tokenizer = self.tokenizers
        save_tokenizer(clip_tokenizer, folder / "tokenizer")
        t5_tokenizer.save_pretrained(folder / "tokenizer_2")
        return {
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", type(models.text_encoder).__name__],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", type(clip_tokenizer).__name__],
            "tokenizer_2": ["transformers", type(t5_tokenizer).__name__],
        }

    def check_components(self) -> None:
        config = self.transformer.config
        widths = (
            ("joint_attention_dim", config.joint_attention_dim, "text_encoder_2 (T5) gives",
             self.models.text_encoder_2.config.d_model),
            ("pooled_projection_dim", config.pooled_projection_dim, "text_encoder (CLIP) pools",
             self.models.text_encoder.config.hidden_size),
            ("latent channels", config.latent_channels, "the vae's latents have",
             self.vae.config.latent_channels),
        )  # fmt: skip
        for name, expected, source, actual in widths:
            if expected != actual:
                raise ValueError(
                    f"the transformer's {name} is {expected} but {source} {actual}: the "
                    "components do not belong together"
                )

    def default_size(self) -> tuple[int, int]:
        """FluxPipeline's: 128 latent pixels a side (1024 pixels with Flux.1's VAE)."""
        size = DEFAULT_LATENT_SIZE * self.downscale_factor
        return size, size

    @property
    def size_multiple(self) -> int:
        """Two latent pixels make a token: multiples of twice the VAE's factor (16 pixels;
        diffusers resizes other sizes down to one, with a warning)."""
        return PACK * self.downscale_factor

    def classifier_free(self, guidance_scale: float) -> bool:
        """Never: [dev]'s guidance scale is the transformer's input (`prompt_inputs`)."""
        return False

    def schedule_tokens(self, height: int, width: int) -> int:
        """The image's tokens, which the flow-match schedule's dynamic shift reads."""
        f = self.size_multiple
        return (height // f) * (width // f)

    def latents_to_nhwc(
        self, name: str, array: Any, batch: int, height: int, width: int
    ) -> jax.Array:
        """FluxPipeline's packed latents (B, h/2 * w/2, 4C) -> (B, h, w, C) NHWC."""
        _, channels, h, w = self.latent_shape(batch, height, width)
        expected = (batch, (h // PACK) * (w // PACK), channels * PACK * PACK)
        layout = f"as FluxPipeline packs them: batch, (height/{self.size_multiple}) x " + (
            f"(width/{self.size_multiple}) tokens, {PACK * PACK} x {channels} channels"
        )
        return unpack_latents(jnp.asarray(checked_latents(name, array, expected, layout)), h, w)

    def nhwc_to_latents(self, latents: np.ndarray) -> np.ndarray:
        """(B, h, w, C) NHWC -> FluxPipeline's packed (B, h/2 * w/2, 4C)."""
        return np.asarray(pack_latents(jnp.asarray(latents)))

    def prompt_inputs(
        self, request: Request, height: int, width: int, guidance: bool
    ) -> PromptInputs:
        """The prompts' CLIP and T5 ids and [dev]'s guidance; `request.conditioning` may
        hold `prompt_2` and `max_sequence_length`, as FluxPipeline takes them."""
        options = dict(request.conditioning)
        prompt_2 = options.pop("prompt_2", None)
        length = options.pop("max_sequence_length", T5_MAX_SEQUENCE_LENGTH)
        true_cfg = options.pop("true_cfg_scale", 1.0)
        if options:
            raise ValueError(
                f"a {self.pipeline_class} takes no option {sorted(options)} (its own: "
                "prompt_2, max_sequence_length)"
            )
        if true_cfg != 1.0 or request.negative_prompt is not None:
            raise ValueError(
                "true classifier-free guidance (true_cfg_scale, negative prompts) is not "
                "supported for Flux yet: leave them out (FLUX.1 [dev] is guided by "
                "guidance_scale, an input of its transformer)"
            )
        if not 1 <= length <= T5_MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length={length}: use 1 to {T5_MAX_SEQUENCE_LENGTH}, as FluxPipeline"
            )
        batch = request.batch
        prompts_2 = request.prompts if prompt_2 is None else prompt_2
        prompts_2 = [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
        if len(prompts_2) == 1:
            prompts_2 = prompts_2 * batch
        if len(prompts_2) != batch:
            raise ValueError(f"{len(prompts_2)} prompt_2 for {batch} prompts; give one or {batch}")
        clip_tokenizer, t5_tokenizer = self.tokenizers
        scale = request.guidance_scale
        scale = self.default_guidance_scale if scale is None else scale
        text = FluxTextInputs(
            jnp.asarray(tokenize(clip_tokenizer, request.prompts)),
            jnp.asarray(tokenize_t5(t5_tokenizer, prompts_2, length)),
            jnp.full((batch,), scale, jnp.float32) if self._guidance_embeds else None,
        )
        return PromptInputs(text, None, None)

    def abstract_prompts(self, batch: int, height: int, width: int) -> PromptInputs:
        ids = jax.ShapeDtypeStruct((batch, self.tokenizers[0].model_max_length), jnp.int32)
        t5_ids = jax.ShapeDtypeStruct((batch, T5_MAX_SEQUENCE_LENGTH), jnp.int32)
        guidance = jax.ShapeDtypeStruct((batch,), jnp.float32) if self._guidance_embeds else None
        return PromptInputs(FluxTextInputs(ids, t5_ids, guidance), None, None)

    def encode_prompts(
        self, models: FluxModels, text: FluxTextInputs, negative_text: None, encoding: None
    ) -> dict[str, jax.Array]:
        """The transformer's conditioning (see `FluxTransformer2DModel`): T5's last hidden
        state, CLIP's pooled output, [dev]'s guidance scale."""
        conditioning = {
            "prompt_embeds": models.text_encoder_2(text.t5_ids),
            "pooled_prompt_embeds": models.text_encoder(text.clip_ids).pooled_output,
        }
        if text.guidance is not None:
            conditioning["guidance"] = text.guidance
        return conditioning

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Refused, before the file is read: Flux LoRAs are not supported yet."""
        raise ValueError(
            f"{path}: LoRAs for Flux are not supported yet (jaxfusion fuses LoRAs into SD "
            "1.x/2.x and SDXL pipelines)"
        )

    def lora_networks(self) -> dict[str, nnx.Module]:
        return {}

    def lora_modules(self, adapters: LoraAdapters) -> LoraAdapters:
        return adapters

    @property
    def _guidance_embeds(self) -> bool:
        return self.transformer.config.guidance_embeds

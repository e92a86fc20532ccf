"""The Stable Diffusion family: a UNet (`UNet2DConditionModel`) denoising the latents of an
`AutoencoderKL`, conditioned on CLIP text encoders. SD 1.x/2.x here, SDXL and its refiner in
`stable_diffusion_xl`.

`StableDiffusionFamily` is what they share, the parts the pipeline core asks a family for:
reading and writing their diffusers folders, their size rules (as diffusers'), tokenizing
the prompts, what a LoRA may touch. `SDPipeline` is diffusers' `StableDiffusionPipeline`
(without the safety checker), and its `StableDiffusionImg2ImgPipeline` when given a
starting image."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import lora
from jaxfusion import schedulers
from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextModel,
    Conditioning,
    UNet2DConditionModel,
    pretrained,
)
from jaxfusion.models.scaled_dot_product import AttentionBackend
from jaxfusion.pipelines.base import LoraAdapters, PromptInputs, Stage, TextToImagePipeline
from jaxfusion.pipelines.request import Request
from jaxfusion.tokenizer import load_tokenizer, save_tokenizer, tokenize
from sharding.loops import concat_batches

TEXT_TOKENS = 77  # CLIP's context: the token ids of one prompt


class Models(nnx.Module):
    """The family's networks, as one module so that they enter the program as one state."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: Sequence[CLIPTextModel],
    ):
        self.unet = unet
        self.vae = vae
        self.text_encoders = nnx.List(text_encoders)

    @property
    def denoiser(self) -> UNet2DConditionModel:
        return self.unet


class TextInputs(NamedTuple):
    """A batch of B prompts as the family's program takes them (a pytree).

    token_ids: per tokenizer, (B, 77) int32; None: all-zero embeddings (a negative half
        without a negative prompt where the folder says `force_zeros_for_empty_prompt`).
    time_ids: (B, n) float32 SDXL micro-conditioning, else None; None in a negative half:
        the prompt's.
    """

    token_ids: tuple[jax.Array, ...] | None
    time_ids: jax.Array | None


class StableDiffusionFamily(TextToImagePipeline):
    """What SD 1.x/2.x and SDXL share. Subclasses say which diffusers pipeline class they
    mirror, which tokenizer and text encoder subfolders they read, and how prompts become
    UNet conditioning (`encode_prompt`, `added_conditioning`)."""

    # (tokenizer, text encoder) folders; a folder's model_index.json may leave some out
    # (`text_components_of`).
    text_components: ClassVar[tuple[tuple[str, str], ...]]
    # The samplers of noise (or v) prediction; flow matching is Flux's.
    scheduler_kinds = tuple(kind for kind in schedulers.KINDS if kind != "flow_match")

    def __init__(
        self,
        models: Models,
        tokenizers: Sequence[Any],
        scheduler_config: dict[str, Any],
        model_index: dict[str, Any] | None = None,
        *,
        attention: AttentionBackend = "auto",
    ):
        """Args:
        models: the networks, text encoders in the order of `text_components_of(model_index)`.
        tokenizers: transformers' CLIPTokenizer per text encoder.
        scheduler_config: the folder's `scheduler/scheduler_config.json`.
        model_index: the folder's `model_index.json` (which text components it has, its
          `force_zeros_for_empty_prompt` and `requires_aesthetics_score` are honoured; the
          rest is written back by `save_pretrained`).
        attention: the attention kernel of calls that do not choose one ("auto", "xla",
          "chunked", "cudnn"; see `jaxfusion.models.scaled_dot_product`).
        """
        self.tokenizers = tuple(tokenizers)
        # The (tokenizer, text encoder) folders of this pipeline's text encoders.
        self.text_folders = self.text_components_of(model_index or {})
        super().__init__(models, scheduler_config, model_index, attention=attention)

    @classmethod
    def text_components_of(cls, model_index: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """The `text_components` a folder with this `model_index.json` has: all but those
        it names as null (the SDXL refiner's `"text_encoder": [null, null]`); one it does
        not name (an index written by hand, or none) is there."""
        absent = (None, [None, None])
        return tuple(
            pair
            for pair in cls.text_components
            if pair[1] not in model_index or model_index[pair[1]] not in absent
        )

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.model_index.get("force_zeros_for_empty_prompt", False))

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.models.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.models.vae

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, ...]:
        return tuple(self.models.text_encoders)

    @property
    def dtype(self) -> jnp.dtype:
        return self.unet.dtype

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @classmethod
    def component_folders(cls, model_index: dict[str, Any]) -> list[str]:
        texts = (name for pair in cls.text_components_of(model_index) for name in pair)
        return ["unet", "vae", "scheduler", *texts]

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
    ) -> StableDiffusionFamily:
        tokenizers, text_encoders = [], []
        for tokenizer_folder, encoder_folder in cls.text_components_of(model_index):
            with stage(f"loading {encoder_folder}"):
                tokenizers.append(load_tokenizer(folder, tokenizer_folder))
                text_encoders.append(
                    pretrained.load_text_encoder(folder, encoder_folder, **weights)
                )
        with stage("loading unet"):
            unet = pretrained.load_unet(folder, **weights)
        with stage("loading vae"):
            vae = pretrained.load_vae(folder, **weights)
        models = Models(unet, vae, text_encoders)
        return cls(models, tokenizers, scheduler_config, model_index, attention=attention)

    def save_components(self, folder: Path, *, dtype: Any, flax: bool) -> dict[str, list]:
        weights = dict(dtype=dtype, flax=flax)
        pretrained.save_unet(self.unet, folder / "unet", **weights)
        pretrained.save_vae(self.vae, folder / "vae", **weights)
        entries = {
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        pairs = zip(self.text_folders, self.tokenizers, self.text_encoders, strict=True)
        for (tokenizer_folder, encoder_folder), tokenizer, encoder in pairs:
            save_tokenizer(tokenizer, folder / tokenizer_folder)
            pretrained.save_text_encoder(encoder, folder / encoder_folder, **weights)
            entries[tokenizer_folder] = ["transformers", type(tokenizer).__name__]
            entries[encoder_folder] = ["transformers", type(encoder).__name__]
        return entries

    def check_components(self) -> None:
        unet = self.unet.config
        width = sum(encoder.config.hidden_size for encoder in self.text_encoders)
        if unet.cross_attention_dim != width:
            raise ValueError(
                f"the unet's cross_attention_dim is {unet.cross_attention_dim} but the text "
                f"encoders give {width} features per token"
            )
        if unet.in_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"the unet takes {unet.in_channels} channels but the vae's latents have "
                f"{self.vae.config.latent_channels}"
            )

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels when none is given: the UNet's sample_size, as diffusers."""
        size = self.unet.config.sample_size * self.downscale_factor
        return size, size

    @property
    def size_multiple(self) -> int:
        """diffusers' pipelines draw multiples of 8 pixels; the VAE's latents need multiples
        of its downscale factor."""
        return math.lcm(8, self.downscale_factor)

    def lora_networks(self) -> dict[str, nnx.Module]:
        encoder_folders = [encoder for _, encoder in self.text_folders]
        return {"unet": self.unet, **dict(zip(encoder_folders, self.text_encoders, strict=True))}

    def lora_modules(self, adapters: LoraAdapters) -> LoraAdapters:
        """kohya's SDXL files name the UNet's modules by the original (SGM) blocks
        (`convert.lora.from_sgm`), which need the UNet's layers per block."""
        layers = set(np.atleast_1d(self.unet.config.layers_per_block))
        if "unet" in adapters and len(layers) == 1:
            (n,) = layers
            adapters["unet"] = {lora.from_sgm(m, int(n)): a for m, a in adapters["unet"].items()}
        return adapters

    def prompt_inputs(
        self, request: Request, height: int, width: int, guidance: bool
    ) -> PromptInputs:
        """The prompts' token ids and `added_conditioning`; `request.conditioning` holds
        clip_skip (the encoding) and `added_conditioning`'s options."""
        options = dict(request.conditioning)
        clip_skip = options.pop("clip_skip", None)
        batch = request.batch
        time_ids = self.added_conditioning(batch, height, width, **options)
        text = TextInputs(self._tokenize(request.prompts), time_ids)
        if not guidance:
            return PromptInputs(text, None, clip_skip)
        zeros = request.negative_prompt is None and self.force_zeros_for_empty_prompt
        negative_text = TextInputs(
            None if zeros else self._tokenize(request.negative_prompts),
            None
            if time_ids is None
            else self.added_conditioning(batch, height, width, negative=True, **options),
        )
        return PromptInputs(text, negative_text, clip_skip)

    def abstract_prompts(self, batch: int, height: int, width: int) -> PromptInputs:
        """Negative prompts encoded (not zeros), with the prompts' time ids."""
        ids = tuple(
            jax.ShapeDtypeStruct((batch, TEXT_TOKENS), jnp.int32) for _ in self.text_folders
        )
        time_ids = self.added_conditioning(batch, height, width)
        if time_ids is not None:
            time_ids = jax.ShapeDtypeStruct(time_ids.shape, jnp.float32)
        return PromptInputs(TextInputs(ids, time_ids), TextInputs(ids, None), None)

    def encode_prompts(
        self,
        models: Models,
        text: TextInputs,
        negative_text: TextInputs | None,
        encoding: int | None,
    ) -> Conditioning:
        """`encoding`: clip_skip."""
        conditioning = self.encode_prompt(models, text.token_ids, text.time_ids, encoding)
        if negative_text is None:
            return conditioning
        time_ids = text.time_ids if negative_text.time_ids is None else negative_text.time_ids
        if negative_text.token_ids is None:
            negative = jax.tree.map(jnp.zeros_like, conditioning)._replace(time_ids=time_ids)
        else:
            negative = self.encode_prompt(models, negative_text.token_ids, time_ids, encoding)
        return concat_batches(negative, conditioning)

    @abc.abstractmethod
    def encode_prompt(
        self,
        models: Models,
        token_ids: tuple[jax.Array, ...],
        time_ids: jax.Array | None,
        clip_skip: int | None,
    ) -> Conditioning:
        """Token ids per tokenizer, (B, 77) each -> the UNet's conditioning (inside the program)."""

    def added_conditioning(
        self, batch: int, height: int, width: int, *, negative: bool = False
    ) -> np.ndarray | None:
        """time_ids (B, n) float32 of the conditional half (of the unconditional one with
        `negative`), or None where the UNet takes none."""
        return None

    def _tokenize(self, prompts: list[str]) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(tokenize(tokenizer, prompts)) for tokenizer in self.tokenizers)


class SDPipeline(StableDiffusionFamily):
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

"""What `bench analyze` needs to know of a denoiser family, one small adapter per family:
the denoiser built from its configuration as shapes, its conditioning and sampler as
shapes, its latent's channels and the rows a slab boundary must be a multiple of, and
whether it runs classifier-free guidance (a CFG batch of 2 that `--cfg-parallel` can split).

    UNetFamily: SD 1.x/2.x and SDXL UNets (CFG batch 2: 77 CLIP tokens, SDXL's pooled
        embedding and time ids), a 50-step DDIM run.
    FluxFamily: FLUX.1's transformer (batch 1, no CFG: [dev] embeds the guidance scale,
        [schnell] takes none), T5's `text_tokens` prompt embeddings and CLIP's pooled one,
        the flow-matching sampler.

`family_of(config)` picks the adapter of a configuration. The whole generation of FLUX.1 is
`FluxRun`'s, measured from two programs (see there)."""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion import schedulers
from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextModel,
    Conditioning,
    FluxConfig,
    FluxTransformer2DModel,
    T5EncoderModel,
    UNet2DConditionModel,
    UNetConfig,
)
from jaxfusion.models.configs import SCHEDULER_CONFIGS
from jaxfusion.models.scaled_dot_product import AttentionBackend, set_attention
from jaxfusion.models.transformer_flux import PACK
from sharding.loops import Denoiser, Sampling, denoise
from sharding.parallel import ParallelConfig
from sharding.placement import Placement
from sharding.rows import map_rows

SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear"}
CLIP_TOKENS = 77  # CLIP's context: the token ids of one prompt
# FLUX.1's scheduler where a folder does not give its own: [dev]'s (the shift changes the
# noise levels, not any shape).
FLUX_SCHEDULER = SCHEDULER_CONFIGS["flux-dev"]


class Family(abc.ABC):
    """A denoiser family as `bench analyze` compiles it (see the module)."""

    config: UNetConfig | FluxConfig
    # Classifier-free guidance: each step predicts a batch of 2 (unconditional and
    # conditional), which `--cfg-parallel` splits over 2 devices.
    guided: ClassVar[bool]
    # The sampler's steps in a whole generation (the diffusers pipeline's default).
    steps: ClassVar[int]

    @property
    def batch(self) -> int:
        """The denoiser's batch in one step of one image: 2 with CFG, else 1."""
        return 2 if self.guided else 1

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """C of the (B, h, w, C) NHWC latent the denoiser takes."""

    @property
    @abc.abstractmethod
    def output_channels(self) -> int:
        """The channels of the denoiser's prediction."""

    @property
    @abc.abstractmethod
    def row_unit(self) -> int:
        """What a slab's boundary rows must be a multiple of (`Denoiser.row_unit`)."""

    @abc.abstractmethod
    def denoiser(self, dtype) -> Denoiser:
        """The denoiser with `jax.ShapeDtypeStruct` weights."""

    @abc.abstractmethod
    def conditioning(self, dtype) -> tuple[object, jax.Array | None]:
        """(the conditioning of one step of one image as shapes, the guidance scale (a
        float32 scalar) where the family runs CFG, else None)."""

    @abc.abstractmethod
    def schedule(self, steps: int, latent_height: int, latent_width: int):
        """The sampler's schedule of `steps` steps for a latent of this size."""

    def sampling(self, latent_height: int, latent_width: int, dtype, steps: int) -> Sampling:
        """The sampling inputs of a `steps`-step run of one image, as shapes (the schedule
        as arrays)."""
        conditioning, guidance_scale = self.conditioning(dtype)
        schedule = self.schedule(steps, latent_height, latent_width)
        return Sampling(schedule, conditioning, guidance_scale)

    def abstract_inputs(
        self, latent_height: int, latent_width: int, dtype, steps: int = 50
    ) -> tuple[Denoiser, Sampling, jax.ShapeDtypeStruct]:
        """(denoiser, sampling inputs of a `steps`-step run, one (1, latent_height,
        latent_width, C) latent), all shapes."""
        sampling = self.sampling(latent_height, latent_width, dtype, steps)
        shape = (1, latent_height, latent_width, self.latent_channels)
        return self.denoiser(dtype), sampling, jax.ShapeDtypeStruct(shape, dtype)


@dataclasses.dataclass(frozen=True)
class UNetFamily(Family):
    """SD 1.x/2.x and SDXL: the CFG batch of 2 with 77 text tokens, DDIM."""

    config: UNetConfig
    guided: ClassVar[bool] = True
    steps: ClassVar[int] = 50

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    @property
    def output_channels(self) -> int:
        return self.config.out_channels

    @property
    def row_unit(self) -> int:
        return 2 ** (self.config.num_levels - 1)

    def denoiser(self, dtype) -> UNet2DConditionModel:
        return UNet2DConditionModel.abstract(self.config, dtype=dtype)

    def conditioning(self, dtype) -> tuple[Conditioning, jax.Array]:
        config = self.config
        text = jax.ShapeDtypeStruct((2, CLIP_TOKENS, config.cross_attention_dim), dtype)
        embeds = time_ids = None
        if config.addition_embed_type == "text_time":
            pooled = (
                config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            )
            embeds = jax.ShapeDtypeStruct((2, pooled), dtype)
            time_ids = jax.ShapeDtypeStruct((2, 6), jnp.float32)
        return Conditioning(text, embeds, time_ids), jnp.float32(5.0)

    def schedule(self, steps: int, latent_height: int, latent_width: int):
        config = schedulers.SchedulerConfig.from_diffusers(SD_SCHEDULER)
        return schedulers.make_schedule(config, steps)


@dataclasses.dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1 [dev] and [schnell]: batch 1 (no CFG), T5's `text_tokens` prompt embeddings
    (B, text_tokens, joint_attention_dim), CLIP's pooled one (B, pooled_projection_dim),
    and for [dev] (guidance_embeds) the guidance scale (B,); the flow-matching sampler
    (`scheduler`: its scheduler_config.json)."""

    config: FluxConfig
    text_tokens: int
    scheduler: dict = dataclasses.field(default_factory=lambda: dict(FLUX_SCHEDULER))
    guided: ClassVar[bool] = False
    steps: ClassVar[int] = 28  # FluxPipeline's default

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def output_channels(self) -> int:
        return self.config.output_channels

    @property
    def row_unit(self) -> int:
        return PACK

    def denoiser(self, dtype) -> FluxTransformer2DModel:
        return FluxTransformer2DModel.abstract(self.config, dtype=dtype)

    def conditioning(self, dtype) -> tuple[dict[str, jax.ShapeDtypeStruct], None]:
        config = self.config
        conditioning = {
            "prompt_embeds": jax.ShapeDtypeStruct(
                (1, self.text_tokens, config.joint_attention_dim), dtype
            ),
            "pooled_prompt_embeds": jax.ShapeDtypeStruct((1, config.pooled_projection_dim), dtype),
        }
        if config.guidance_embeds:
            conditioning["guidance"] = jax.ShapeDtypeStruct((1,), jnp.float32)
        return conditioning, None

    def schedule(self, steps: int, latent_height: int, latent_width: int):
        config = schedulers.SchedulerConfig.from_diffusers(self.scheduler)
        tokens = (latent_height // PACK) * (latent_width // PACK)
        return schedulers.make_schedule(config, steps, image_seq_len=tokens)


def flux_text_tokens(config: FluxConfig) -> int:
    """T5's max_sequence_length as FLUX.1's model cards run FluxPipeline: 512 for [dev]
    (diffusers' default), 256 for [schnell] (no guidance embedding)."""
    return 512 if config.guidance_embeds else 256


def family_of(config: UNetConfig | FluxConfig, scheduler: dict | None = None) -> Family:
    """The adapter of a denoiser configuration; `scheduler`: a Flux folder's
    scheduler_config.json (None: FLUX.1 [dev]'s)."""
    if isinstance(config, FluxConfig):
        return FluxFamily(config, flux_text_tokens(config), dict(scheduler or FLUX_SCHEDULER))
    return UNetFamily(config)


def tree_bytes(tree) -> int:
    """The bytes of every array (or shape) of a pytree."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _activations(memory) -> int:
    """Outputs + temporaries of a compiled program, aliased buffers once (its arguments
    apart)."""
    return memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes


@dataclasses.dataclass
class FluxRun:
    """FLUX.1's whole generation of one image, from shapes: T5 (`text_encoder_2`) and CLIP
    (`text_encoder`) encode the prompt, the transformer runs the `steps` of the loop, the
    VAE decodes the latent split by rows (`sharding.rows.map_rows`), as diffusers'
    FluxPipeline does it.

    The run is measured as two compiled programs (not yet through `pipelines.flux`, which
    compiles one), the prompt's encoding (on each device, as a pipeline runs it
    replicated; compiled once) and the loop with the decode (for the devices of each
    configuration), and put together
    (`generation_memory`): every network's weights are held for the whole run, as a
    pipeline that keeps all networks in one state holds them, or T5's are freed once the
    prompt is encoded."""

    family: FluxFamily
    dtype: jnp.dtype  # the transformer's
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    _encoding: int | None = None

    def weights_by_component(self) -> dict[str, int]:
        """Each network's weights in bytes, by its pipeline folder's name."""
        return {
            name: tree_bytes(nnx.state(getattr(self, name)))
            for name in ("transformer", "text_encoder_2", "text_encoder", "vae")
        }

    def encoding_bytes(self) -> int:
        """What encoding one prompt needs beside the encoders' weights: the token ids, the
        embeddings and the temporaries (compiled once)."""
        if self._encoding is None:
            t5_graph, t5 = nnx.split(self.text_encoder_2)
            clip_graph, clip = nnx.split(self.text_encoder)

            def encode(t5, clip, t5_ids, clip_ids):
                prompt = nnx.merge(t5_graph, t5)(t5_ids)
                return prompt, nnx.merge(clip_graph, clip)(clip_ids).pooled_output

            ids = (
                jax.ShapeDtypeStruct((1, self.family.text_tokens), jnp.int32),
                jax.ShapeDtypeStruct((1, CLIP_TOKENS), jnp.int32),
            )
            memory = jax.jit(encode).lower(t5, clip, *ids).compile().memory_analysis()
            self._encoding = tree_bytes(ids) + _activations(memory)
        return self._encoding

    def loop_and_decode(
        self,
        height: int,
        width: int,
        parallel: ParallelConfig,
        attention: AttentionBackend,
    ) -> tuple[jax.stages.Compiled, int]:
        """The denoising loop and the decode of one height x width image compiled for the
        devices of `parallel` (weights and inputs replicated, the image split by rows), and
        the bytes of its inputs but the weights (conditioning, noise, schedule)."""
        family, factor = self.family, self.vae.config.downscale_factor
        h, w = height // factor, width // factor
        sampling = family.sampling(h, w, self.dtype, family.steps)
        sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sampling)
        inputs = (sampling, jax.ShapeDtypeStruct((1, h, w, family.latent_channels), jnp.float32))
        set_attention(self.transformer, attention)
        set_attention(self.vae, attention)
        transformer_graph, transformer = nnx.split(self.transformer)
        vae_graph, vae = nnx.split(self.vae)
        weights = (transformer, vae)

        def run(weights, inputs):
            transformer = nnx.merge(transformer_graph, weights[0])
            vae = nnx.merge(vae_graph, weights[1])
            sampling, noise = inputs
            start = (noise * sampling.schedule.init_noise_sigma).astype(self.dtype)
            final = denoise(transformer, sampling, start, parallel)
            images = map_rows(
                vae, AutoencoderKL.decode, vae.unscale_latents(final.astype(vae.dtype)), parallel
            )
            return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        placement = Placement(weights)
        replicated = placement.replicated(parallel)
        program = jax.jit(
            run,
            in_shardings=(replicated, replicated),
            out_shardings=placement.rows(parallel, height),
            compiler_options=parallel.compiler_options(),
        )
        return program.lower(weights, inputs).compile(), tree_bytes(inputs)

    def generation_memory(
        self,
        height: int,
        width: int,
        parallel: ParallelConfig,
        attention: AttentionBackend,
    ) -> dict:
        """The whole generation's memory per device (`StepAnalysis`'s fields): all weights
        held throughout (as the pipeline keeps its networks today), and with T5's freed
        after encoding; each network's weights; the loop-and-decode program's
        temporaries."""
        compiled, inputs = self.loop_and_decode(height, width, parallel, attention)
        memory = compiled.memory_analysis()
        loop = inputs + _activations(memory)
        weights = self.weights_by_component()
        total = sum(weights.values())
        encoding = self.encoding_bytes()
        return dict(
            memory_bytes_generation_per_device=total + max(encoding, loop),
            memory_bytes_generation_t5_freed_per_device=max(
                total + encoding, total - weights["text_encoder_2"] + loop
            ),
            weights_bytes_per_device=total,
            weights_bytes_by_component=weights,
            temp_bytes_generation_per_device=memory.temp_size_in_bytes,
        )

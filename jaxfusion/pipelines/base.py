"""What the SD and SDXL pipelines share: loading a diffusers pipeline folder, checking a
request before anything compiles, and running it as one compiled program (prompt encoding,
the VAE encoding of a starting image, the denoising loop, VAE decoding)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import lora
from convert.dtypes import parse_dtype
from convert.files import read_json, read_model_index, resolve_pipeline_folder
from jaxfusion import schedulers
from jaxfusion.files import staging_folder
from jaxfusion.images import image_batch
from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextModel,
    Conditioning,
    UNet2DConditionModel,
    pretrained,
)
from jaxfusion.models.scaled_dot_product import AttentionBackend, check_backend, set_attention
from jaxfusion.tokenizer import load_tokenizer, save_tokenizer, tokenize
from sharding.distributed import to_host, wait_for_peers
from sharding.loops import Sampling, concat_batches, denoise, step_noise
from sharding.parallel import ParallelConfig
from sharding.placement import Placement
from sharding.rows import map_rows

# Wraps each long stage ("loading unet", "compiling", "denoising ..."): a progress display.
Stage = Callable[[str], AbstractContextManager]
# What a call returns: decoded images, or the final latents (for a refiner to continue).
Output = Literal["images", "latents"]
OUTPUTS: tuple[Output, ...] = ("images", "latents")


def no_display(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


class Models(nnx.Module):
    """The pipeline's networks, as one module so that they enter the program as one state."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: Sequence[CLIPTextModel],
    ):
        self.unet = unet
        self.vae = vae
        self.text_encoders = nnx.List(text_encoders)


class Request(NamedTuple):
    """One generation's traced inputs (a pytree; the program's static options are `Options`).

    prompt_ids, negative_ids: per tokenizer, (B, 77) int32; negative_ids None when the
        negative embeddings are zeros or there is no guidance.
    latents: (B, h, w, C) float32 NHWC unit noise: the initial noise (before
        init_noise_sigma), or with a starting image the noise added to its latents; None
        when the start is taken as noised already (denoising_start).
    time_ids: (B, n) float32 SDXL micro-conditioning, else None.
    schedule: the sampler's precomputed schedule of the steps that run.
    guidance_scale: () float32.
    image: (B, H, W, 3) float32 in [-1, 1], the image to start from, or None.
    image_latents: (B, h, w, C) float32 NHWC, an image to start from already in the UNet's
        latent space (scaled), or None.
    negative_time_ids: the unconditional half's time_ids; None: time_ids.
    noise_key: the key of each step's fresh noise (`step_noise_key`) for samplers that
        draw some (euler_a, lcm), else None.
    """

    prompt_ids: tuple[jax.Array, ...]
    negative_ids: tuple[jax.Array, ...] | None
    latents: jax.Array | None
    time_ids: jax.Array | None
    schedule: schedulers.Schedule
    guidance_scale: jax.Array
    image: jax.Array | None = None
    image_latents: jax.Array | None = None
    negative_time_ids: jax.Array | None = None
    noise_key: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    """A program's static choices: with classifier-free guidance; negative embeddings all
    zeros (SDXL's `force_zeros_for_empty_prompt` without a negative prompt); clip_skip; how
    the loop and the VAE encode and decode are spread over devices; the attention kernel;
    whether the program returns images or the final latents."""

    guidance: bool
    zero_negative: bool
    clip_skip: int | None
    parallel: ParallelConfig
    attention: AttentionBackend = "auto"
    output: Output = "images"


class TextToImagePipeline:
    """A diffusers pipeline folder, run in JAX: text-to-image, or image-to-image from a
    starting image.

    Subclasses say which diffusers pipeline class they mirror, which tokenizer and text
    encoder subfolders they read, and how prompts become UNet conditioning.
    """

    pipeline_class: ClassVar[str]
    # (tokenizer, text encoder) folders; a folder's model_index.json may leave some out
    # (`text_components_of`).
    text_components: ClassVar[tuple[tuple[str, str], ...]]
    default_guidance_scale: ClassVar[float]
    default_strength: ClassVar[float]  # image-to-image, as diffusers' img2img pipeline
    requires_image: ClassVar[bool] = False  # image-to-image only (the SDXL refiner)

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
        self.models = models
        self.tokenizers = tuple(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.model_index = dict(model_index or {})
        # The (tokenizer, text encoder) folders of this pipeline's text encoders.
        self.text_folders = self.text_components_of(self.model_index)
        self.attention = check_backend(attention)
        self.check_components()
        self._graphdef, state = nnx.split(models)
        # The weights, placed on each mesh once (replicated) and reused by every call there.
        self._placement = Placement(state)
        self._programs: dict[Any, jax.stages.Compiled] = {}
        # (network, parameter path) -> (its variable, its array before the first LoRA).
        self._base_weights: dict[tuple[str, tuple], tuple[nnx.Variable, jax.Array]] = {}

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
    def downscale_factor(self) -> int:
        """Image pixels per UNet latent pixel along each side."""
        return self.vae.config.downscale_factor

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: Any = jnp.float32,
        variant: str | None = None,
        allow_pickle: bool = False,
        attention: AttentionBackend = "auto",
        abstract: bool = False,
        stage: Stage = no_display,
    ) -> TextToImagePipeline:
        """Loads a diffusers pipeline folder (or a hub id, downloaded on first use).

        Args:
          path: a folder with `model_index.json` and the component subfolders.
          dtype: float32, bfloat16 or float16: weights and activations (the VAE runs in
            float32 for float16 when its config sets force_upcast, as in diffusers).
          variant: weight-file variant, e.g. "fp16".
          allow_pickle: also read pickle weights (`.bin`), which run code when loaded.
          attention: the default attention kernel of calls (see `__init__`).
          abstract: read the configs, tokenizers and the list of weight files only; the
            networks hold `jax.ShapeDtypeStruct`s. Such a pipeline's `prepare` checks a
            request (size, steps, scheduler, devices) before the weights are read.
          stage: progress display around each component's loading.
        """
        dtype = parse_dtype(dtype)
        check_backend(attention)
        if abstract:
            stage = no_display  # nothing long happens
        weights = dict(dtype=dtype, variant=variant, allow_pickle=allow_pickle, abstract=abstract)
        index = read_model_index(path)
        text_components = cls.text_components_of(index)
        subfolders = [
            "unet",
            "vae",
            "scheduler",
            *(name for pair in text_components for name in pair),
        ]
        folder = resolve_pipeline_folder(path, subfolders, variant=variant)
        if index.get("_class_name") not in (None, cls.pipeline_class):
            raise ValueError(
                f"{folder} holds a {index['_class_name']}; {cls.__name__} loads a "
                f"{cls.pipeline_class} (jaxfusion.load_pipeline picks the class for you)"
            )
        tokenizers, text_encoders = [], []
        for tokenizer_folder, encoder_folder in text_components:
            with stage(f"loading {encoder_folder}"):
                tokenizers.append(load_tokenizer(folder, tokenizer_folder))
                text_encoders.append(
                    pretrained.load_text_encoder(folder, encoder_folder, **weights)
                )
        with stage("loading unet"):
            unet = pretrained.load_unet(folder, **weights)
        with stage("loading vae"):
            vae = pretrained.load_vae(folder, **weights)
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        models = Models(unet, vae, text_encoders)
        return cls(models, tokenizers, scheduler_config, index, attention=attention)

    def save_pretrained(
        self, path: str | Path, *, dtype: Any = None, flax: bool = False, overwrite: bool = False
    ) -> Path:
        """Writes a diffusers pipeline folder (safetensors weights in `dtype`, default the
        parameters' own) that diffusers' `from_pretrained` and `from_pretrained` here load.
        With `flax`, each network's weights are an orbax checkpoint (`flax_params/`) instead,
        which only jaxfusion loads. The folder is built beside `path` and renamed into place
        when complete."""
        with staging_folder(path, overwrite=overwrite) as folder:
            index = {
                **self.model_index,
                "_class_name": self.pipeline_class,
                "_diffusers_version": self.model_index.get("_diffusers_version", "0.30.0"),
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", self.scheduler_config["_class_name"]],
            }
            weights = dict(dtype=dtype, flax=flax)
            pretrained.save_unet(self.unet, folder / "unet", **weights)
            pretrained.save_vae(self.vae, folder / "vae", **weights)
            pairs = zip(self.text_folders, self.tokenizers, self.text_encoders, strict=True)
            for (tokenizer_folder, encoder_folder), tokenizer, encoder in pairs:
                save_tokenizer(tokenizer, folder / tokenizer_folder)
                pretrained.save_text_encoder(encoder, folder / encoder_folder, **weights)
                index[tokenizer_folder] = ["transformers", type(tokenizer).__name__]
                index[encoder_folder] = ["transformers", type(encoder).__name__]
            (folder / "scheduler").mkdir()
            _write_json(folder / "scheduler" / "scheduler_config.json", self.scheduler_config)
            _write_json(folder / "model_index.json", index)
        return Path(path)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Fuses a LoRA adapter (a safetensors file, a folder, or a hub id; diffusers/PEFT
        or kohya format, kohya in diffusers' or the original SGM block names, see
        `convert.lora`) into the UNet's and text encoders'
        weights, times `scale`: the compiled programs and their speed stay as they are.
        Several LoRAs add up; `unload_lora` restores the weights from before the first.
        Keys that match no weight are refused, with their names, before any weight changes;
        on a pipeline of shapes (`abstract=True`) only these checks run."""
        adapters = lora.read_lora(path)
        layers = set(np.atleast_1d(self.unet.config.layers_per_block))
        if "unet" in adapters and len(layers) == 1:  # kohya's SDXL files: SGM block names
            (n,) = layers
            adapters["unet"] = {lora.from_sgm(m, int(n)): a for m, a in adapters["unet"].items()}
        networks = {"unet": self.unet}
        networks.update(zip([e for _, e in self.text_folders], self.text_encoders, strict=True))
        absent = sorted(set(adapters) - set(networks))
        if absent:
            raise ValueError(f"{path} adapts {absent}: a {self.pipeline_class} has no such part")
        matched = {c: lora.match(networks[c], modules, c) for c, modules in adapters.items()}
        if isinstance(jax.tree.leaves(nnx.state(self.unet))[0], jax.ShapeDtypeStruct):
            return
        for component, targets in matched.items():
            variables = {target.path: target.variable for target in targets}
            for path, array in lora.fuse(targets, scale).items():
                self._base_weights.setdefault((component, path), (variables[path], array))
        self._weights_changed()

    def unload_lora(self) -> None:
        """The weights from before the first `load_lora` again, bit for bit."""
        for variable, array in self._base_weights.values():
            variable.set_value(array)
        self._base_weights.clear()
        self._weights_changed()

    def _weights_changed(self) -> None:
        self._graphdef, state = nnx.split(self.models)
        self._placement = Placement(state)

    def check_components(self) -> None:
        """Refuses components that do not fit together (raises ValueError)."""
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

    def check_size(self, height: int, width: int, *, image: bool = False) -> None:
        """Refuses an image size diffusers' pipelines refuse, with the nearest valid ones:
        one to draw must be a positive multiple of 8 (their rule) and of the VAE's downscale
        factor; a starting `image` of the VAE's factor (their image processor resizes to
        it)."""
        factor = self.downscale_factor
        multiple = factor if image else math.lcm(8, factor)
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % multiple:
                lower = max(multiple, size // multiple * multiple)
                raise ValueError(
                    f"{name}={size} is not a positive multiple of {multiple} (the VAE "
                    f"downscales by {factor}); use {lower} or {lower + multiple}"
                )

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        clip_skip: int | None = None,
        parallel: ParallelConfig | None = None,
        attention: AttentionBackend | None = None,
        image: Any = None,
        image_latents: np.ndarray | None = None,
        strength: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output: Output = "images",
        stage: Stage = no_display,
        **conditioning: Any,
    ) -> np.ndarray:
        """Generates one image per prompt, from noise or from a starting image.

        Args:
          prompt: a prompt or a batch of B prompts.
          negative_prompt: one for all prompts, or B; None: "" (SD) or all-zero negative
            embeddings where the folder says `force_zeros_for_empty_prompt` (SDXL base).
          height, width: in pixels; default the model's native size, or the starting
            image's (which they must then equal).
          num_inference_steps: sampler steps of the whole schedule (a starting image or
            denoising_start/denoising_end run part of them).
          guidance_scale: classifier-free guidance; <= 1 turns it off (the UNet then runs
            on the conditional batch alone, as diffusers). Default as diffusers.
          seed: the noise `jax.random.normal(jax.random.key(seed), ...)`; euler_a and lcm
            also draw fresh noise at each step from it (`step_noises`), also with `latents`.
          latents: explicit noise instead, as diffusers draws it: (B, C, h, w) NCHW unit
            noise; from noise, the initial latents before the scheduler's init_noise_sigma;
            from an image, the noise added to its latents.
          scheduler: "euler", "ddim", "dpmpp", "euler_a" (Euler ancestral) or "lcm" (latent
            consistency, for LCM-LoRA) on the folder's noise schedule; None: the folder's
            own scheduler.
          clip_skip: skip this many final CLIP layers, as diffusers' `clip_skip`.
          parallel: how the denoising loop and the VAE encode and decode run over devices
            (default: one device). The latent stays split by rows from the encoded image or
            the first step to the decoded image; the weights are placed on the mesh once
            and reused by later calls.
          attention: the attention kernel; None: the pipeline's (`attention` at loading).
          image: image-to-image: the image to start from, (H, W, 3) or (B, H, W, 3) float in
            [0, 1] (or uint8), or PIL images; one for all prompts, or B. The VAE encodes it
            to the mean of its latent distribution (diffusers samples it: the difference is
            the encoder's small posterior noise), scaled by the VAE's scaling factor.
          image_latents: instead of `image`, the image in the UNet's latent space, (B, C,
            h, w) NCHW, or batch 1: for a refiner, a base pipeline's `output="latents"`.
          strength: image-to-image, how much of the schedule runs (diffusers' `strength`):
            the last int(strength * num_inference_steps) steps, the image noised to the
            first of them. Default `default_strength` (diffusers': SD 0.8, SDXL 0.3).
          denoising_start: image-to-image continuing a base pipeline's run (diffusers'
            `denoising_start`, the refiner's high noise fraction): the steps after that
            fraction of the schedule; the start is taken as noised already (no noise is
            added) and strength is ignored.
          denoising_end: stop after this fraction of the schedule (diffusers'
            `denoising_end`), e.g. with output="latents" for a refiner to continue.
          output: "images", or "latents": the final latents, (B, C, h, w) float32 NCHW in
            the UNet's latent space (diffusers' `output_type="latent"`), not decoded.
          stage: progress display around compiling and denoising.
          conditioning: pipeline-specific extras (SDXL: original_size, crops_coords_top_left,
            target_size; the SDXL refiner: aesthetic_score, negative_aesthetic_score).
        Returns:
          (B, height, width, 3) float32 in [0, 1], as diffusers' `output_type="np"`; or the
          latents (output="latents").
        """
        request, options = self.prepare(
            prompt,
            negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            latents=latents,
            scheduler=scheduler,
            clip_skip=clip_skip,
            parallel=parallel,
            attention=attention,
            image=image,
            image_latents=image_latents,
            strength=strength,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            output=output,
            **conditioning,
        )
        return self.run(request, options, stage)

    def run(self, request: Request, options: Options, stage: Stage = no_display) -> np.ndarray:
        """The images (or latents) of a prepared request (`prepare`), compiling first unless
        `compile` did already: (B, height, width, 3) float32 in [0, 1], or (B, C, h, w)."""
        program = self.compile(request, options, stage)
        batch, steps = request.prompt_ids[0].shape[0], request.schedule.timesteps.shape[0]
        weights = self._placement.on(options.parallel)
        wait_for_peers(options.parallel.mesh().devices.flat, "running the generation program")
        with stage(f"denoising {batch} image(s), {steps} steps"):
            # The request goes from the host to the devices that need it (no device copies).
            result = to_host(jax.block_until_ready(program(weights, jax.device_get(request))))
        return result.transpose(0, 3, 1, 2) if options.output == "latents" else result

    def prepare(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        clip_skip: int | None = None,
        parallel: ParallelConfig | None = None,
        attention: AttentionBackend | None = None,
        image: Any = None,
        image_latents: np.ndarray | None = None,
        strength: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output: Output = "images",
        **conditioning: Any,
    ) -> tuple[Request, Options]:
        """The checked request and options that `__call__` compiles and runs for the same
        arguments (see there); nothing compiles here."""
        prompts = _prompts(prompt)
        batch = len(prompts)
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: use one of {list(OUTPUTS)}")
        pixels, start, height, width = self._starting_image(
            image, image_latents, batch, height, width
        )
        from_image = pixels is not None or start is not None
        if from_image and strength is None:
            strength = self.default_strength
        elif not from_image:
            if self.requires_image:
                raise ValueError(
                    f"a {self.pipeline_class} starts from an image: pass image= (or "
                    "image_latents=, such as a base pipeline's output='latents')"
                )
            for name, value in (("strength", strength), ("denoising_start", denoising_start)):
                if value is not None:
                    raise ValueError(f"{name} is for image-to-image: pass image= as well")
        if denoising_start is not None and latents is not None:
            raise ValueError(
                "with denoising_start the starting image is taken as noised already and no "
                "noise is added: leave out latents"
            )
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: use 1 or more")
        config = schedulers.SchedulerConfig.from_diffusers(self.scheduler_config, scheduler)
        negatives = self._negative_prompts(negative_prompt, batch)
        guidance = guidance_scale > 1.0
        parallel = parallel or ParallelConfig()
        parallel.check_batch(batch)
        self.check_parallel(parallel, height, width, guidance)
        full = schedulers.make_schedule(config, num_inference_steps)
        steps = schedulers.denoising_steps(
            np.asarray(full.timesteps),
            num_inference_steps,
            config.num_train_timesteps,
            strength=strength,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
        )
        parallel = parallel.for_steps(len(steps))  # the default warm-up, for these steps
        if parallel.mode == "displaced" and not parallel.has_displaced_steps(len(steps)):
            warnings.warn(
                f"warm-up covers all {len(steps)} steps (warmup_steps="
                f"{parallel.warmup_steps}): every step is synchronous, as mode 'sync'",
                stacklevel=2,
            )
        noise = None
        if denoising_start is None:
            noise = self._noise(batch, height, width, seed, latents)
        zero_negative = guidance and negative_prompt is None and self.force_zeros_for_empty_prompt
        time_ids = self.added_conditioning(batch, height, width, **conditioning)
        request = Request(
            prompt_ids=self._tokenize(prompts),
            negative_ids=self._tokenize(negatives) if guidance and not zero_negative else None,
            latents=noise,
            time_ids=time_ids,
            schedule=schedulers.restrict(full, steps),
            guidance_scale=jnp.float32(guidance_scale),
            image=None if pixels is None else jnp.asarray(pixels * 2 - 1),
            image_latents=start,
            negative_time_ids=(
                self.added_conditioning(batch, height, width, negative=True, **conditioning)
                if guidance and time_ids is not None
                else None
            ),
            noise_key=step_noise_key(seed) if full.draws_noise else None,
        )
        attention = self.attention if attention is None else check_backend(attention)
        options = Options(guidance, zero_negative, clip_skip, parallel, attention, output)
        return request, options

    def compile(self, request: Request, options: Options, stage: Stage = no_display):
        """The compiled program for requests shaped as `request` (compiled once per shape
        and options in this process; JAX's persistent cache, when enabled, keeps it across
        runs)."""
        key = (
            options,
            jax.tree.map(lambda x: (x.shape, x.dtype), request),
            jax.tree.structure(request),
        )
        if key not in self._programs:
            with stage("compiling"):
                self._programs[key] = self.lower(request, options).compile()
        return self._programs[key]

    def lower(self, request: Request, options: Options) -> jax.stages.Lowered:
        """The generation program for requests shaped as `request` (arrays or
        `jax.ShapeDtypeStruct`s; the weights may be shapes too, for an abstract pipeline),
        with explicit shardings at its boundary: weights and request replicated on the
        devices of `options.parallel`, the images (B, H, W, 3) split by rows over them."""
        placement = self._placement
        parallel = options.parallel
        replicated = placement.replicated(parallel)
        generate = jax.jit(
            self._generate,
            static_argnums=(0, 1),
            in_shardings=(replicated, replicated),
            out_shardings=placement.rows(parallel, self._output_rows(request, options)),
            compiler_options=parallel.compiler_options(),
        )
        return generate.lower(self._graphdef, options, placement.state, request)

    def _output_rows(self, request: Request, options: Options) -> int:
        """The height of what the program returns: the latents' or the images'."""
        if request.image is not None:
            rows = request.image.shape[1] // self.downscale_factor
        else:
            rows = next(x for x in (request.latents, request.image_latents) if x is not None).shape[
                1
            ]
        return rows if options.output == "latents" else rows * self.downscale_factor

    def _generate(
        self, graphdef: nnx.GraphDef, options: Options, state: nnx.State, request: Request
    ) -> jax.Array:
        models: Models = nnx.merge(graphdef, state)
        set_attention(models, options.attention)
        conditioning = self.encode_prompt(
            models, request.prompt_ids, request.time_ids, options.clip_skip
        )
        if options.guidance:
            negative_time_ids = request.time_ids
            if request.negative_time_ids is not None:
                negative_time_ids = request.negative_time_ids
            if options.zero_negative:
                negative = jax.tree.map(jnp.zeros_like, conditioning)
                negative = negative._replace(time_ids=negative_time_ids)
            else:
                negative = self.encode_prompt(
                    models, request.negative_ids, negative_time_ids, options.clip_skip
                )
            conditioning = concat_batches(negative, conditioning)
        unet, vae = models.unet, models.vae
        latents = self._initial_latents(vae, request, options.parallel).astype(unet.dtype)
        guidance_scale = request.guidance_scale if options.guidance else None
        sampling = Sampling(request.schedule, conditioning, guidance_scale, request.noise_key)
        latents = denoise(unet, sampling, latents, options.parallel)
        if options.output == "latents":
            return latents.astype(jnp.float32)
        latents = vae.unscale_latents(latents.astype(vae.dtype))
        images = map_rows(vae, AutoencoderKL.decode, latents, options.parallel)
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    @staticmethod
    def _initial_latents(
        vae: AutoencoderKL, request: Request, parallel: ParallelConfig
    ) -> jax.Array:
        """The latents the first step takes, (B, h, w, C) (inside the program): the noise
        times init_noise_sigma; or the starting image's latents (the image encoded on the
        mesh, split by rows as the decode), noised to the first step's level unless they
        are noised already (no noise in the request: denoising_start)."""
        schedule = request.schedule
        clean = request.image_latents
        if request.image is not None:
            encode = map_rows(
                vae, _latent_mean, request.image, parallel, vae.config.downscale_factor
            )
            clean = vae.scale_latents(encode)
        if clean is None:
            return request.latents * schedule.init_noise_sigma
        if request.latents is None:
            return clean.astype(jnp.float32)
        return schedulers.add_noise(schedule, clean, request.latents)

    def encode_prompt(
        self,
        models: Models,
        token_ids: tuple[jax.Array, ...],
        time_ids: jax.Array | None,
        clip_skip: int | None,
    ) -> Conditioning:
        """Token ids per tokenizer, (B, 77) each -> the UNet's conditioning (inside the program)."""
        raise NotImplementedError

    def added_conditioning(
        self, batch: int, height: int, width: int, *, negative: bool = False
    ) -> np.ndarray | None:
        """time_ids (B, n) float32 of the conditional half (of the unconditional one with
        `negative`), or None where the UNet takes none."""
        return None

    def check_parallel(
        self, parallel: ParallelConfig, height: int, width: int, guidance: bool
    ) -> None:
        """Refuses a parallel configuration this request cannot run with (before compiling)."""
        factor = self.downscale_factor
        parallel.check_size(height, width, factor, self.unet.row_unit, math.lcm(8, factor))
        if parallel.cfg == 2 and not guidance:
            raise ValueError(
                "cfg=2 splits the two halves of classifier-free guidance over devices, but "
                "guidance is off (guidance_scale <= 1): use cfg=1"
            )
        parallel.mesh()

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) with the defaults filled in, checked by `check_size`."""
        default_height, default_width = self.default_size()
        height = default_height if height is None else height
        width = default_width if width is None else width
        self.check_size(height, width)
        return height, width

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(B, C, h, w): the NCHW shape of the latents of `batch` height x width images."""
        f = self.downscale_factor
        return batch, self.unet.config.in_channels, height // f, width // f

    def initial_latents(self, batch: int, height: int, width: int, seed: int) -> np.ndarray:
        """The initial noise `seed` gives, as diffusers' `latents`: (B, C, h, w) float32 NCHW."""
        return np.asarray(self._noise(batch, height, width, seed, None)).transpose(0, 3, 1, 2)

    def step_noises(self, batch: int, height: int, width: int, seed: int, steps: int) -> np.ndarray:
        """The fresh noise that steps 0..steps-1 of a run with `seed` add, for samplers that
        draw some (euler_a, lcm), as diffusers' scheduler draws it at each step: (steps, B,
        C, h, w) float32 NCHW."""
        batch, channels, h, w = self.latent_shape(batch, height, width)
        key = step_noise_key(seed)
        noises = [step_noise(key, i, (batch, h, w, channels)) for i in range(steps)]
        return np.stack([np.asarray(n).transpose(0, 3, 1, 2) for n in noises])

    def _noise(
        self, batch: int, height: int, width: int, seed: int, latents: np.ndarray | None
    ) -> jax.Array:
        """(B, h, w, C) float32 NHWC: `latents` (NCHW) transposed, or drawn from `seed`."""
        shape = self.latent_shape(batch, height, width)
        if latents is None:
            batch, channels, h, w = shape
            return jax.random.normal(jax.random.key(seed), (batch, h, w, channels), jnp.float32)
        return self._nhwc("latents", latents, shape)

    def _nhwc(self, name: str, array: np.ndarray, expected: tuple[int, ...]) -> jax.Array:
        """`array`, NCHW as diffusers' latents, checked (finite, shape `expected`) -> NHWC
        float32."""
        array = np.asarray(array, np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contain NaN or infinite values; pass finite ones")
        if array.shape != expected:
            f = self.downscale_factor
            raise ValueError(
                f"{name} have shape {array.shape}; expected {expected} (NCHW, as diffusers: "
                f"batch, channels, height/{f}, width/{f})"
            )
        return jnp.asarray(array.transpose(0, 2, 3, 1))

    def _starting_image(
        self,
        image: Any,
        image_latents: np.ndarray | None,
        batch: int,
        height: int | None,
        width: int | None,
    ) -> tuple[np.ndarray | None, jax.Array | None, int, int]:
        """(the image as (B, H, W, 3) in [0, 1], or None; image_latents checked, as
        (B, h, w, C) NHWC, or None; height, width): each start repeated to the batch from
        one, the size that of the start (a given height or width must equal it) or else
        the default, checked by `check_size`."""
        if image is not None and image_latents is not None:
            raise ValueError("pass image or image_latents, not both")
        f = self.downscale_factor
        if image_latents is not None and np.ndim(image_latents) != 4:
            raise ValueError(
                f"image_latents have shape {np.shape(image_latents)}; expected NCHW (batch, "
                f"channels, height/{f}, width/{f})"
            )

        def repeated(name: str, start: np.ndarray | None) -> np.ndarray | None:
            if start is None:
                return None
            if len(start) not in (1, batch):
                raise ValueError(f"{len(start)} {name}s for {batch} prompts; give one or {batch}")
            return np.repeat(np.asarray(start, np.float32), batch // len(start), axis=0)

        pixels = repeated("image", None if image is None else image_batch(image))
        start = repeated("image_latents", image_latents)
        if pixels is None and start is None:
            return None, None, *self.size(height, width)
        size = pixels.shape[1:3] if pixels is not None else (start.shape[2] * f, start.shape[3] * f)
        for name, asked, actual in (("height", height, size[0]), ("width", width, size[1])):
            if asked is not None and asked != actual:
                raise ValueError(
                    f"{name}={asked} but the starting image is {actual} pixels: leave out "
                    f"{name}, or resize the image (the jaxfusion command resizes --image to "
                    "--height/--width)"
                )
        try:
            self.check_size(*size, image=True)
        except ValueError as error:
            raise ValueError(
                f"the starting image is {size[0]}x{size[1]} pixels: {error}; resize it"
            ) from None
        if start is not None:
            start = self._nhwc("image_latents", start, self.latent_shape(batch, *size))
        return pixels, start, *size

    @staticmethod
    def _negative_prompts(negative_prompt: str | Sequence[str] | None, batch: int) -> list[str]:
        if negative_prompt is None or isinstance(negative_prompt, str):
            return [negative_prompt or ""] * batch
        if len(negative_prompt) != batch:
            raise ValueError(
                f"{len(negative_prompt)} negative prompts for {batch} prompts; give one or {batch}"
            )
        return list(negative_prompt)

    def _tokenize(self, prompts: list[str]) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(tokenize(tokenizer, prompts)) for tokenizer in self.tokenizers)


def _latent_mean(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
    """The mean of the VAE's latent distribution of (B, H, W, 3) images in [-1, 1]."""
    return vae.encode(images).mean


def step_noise_key(seed: int) -> jax.Array:
    """The key of the fresh noise that samplers such as euler_a and lcm add at each step
    (`sharding.loops.step_noise`, step i of the run): `seed`'s key folded with 1 (the
    initial noise is drawn with the key itself)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def _prompts(prompt: str | Sequence[str]) -> list[str]:
    """A prompt or a sequence of prompts as a list, anything else refused."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (
        not isinstance(prompts, Sequence)
        or not prompts
        or not all(isinstance(p, str) for p in prompts)
    ):
        raise TypeError(
            f"prompt must be a string or a non-empty list of strings, got {prompt!r}"[:200]
        )
    return list(prompts)


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")

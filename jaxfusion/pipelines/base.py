"""The pipeline core that every model family shares: a `Request` checked against the model,
the noise and the sampler's schedule, one compiled program per request shape (prompt
encoding, the VAE encoding of a starting image, the denoising loop, VAE decoding) with
explicit shardings, the weights placed on each mesh once, and running it.

A model family (`jaxfusion.pipelines.stable_diffusion`: SD 1.x/2.x and SDXL) subclasses
`TextToImagePipeline` and supplies its parts; the core knows none of its networks but the
VAE's interface (`AutoencoderKL`)."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import warnings
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

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
from jaxfusion.models import AutoencoderKL
from jaxfusion.models.scaled_dot_product import AttentionBackend, check_backend, set_attention
from jaxfusion.pipelines.request import Output, Request
from sharding.distributed import to_host, wait_for_peers
from sharding.loops import Denoiser, Sampling, denoise, step_noise
from sharding.parallel import ParallelConfig
from sharding.placement import Placement
from sharding.rows import map_rows

# A LoRA file's adapters, by component and module (`convert.lora.read_lora`).
LoraAdapters = dict[str, dict[str, lora.LowRank]]
# Wraps each long stage ("loading unet", "compiling", "denoising ..."): a progress display.
Stage = Callable[[str], AbstractContextManager]


def no_display(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


class PromptInputs(NamedTuple):
    """A request's prompts as its model family takes them into the program.

    text: the prompts' inputs, a pytree of arrays with the batch B first (SD: token ids per
        tokenizer, and SDXL's micro-conditioning).
    negative_text: the unconditional half's, with classifier-free guidance; else None.
    encoding: the family's static choices of encoding them (hashable; SD: clip_skip).
    """

    text: Any
    negative_text: Any
    encoding: Hashable


class Inputs(NamedTuple):
    """One generation's traced inputs (a pytree; the program's static choices are `Options`).

    text, negative_text: the family's prompt inputs (`PromptInputs`).
    latents: (B, h, w, C) float32 NHWC unit noise: the initial noise (before
        init_noise_sigma), or with a starting image the noise added to its latents; None
        when the start is taken as noised already (denoising_start).
    schedule: the sampler's precomputed schedule of the steps that run.
    guidance_scale: () float32.
    image: (B, H, W, 3) float32 in [-1, 1], the image to start from, or None.
    image_latents: (B, h, w, C) float32 NHWC, an image to start from already in the
        denoiser's latent space (scaled), or None.
    noise_key: the key of each step's fresh noise (`step_noise_key`) for samplers that
        draw some (euler_a, lcm), else None.
    """

    text: Any
    negative_text: Any
    latents: jax.Array | None
    schedule: schedulers.Schedule
    guidance_scale: jax.Array
    image: jax.Array | None = None
    image_latents: jax.Array | None = None
    noise_key: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    """A program's static choices: with classifier-free guidance; the family's encoding of
    the prompts (`PromptInputs.encoding`); how the loop and the VAE encode and decode are
    spread over devices; the attention kernel; whether the program returns images or the
    final latents."""

    guidance: bool
    encoding: Hashable
    parallel: ParallelConfig
    attention: AttentionBackend = "auto"
    output: Output = "images"


class TextToImagePipeline(abc.ABC):
    """A diffusers pipeline folder, run in JAX: text-to-image, or image-to-image from a
    starting image.

    The core of every model family. A family subclasses it and supplies its parts:

    - its networks, `models`: one `nnx.Module` (they enter the program as one state) whose
      `denoiser` (a `sharding.loops.Denoiser`) and `vae` (an `AutoencoderKL`) the program
      runs;
    - the folder: `pipeline_class`, `component_folders`, `load_components`,
      `save_components`, `check_components`;
    - the latents: `latent_channels` (C of the (B, h, w, C) NHWC latents the denoiser
      takes; the VAE's `downscale_factor` image pixels per latent pixel) and `dtype`;
    - the sizes: `default_size`, `size_multiple`;
    - the samplers it takes, `scheduler_kinds`, and its defaults: `default_guidance_scale`,
      `default_strength`, `requires_image`, `takes_image`; where the schedule depends on
      the image's size, `schedule_tokens`;
    - guidance: `classifier_free` (SD: a guidance scale above 1; a guidance-distilled
      model such as Flux.1 [dev] takes the scale as conditioning instead);
    - diffusers' layout of latents a user passes or gets (`latents`, `output="latents"`):
      `latents_to_nhwc`, `nhwc_to_latents` (NCHW here; Flux packs them into tokens);
    - the prompts: `prompt_inputs` (on the host: token ids, micro-conditioning, its own
      options of the request) and `encode_prompts` (in the program: the denoiser's
      conditioning); `abstract_prompts` (their shapes, for `bench analyze`);
    - what a LoRA may touch: `lora_networks`, `lora_modules`.
    """

    pipeline_class: ClassVar[str]  # the diffusers class that model_index.json names
    scheduler_kinds: ClassVar[tuple[str, ...]]  # of `jaxfusion.schedulers.KINDS`
    default_guidance_scale: ClassVar[float]
    default_strength: ClassVar[float]  # image-to-image, as diffusers' img2img pipeline
    requires_image: ClassVar[bool] = False  # image-to-image only (the SDXL refiner)
    takes_image: ClassVar[bool] = True  # image-to-image supported at all

    def __init__(
        self,
        models: nnx.Module,
        scheduler_config: dict[str, Any],
        model_index: dict[str, Any] | None = None,
        *,
        attention: AttentionBackend = "auto",
    ):
        """Args:
        models: the family's networks (see the class).
        scheduler_config: the folder's `scheduler/scheduler_config.json`.
        model_index: the folder's `model_index.json` (the family reads what it needs; the
          rest is written back by `save_pretrained`).
        attention: the attention kernel of calls that do not choose one ("auto", "xla",
          "chunked", "cudnn"; see `jaxfusion.models.scaled_dot_product`).
        """
        self.models = models
        self.scheduler_config = dict(scheduler_config)
        self.model_index = dict(model_index or {})
        self.attention = check_backend(attention)
        self.check_components()
        self._graphdef, state = nnx.split(models)
        # The weights, placed on each mesh once (replicated) and reused by every call there.
        self._placement = Placement(state)
        self._programs: dict[Any, jax.stages.Compiled] = {}
        # (network, parameter path) -> (its variable, its array before the first LoRA).
        self._base_weights: dict[tuple[str, tuple], tuple[nnx.Variable, jax.Array]] = {}

    # The family's parts (see the class).

    @classmethod
    @abc.abstractmethod
    def component_folders(cls, model_index: dict[str, Any]) -> list[str]:
        """The subfolders a folder with this `model_index.json` must have (scheduler
        included), in the order `save_pretrained` lists them there."""

    @classmethod
    @abc.abstractmethod
    def load_components(
        cls,
        folder: Path,
        model_index: dict[str, Any],
        scheduler_config: dict[str, Any],
        *,
        attention: AttentionBackend,
        stage: Stage,
        **weights: Any,
    ) -> TextToImagePipeline:
        """The pipeline of the networks (and tokenizers) in `folder`, each loaded inside
        `stage(...)`; `weights`: dtype, variant, allow_pickle, abstract (as
        `from_pretrained` takes them, dtype parsed)."""

    @abc.abstractmethod
    def save_components(self, folder: Path, *, dtype: Any, flax: bool) -> dict[str, list]:
        """Writes the networks (and tokenizers) into `folder`; returns their
        `model_index.json` entries by subfolder."""

    @abc.abstractmethod
    def check_components(self) -> None:
        """Refuses components that do not fit together (raises ValueError)."""

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """C of the (B, h, w, C) NHWC latents the denoiser takes."""

    @property
    @abc.abstractmethod
    def dtype(self) -> jnp.dtype:
        """What the denoiser runs in."""

    @abc.abstractmethod
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels when none is given."""

    @property
    @abc.abstractmethod
    def size_multiple(self) -> int:
        """What the height and width of an image to draw must be multiples of, in pixels (a
        starting image's: of the VAE's `downscale_factor`)."""

    @abc.abstractmethod
    def prompt_inputs(
        self, request: Request, height: int, width: int, guidance: bool
    ) -> PromptInputs:
        """The prompts of `request` as the program takes them (the unconditional half's
        with `guidance`), its `conditioning` (the family's options) read and checked."""

    @abc.abstractmethod
    def abstract_prompts(self, batch: int, height: int, width: int) -> PromptInputs:
        """The inputs of `batch` prompts and as many negative ones, as
        `jax.ShapeDtypeStruct`s (for `bench analyze`, which compiles from shapes)."""

    @abc.abstractmethod
    def encode_prompts(
        self, models: nnx.Module, text: Any, negative_text: Any, encoding: Hashable
    ) -> Any:
        """(inside the program) The denoiser's conditioning (a pytree, batch first): of
        `text`, batch B; with `negative_text` (guidance), the CFG batch 2B, unconditional
        half first (`sharding.loops.concat_batches`)."""

    @abc.abstractmethod
    def lora_networks(self) -> dict[str, nnx.Module]:
        """The networks a LoRA may adapt, by the component names that `convert.lora`
        gives a LoRA file's parts."""

    @abc.abstractmethod
    def lora_modules(self, adapters: LoraAdapters) -> LoraAdapters:
        """A LoRA file's adapters (`convert.lora.read_lora`) by this family's module names."""

    # Parts with a default: the Stable Diffusion family's rules.

    def classifier_free(self, guidance_scale: float) -> bool:
        """Whether a request with `guidance_scale` runs classifier-free guidance (the
        denoiser on a negative half too): above 1, as diffusers' SD pipelines."""
        return guidance_scale > 1.0

    def schedule_tokens(self, height: int, width: int) -> int | None:
        """The image's token count that the sampler's schedule depends on (flow matching's
        dynamic shift), or None where it depends on no size."""
        return None

    def latents_to_nhwc(
        self, name: str, array: Any, batch: int, height: int, width: int
    ) -> jax.Array:
        """Latents as diffusers' pipeline takes them (`latents`, `image_latents`), checked
        (finite, the shape of `batch` images of height x width) -> (B, h, w, C) float32
        NHWC. Here NCHW (B, C, h, w)."""
        f = self.downscale_factor
        array = checked_latents(
            name,
            array,
            self.latent_shape(batch, height, width),
            f"NCHW, as diffusers: batch, channels, height/{f}, width/{f}",
        )
        return jnp.asarray(array.transpose(0, 2, 3, 1))

    def nhwc_to_latents(self, latents: np.ndarray) -> np.ndarray:
        """(B, h, w, C) NHWC latents -> diffusers' layout of them (NCHW here), as its
        pipelines return `output_type="latent"` and take `latents`."""
        return latents.transpose(0, 3, 1, 2)

    # The core.

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return self.models.vae.config.downscale_factor

    @property
    def is_abstract(self) -> bool:
        """Whether the networks hold `jax.ShapeDtypeStruct`s (`from_pretrained(abstract=True)`)."""
        return isinstance(jax.tree.leaves(nnx.state(self.models))[0], jax.ShapeDtypeStruct)

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
        index = read_model_index(path)
        folder = resolve_pipeline_folder(path, cls.component_folders(index), variant=variant)
        if index.get("_class_name") not in (None, cls.pipeline_class):
            raise ValueError(
                f"{folder} holds a {index['_class_name']}; {cls.__name__} loads a "
                f"{cls.pipeline_class} (jaxfusion.load_pipeline picks the class for you)"
            )
        return cls.load_components(
            folder,
            index,
            read_json(folder / "scheduler" / "scheduler_config.json"),
            attention=attention,
            stage=stage,
            dtype=dtype,
            variant=variant,
            allow_pickle=allow_pickle,
            abstract=abstract,
        )

    def save_pretrained(
        self, path: str | Path, *, dtype: Any = None, flax: bool = False, overwrite: bool = False
    ) -> Path:
        """Writes a diffusers pipeline folder (safetensors weights in `dtype`, default the
        parameters' own) that diffusers' `from_pretrained` and `from_pretrained` here load.
        With `flax`, each network's weights are an orbax checkpoint (`flax_params/`) instead,
        which only jaxfusion loads. The folder is built beside `path` and renamed into place
        when complete."""
        with staging_folder(path, overwrite=overwrite) as folder:
            entries = self.save_components(folder, dtype=dtype, flax=flax)
            entries["scheduler"] = ["diffusers", self.scheduler_config["_class_name"]]
            index = {
                **self.model_index,
                "_class_name": self.pipeline_class,
                "_diffusers_version": self.model_index.get("_diffusers_version", "0.30.0"),
            }
            index.update((name, entries[name]) for name in self.component_folders(index))
            (folder / "scheduler").mkdir()
            _write_json(folder / "scheduler" / "scheduler_config.json", self.scheduler_config)
            _write_json(folder / "model_index.json", index)
        return Path(path)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Fuses a LoRA adapter (a safetensors file, a folder, or a hub id; diffusers/PEFT
        or kohya format, kohya in diffusers' or the original SGM block names, see
        `convert.lora`) into the weights of the networks it adapts (`lora_networks`: the
        UNet and text encoders of SD), times `scale`: the compiled programs and their speed
        stay as they are. Several LoRAs add up; `unload_lora` restores the weights from
        before the first. Keys that match no weight are refused, with their names, before
        any weight changes; on a pipeline of shapes (`abstract=True`) only these checks
        run."""
        adapters = self.lora_modules(lora.read_lora(path))
        networks = self.lora_networks()
        absent = sorted(set(adapters) - set(networks))
        if absent:
            raise ValueError(f"{path} adapts {absent}: a {self.pipeline_class} has no such part")
        matched = {c: lora.match(networks[c], modules, c) for c, modules in adapters.items()}
        if self.is_abstract:
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

    def check_size(self, height: int, width: int, *, image: bool = False) -> None:
        """Refuses an image size diffusers' pipelines refuse, with the nearest valid ones:
        one to draw must be a positive multiple of `size_multiple`; a starting `image` of
        the VAE's downscale factor (their image processor resizes to it)."""
        factor = self.downscale_factor
        multiple = factor if image else self.size_multiple
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % multiple:
                lower = max(multiple, size // multiple * multiple)
                raise ValueError(
                    f"{name}={size} is not a positive multiple of {multiple} (the VAE "
                    f"downscales by {factor}); use {lower} or {lower + multiple}"
                )

    def __call__(
        self,
        prompt: str | Sequence[str] | Request,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        stage: Stage = no_display,
        **fields: Any,
    ) -> np.ndarray:
        """Generates one image per prompt, from noise or from a starting image.

        Takes a `Request`, or its fields as arguments (see there), e.g. `pipe("a cat",
        height=1024, width=1024, num_inference_steps=30, seed=0)`; `stage`: progress
        display around compiling and denoising.

        Returns:
          (B, height, width, 3) float32 in [0, 1], as diffusers' `output_type="np"`; or the
          latents (output="latents"), (B, C, h, w) float32 NCHW.
        """
        return self.run(*self.prepare(prompt, negative_prompt, **fields), stage)

    def run(self, inputs: Inputs, options: Options, stage: Stage = no_display) -> np.ndarray:
        """The images (or latents) of a prepared request (`prepare`), compiling first unless
        `compile` did already: (B, height, width, 3) float32 in [0, 1], or (B, C, h, w)."""
        program = self.compile(inputs, options, stage)
        batch = jax.tree.leaves(inputs.text)[0].shape[0]
        steps = inputs.schedule.timesteps.shape[0]
        weights = self._placement.on(options.parallel)
        wait_for_peers(options.parallel.mesh().devices.flat, "running the generation program")
        with stage(f"denoising {batch} image(s), {steps} steps"):
            # The inputs go from the host to the devices that need them (no device copies).
            result = to_host(jax.block_until_ready(program(weights, jax.device_get(inputs))))
        return self.nhwc_to_latents(result) if options.output == "latents" else result

    def prepare(
        self,
        prompt: str | Sequence[str] | Request,
        negative_prompt: str | Sequence[str] | None = None,
        **fields: Any,
    ) -> tuple[Inputs, Options]:
        """The checked inputs and options that `__call__` compiles and runs for the same
        arguments (a `Request` or its fields); nothing compiles here."""
        request = Request.of(prompt, negative_prompt, **fields)
        batch = request.batch
        if request.from_image and not self.takes_image:
            raise ValueError(
                f"image-to-image is not supported for a {self.pipeline_class} yet: leave "
                "out image and image_latents (text-to-image), or use an SD or SDXL pipeline"
            )
        pixels, start, height, width = self._starting_image(request)
        strength = request.strength
        if request.from_image and strength is None:
            strength = self.default_strength
        elif not request.from_image and self.requires_image:
            raise ValueError(
                f"a {self.pipeline_class} starts from an image: pass image= (or "
                "image_latents=, such as a base pipeline's output='latents')"
            )
        guidance_scale = request.guidance_scale
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        config = schedulers.SchedulerConfig.from_diffusers(self.scheduler_config, request.scheduler)
        if config.kind not in self.scheduler_kinds:
            raise ValueError(
                f"a {self.pipeline_class} runs the schedulers {list(self.scheduler_kinds)}, "
                f"not {config.kind!r}"
            )
        guidance = self.classifier_free(guidance_scale)
        parallel = request.parallel or ParallelConfig()
        self.check_parallel(parallel, height, width, guidance)
        steps = request.num_inference_steps
        full = schedulers.make_schedule(
            config, steps, image_seq_len=self.schedule_tokens(height, width)
        )
        kept = schedulers.denoising_steps(
            np.asarray(full.timesteps),
            steps,
            config.num_train_timesteps,
            strength=strength,
            denoising_start=request.denoising_start,
            denoising_end=request.denoising_end,
        )
        parallel = parallel.for_steps(len(kept))  # the default warm-up, for these steps
        if parallel.mode == "displaced" and not parallel.has_displaced_steps(len(kept)):
            warnings.warn(
                f"warm-up covers all {len(kept)} steps (warmup_steps="
                f"{parallel.warmup_steps}): every step is synchronous, as mode 'sync'",
                stacklevel=2,
            )
        noise = None
        if request.denoising_start is None:
            noise = self._noise(batch, height, width, request.seed, request.latents)
        prompts = self.prompt_inputs(request, height, width, guidance)
        inputs = Inputs(
            text=prompts.text,
            negative_text=prompts.negative_text,
            latents=noise,
            schedule=schedulers.restrict(full, kept),
            guidance_scale=jnp.float32(guidance_scale),
            image=None if pixels is None else jnp.asarray(pixels * 2 - 1),
            image_latents=start,
            noise_key=step_noise_key(request.seed) if full.draws_noise else None,
        )
        attention = self.attention if request.attention is None else request.attention
        options = Options(
            guidance, prompts.encoding, parallel, check_backend(attention), request.output
        )
        return inputs, options

    def compile(self, inputs: Inputs, options: Options, stage: Stage = no_display):
        """The compiled program for requests shaped as `inputs` (compiled once per shape
        and options in this process; JAX's persistent cache, when enabled, keeps it across
        runs)."""
        key = (
            options,
            jax.tree.map(lambda x: (x.shape, x.dtype), inputs),
            jax.tree.structure(inputs),
        )
        if key not in self._programs:
            with stage("compiling"):
                self._programs[key] = self.lower(inputs, options).compile()
        return self._programs[key]

    def lower(self, inputs: Inputs, options: Options) -> jax.stages.Lowered:
        """The generation program for requests shaped as `inputs` (arrays or
        `jax.ShapeDtypeStruct`s; the weights may be shapes too, for an abstract pipeline),
        with explicit shardings at its boundary: weights and inputs replicated on the
        devices of `options.parallel`, the images (B, H, W, 3) split by rows over them."""
        placement = self._placement
        parallel = options.parallel
        replicated = placement.replicated(parallel)
        generate = jax.jit(
            self._generate,
            static_argnums=(0, 1),
            in_shardings=(replicated, replicated),
            out_shardings=placement.rows(parallel, self._output_rows(inputs, options)),
            compiler_options=parallel.compiler_options(),
        )
        return generate.lower(self._graphdef, options, placement.state, inputs)

    def _output_rows(self, inputs: Inputs, options: Options) -> int:
        """The height of what the program returns: the latents' or the images'."""
        if inputs.image is not None:
            rows = inputs.image.shape[1] // self.downscale_factor
        else:
            start = inputs.latents if inputs.latents is not None else inputs.image_latents
            rows = start.shape[1]
        return rows if options.output == "latents" else rows * self.downscale_factor

    def _generate(
        self, graphdef: nnx.GraphDef, options: Options, state: nnx.State, inputs: Inputs
    ) -> jax.Array:
        models = nnx.merge(graphdef, state)
        set_attention(models, options.attention)
        conditioning = self.encode_prompts(
            models, inputs.text, inputs.negative_text, options.encoding
        )
        denoiser: Denoiser = models.denoiser
        vae: AutoencoderKL = models.vae
        latents = self._initial_latents(vae, inputs, options.parallel).astype(self.dtype)
        guidance_scale = inputs.guidance_scale if options.guidance else None
        sampling = Sampling(inputs.schedule, conditioning, guidance_scale, inputs.noise_key)
        latents = denoise(denoiser, sampling, latents, options.parallel)
        if options.output == "latents":
            return latents.astype(jnp.float32)
        latents = vae.unscale_latents(latents.astype(vae.dtype))
        images = map_rows(vae, AutoencoderKL.decode, latents, options.parallel)
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    @staticmethod
    def _initial_latents(vae: AutoencoderKL, inputs: Inputs, parallel: ParallelConfig) -> jax.Array:
        """The latents the first step takes, (B, h, w, C) (inside the program): the noise
        times init_noise_sigma; or the starting image's latents (the image encoded on the
        mesh, split by rows as the decode), noised to the first step's level unless they
        are noised already (no noise in the inputs: denoising_start)."""
        schedule = inputs.schedule
        clean = inputs.image_latents
        if inputs.image is not None:
            encode = map_rows(
                vae, _latent_mean, inputs.image, parallel, vae.config.downscale_factor
            )
            clean = vae.scale_latents(encode)
        if clean is None:
            return inputs.latents * schedule.init_noise_sigma
        if inputs.latents is None:
            return clean.astype(jnp.float32)
        return schedulers.add_noise(schedule, clean, inputs.latents)

    def check_parallel(
        self, parallel: ParallelConfig, height: int, width: int, guidance: bool
    ) -> None:
        """Refuses a parallel configuration this request cannot run with (before compiling)."""
        row_unit = self.models.denoiser.row_unit
        parallel.check_size(height, width, self.downscale_factor, row_unit, self.size_multiple)
        if parallel.cfg == 2 and not guidance:
            raise ValueError(
                "cfg=2 splits the two halves of classifier-free guidance over devices, but "
                "guidance is off (guidance_scale <= 1, or a model guided otherwise, such as "
                "FLUX.1 [dev]): use cfg=1"
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
        return batch, self.latent_channels, height // f, width // f

    def initial_latents(self, batch: int, height: int, width: int, seed: int) -> np.ndarray:
        """The initial noise `seed` gives, as diffusers' `latents` (float32; NCHW (B, C, h,
        w) for SD, `nhwc_to_latents`)."""
        return self.nhwc_to_latents(np.asarray(self._noise(batch, height, width, seed, None)))

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
        """(B, h, w, C) float32 NHWC: `latents` (diffusers' layout, `latents_to_nhwc`), or
        drawn from `seed`."""
        if latents is None:
            batch, channels, h, w = self.latent_shape(batch, height, width)
            return jax.random.normal(jax.random.key(seed), (batch, h, w, channels), jnp.float32)
        return self.latents_to_nhwc("latents", latents, batch, height, width)

    def _starting_image(
        self, request: Request
    ) -> tuple[np.ndarray | None, jax.Array | None, int, int]:
        """(the image as (B, H, W, 3) in [0, 1], or None; image_latents checked, as
        (B, h, w, C) NHWC, or None; height, width): each start repeated to the batch from
        one, the size that of the start (a given height or width must equal it) or else
        the default, checked by `check_size`."""
        batch, image_latents = request.batch, request.image_latents
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

        pixels = repeated("image", None if request.image is None else image_batch(request.image))
        start = repeated("image_latents", image_latents)
        if pixels is None and start is None:
            return None, None, *self.size(request.height, request.width)
        size = pixels.shape[1:3] if pixels is not None else (start.shape[2] * f, start.shape[3] * f)
        for name, actual in (("height", size[0]), ("width", size[1])):
            asked = getattr(request, name)
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
            start = self.latents_to_nhwc("image_latents", start, batch, *size)
        return pixels, start, *size


def checked_latents(name: str, array: Any, expected: tuple[int, ...], layout: str) -> np.ndarray:
    """`array` as float32, refused unless finite and of shape `expected` (`layout` says
    what its axes are, for the message)."""
    array = np.asarray(array, np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values; pass finite ones")
    if array.shape != expected:
        raise ValueError(f"{name} have shape {array.shape}; expected {expected} ({layout})")
    return array


def _latent_mean(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
    """The mean of the VAE's latent distribution of (B, H, W, 3) images in [-1, 1]."""
    return vae.encode(images).mean


def step_noise_key(seed: int) -> jax.Array:
    """The key of the fresh noise that samplers such as euler_a and lcm add at each step
    (`sharding.loops.step_noise`, step i of the run): `seed`'s key folded with 1 (the
    initial noise is drawn with the key itself)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")

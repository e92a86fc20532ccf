"""`jaxfusion bench analyze`: one denoising step of a configuration, and its whole generation
(text encoders, denoising loop, VAE decode), compiled from shapes alone (no weights;
simulated devices), read for their per-device cost: FLOPs and bytes accessed
(`cost_analysis`), memory (`memory_analysis`), the collectives of the optimized HLO, and the
traffic the reference PyTorch implementation would need for the same step.

The denoiser is a UNet (SD 1.x/2.x, SDXL) or FLUX.1's transformer; what differs between the
two (conditioning, latent channels, slab unit, CFG) is their adapter's
(`jaxfusion.bench.families`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion import schedulers
from jaxfusion.bench import overlap, targets
from jaxfusion.bench.families import SD_SCHEDULER, Family, FluxRun, family_of, tree_bytes
from jaxfusion.bench.options import AnalyzeOptions
from jaxfusion.bench.schedule import Schedule, plot_schedule, read_schedule, traffic_by_kind
from jaxfusion.bench.targets import Target
from jaxfusion.display import StageDisplay
from jaxfusion.files import write_atomically, write_text_atomically
from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    FluxConfig,
    FluxTransformer2DModel,
    T5Config,
    T5EncoderModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from jaxfusion.models.configs import (
    FLUX_CONFIGS,
    SCHEDULER_CONFIGS,
    T5_CONFIGS,
    TEXT_ENCODER_CONFIGS,
    UNET_CONFIGS,
    VAE_CONFIGS,
)
from jaxfusion.models.scaled_dot_product import AttentionBackend, set_attention
from jaxfusion.pipelines import PIPELINES, SDPipeline, SDXLPipeline, TextToImagePipeline
from jaxfusion.pipelines.base import Inputs, Options
from jaxfusion.pipelines.stable_diffusion import Models
from sharding.analysis import host_links, laid_out, trace_step
from sharding.loops import (
    NO_BUFFERS,
    SINGLE,
    Loop,
    Sampling,
    denoise,
    step_context,
    step_function,
)
from sharding.parallel import ParallelConfig
from sharding.placement import Placement

SCHEDULER = SD_SCHEDULER
# A denoiser's configuration: a UNet's, or FLUX.1's transformer's.
DenoiserConfig = UNetConfig | FluxConfig


@dataclasses.dataclass(frozen=True)
class Configuration:
    """What a record measured: the model (a name or folder), the image size, the devices N
    and the split of one group of them (patches P, CFG halves C), the mode and the dtype."""

    model: str
    height: int
    width: int
    devices: int
    patch: int
    cfg: int
    mode: str
    dtype: str

    @staticmethod
    def fields(
        model: str, height: int, width: int, parallel: ParallelConfig, dtype, data: int = 1
    ) -> dict[str, Any]:
        """The fields of one data group's `parallel` (N = data x C x P devices)."""
        return dict(
            model=model,
            height=height,
            width=width,
            devices=data * parallel.devices,
            patch=parallel.patches,
            cfg=parallel.cfg,
            mode=parallel.mode,
            dtype=jnp.dtype(dtype).name,
        )


@dataclasses.dataclass(frozen=True)
class StepAnalysis(Configuration):
    """One configuration's denoising step, per device (the JSON record of `bench analyze`).

    comm_bytes_per_device_step: received per step, from the traced program (its dtype).
    comm_bytes_hlo_per_device_step: the same from the optimized HLO's collectives; equal in
        float32, larger in bfloat16/float16 because the CPU compiler widens them to float32.
    comm_bytes_reference_per_device_step: the reference PyTorch scheme's (`reference_bytes`).
    memory_bytes_per_device: the compiled step's arguments + outputs + temporaries.
    memory_bytes_generation_per_device: the same of the whole generation's program (text
        encoders, warm-up and displaced scans, VAE decode): `weights_bytes_per_device` (all
        networks' weights, replicated, all of them held even where the program uses
        fewer) + `temp_bytes_generation_per_device` (every intermediate, the stale buffers
        included) + the request and the image slab. FLUX.1's: put together from two
        compiled programs, the prompt's encoding and the loop with the decode
        (`families.FluxRun`; not yet `pipelines.flux`'s one program), every weight held
        for the whole run (as that pipeline, which keeps its networks in one state, holds
        them);
        `memory_bytes_generation_t5_freed_per_device`: the same with T5's weights freed
        once the prompt is encoded (None for the UNets: no T5);
        `weights_bytes_by_component`: each network's weights by its folder's name (Flux;
        None for the UNets); `temp_bytes_generation_per_device` is then the loop and
        decode's temporaries.
    FLOPs come from the step with `xla` attention: `cost_analysis` counts a loop's body
    once, and chunked attention is a loop. Memory comes from the programs with `attention`.
    None: not measured (the whole generation of a model whose pipeline is not known).
    devices: N = data x cfg x patch; data: D, the groups that split a batch of prompts
        (each of one group's C x P devices computes what it computes in a C x P run: a
        group exchanges nothing with another, so the per-device figures are one group's).
    compress: the codec of the displaced exchange (`ParallelConfig.compress`); the traffic
        counts its payloads' bytes (packed codes and scales), the reference stays the
        uncompressed scheme's.
    kv_refresh: K, displaced steps exchange K/V every K-th step (`ParallelConfig`): the
        traced traffic is then the mean over K displaced steps (one exchanges K/V, K - 1 do
        not); the HLO's, memory and FLOPs are the step's that exchanges them.
    projected_step_model: `projected_step_seconds`, a model, not a measurement.
    batch: the denoiser's batch in one step of one image (on one device without
        --cfg-parallel): 2 with classifier-free guidance (the UNets), 1 without (FLUX.1:
        [dev] embeds the guidance scale, [schnell] takes none).
    latent_rows_per_patch: each patch's real latent rows (columns for naive column slabs);
    latent_rows_per_device: the rows each device's arrays hold (`sharding.split`: more than
        the real rows where the height does not split into equal slabs, the rest padding
        that every device computes too). Of what the devices compute, `padding` = 1 - h /
        (P x rows per device) is padding: the FLOPs beyond the one-device step's share
        (`flops_per_device_step` x P over `flops_single_step`, which also holds the halos'
        cost), and the K/V and stale buffers' bytes grow by about 1 / (1 - padding).
    """

    flops_per_device_step: float
    flops_single_step: float
    bytes_accessed_per_device_step: float
    comm_bytes_per_device_step: int
    comm_bytes_hlo_per_device_step: int
    comm_bytes_reference_per_device_step: int
    memory_bytes_per_device: int
    stale_bytes_per_device: int
    collectives: dict[str, dict[str, int]]
    attention: str = "auto"
    memory_bytes_generation_per_device: int | None = None
    weights_bytes_per_device: int | None = None
    temp_bytes_generation_per_device: int | None = None
    hosts: int = 1
    host_links: dict[str, dict[str, int]] | None = None
    compress: str = "none"
    kv_refresh: int = 1
    projected_step_model: dict | None = None
    data: int = 1
    latent_rows_per_patch: list[int] | None = None
    latent_rows_per_device: int | None = None
    batch: int = 2
    weights_bytes_by_component: dict[str, int] | None = None
    memory_bytes_generation_t5_freed_per_device: int | None = None

    @property
    def padding(self) -> float:
        """The share of the rows the devices compute that are padding."""
        if self.latent_rows_per_device is None:
            return 0.0
        rows = len(self.latent_rows_per_patch) * self.latent_rows_per_device
        return 1 - sum(self.latent_rows_per_patch) / rows


def abstract_inputs(
    config: DenoiserConfig | Family,
    latent_height: int,
    latent_width: int,
    dtype,
    steps: int = 50,
) -> tuple[UNet2DConditionModel | FluxTransformer2DModel, Sampling, jax.ShapeDtypeStruct]:
    """(denoiser, sampling inputs of a `steps`-step run, latents) as shapes, for a UNet
    the CFG batch of 2 with 77 text tokens and DDIM, for FLUX.1's transformer batch 1 with
    T5's and CLIP's embeddings and flow matching (`families`); one (1, latent_height,
    latent_width, C) latent."""
    return as_family(config).abstract_inputs(latent_height, latent_width, dtype, steps)


def as_family(config: DenoiserConfig | Family) -> Family:
    """The family adapter of a denoiser configuration (or the adapter itself)."""
    return config if isinstance(config, Family) else family_of(config)


def single_step(
    config: DenoiserConfig | Family,
    height: int,
    width: int,
    dtype,
    attention: AttentionBackend = "xla",
    *,
    downscale: int,
) -> jax.stages.Lowered:
    """One single-device step (the family's batch: 2 with CFG) for a height x width image
    with `attention`, lowered from shapes; `downscale`: the VAE's image pixels per latent
    pixel (`downscale_factor`)."""
    denoiser, sampling, latents = abstract_inputs(
        config, height // downscale, width // downscale, dtype
    )
    set_attention(denoiser, attention)
    graphdef, weights = nnx.split(denoiser)
    state = jax.eval_shape(schedulers.init_state, sampling.schedule, latents)

    def step(weights, sampling, latents, state):
        loop = Loop.start(graphdef, weights, sampling, SINGLE)
        return loop.step(None, latents, state, NO_BUFFERS, jnp.int32(10))[:2]

    return jax.jit(step).lower(weights, sampling, latents, state)


def single_step_cost(
    config: DenoiserConfig | Family,
    height: int,
    width: int,
    dtype,
    attention: AttentionBackend = "xla",
    *,
    downscale: int,
) -> dict:
    """`single_step`'s `cost_analysis` and, under "memory", its memory (arguments +
    outputs + temporaries)."""
    compiled = single_step(config, height, width, dtype, attention, downscale=downscale).compile()
    return {**_cost(compiled), "memory": _memory_bytes(compiled.memory_analysis())}


def downscale_factor(model: str) -> int:
    """Image pixels per latent pixel of `model` (as `load_config` names it): its VAE's, or 8
    when only its denoiser is known (every Stable Diffusion and FLUX.1 VAE downscales by
    8)."""
    if model in VAE_CONFIGS:
        return VAEConfig.from_diffusers(VAE_CONFIGS[model]).downscale_factor
    if (Path(model) / "vae" / "config.json").is_file():
        from jaxfusion.models import pretrained

        return pretrained.load_vae_config(model).downscale_factor
    return 8


def abstract_pipeline(model: str, dtype) -> TextToImagePipeline | FluxRun | None:
    """The whole pipeline `model` names (sd15, sd21, sdxl, flux-dev, flux-schnell, or a
    diffusers pipeline folder) with shapes for weights (FLUX.1's: its networks,
    `families.FluxRun`), or None when only its denoiser is known (a UNet or transformer
    folder, the SDXL refiner)."""
    flux = flux_run(model, dtype)
    if flux is not None:
        return flux
    if model in UNET_CONFIGS and model in VAE_CONFIGS:
        cls = SDXLPipeline if model == "sdxl" else SDPipeline
        unet = UNetConfig.from_diffusers(UNET_CONFIGS[model])
        vae = VAEConfig.from_diffusers(VAE_CONFIGS[model])
        texts = [CLIPTextConfig.from_transformers(c) for c in TEXT_ENCODER_CONFIGS[model]]
    elif (Path(model) / "model_index.json").is_file():
        from jaxfusion.models import pretrained

        index = json.loads((Path(model) / "model_index.json").read_text())
        if index.get("_class_name") not in PIPELINES:
            return None
        cls = PIPELINES[index["_class_name"]]
        unet, vae = pretrained.load_unet_config(model), pretrained.load_vae_config(model)
        texts = [
            CLIPTextConfig.from_transformers(
                json.loads((Path(model) / encoder / "config.json").read_text())
            )
            for _, encoder in cls.text_components
        ]
    else:
        return None
    # SDXL's second encoder has the projection; SD's only encoder has none.
    classes = (CLIPTextModel, CLIPTextModelWithProjection)[-len(texts) :]
    models = Models(
        UNet2DConditionModel.abstract(unet, dtype=dtype),
        AutoencoderKL.abstract(vae, dtype=vae.compute_dtype(dtype)),
        [c.abstract(config, dtype=dtype) for c, config in zip(classes, texts, strict=True)],
    )
    return cls(models, (), SCHEDULER)


def flux_run(model: str, dtype) -> FluxRun | None:
    """FLUX.1's networks as shapes (flux-dev, flux-schnell, or a FluxPipeline folder), or
    None for another model (or a folder without the four networks' configs). T5 and CLIP
    in `dtype`, the VAE in its own compute dtype."""
    folder = Path(model)
    if model in FLUX_CONFIGS:
        transformer = FluxConfig.from_diffusers(FLUX_CONFIGS[model])
        vae = VAEConfig.from_diffusers(VAE_CONFIGS[model])
        (clip,) = TEXT_ENCODER_CONFIGS[model]
        t5, scheduler = T5_CONFIGS[model], SCHEDULER_CONFIGS[model]
    elif all(
        (folder / name / "config.json").is_file()
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    ):
        from jaxfusion.models import pretrained

        def config(name: str) -> dict:
            return json.loads((folder / name / "config.json").read_text())

        transformer = pretrained.load_flux_transformer_config(model)
        vae = pretrained.load_vae_config(model)
        clip, t5 = config("text_encoder"), config("text_encoder_2")
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    else:
        return None
    family = family_of(transformer, scheduler)
    return FluxRun(
        family,
        jnp.dtype(dtype),
        FluxTransformer2DModel.abstract(transformer, dtype=dtype),
        AutoencoderKL.abstract(vae, dtype=vae.compute_dtype(dtype)),
        CLIPTextModel.abstract(CLIPTextConfig.from_transformers(clip), dtype=dtype),
        T5EncoderModel.abstract(T5Config.from_transformers(t5), dtype=dtype),
    )


def run_memory(
    pipeline: TextToImagePipeline | FluxRun,
    height: int,
    width: int,
    parallel: ParallelConfig,
    attention: AttentionBackend,
) -> dict:
    """The whole generation's memory per device and its parts (`StepAnalysis`'s fields)."""
    if isinstance(pipeline, FluxRun):
        return pipeline.generation_memory(height, width, parallel, attention)
    return generation_memory(pipeline, height, width, parallel, attention)


def generation_memory(
    pipe: TextToImagePipeline,
    height: int,
    width: int,
    parallel: ParallelConfig,
    attention: AttentionBackend,
) -> dict[str, int]:
    """The whole generation of one height x width image with classifier-free guidance (a
    negative prompt encoded too), 50 steps, compiled from shapes for the devices of
    `parallel`: its memory per device and the parts of it."""
    _, channels, h, w = pipe.latent_shape(1, height, width)
    prompts = pipe.abstract_prompts(1, height, width)
    schedule = schedulers.make_schedule(schedulers.SchedulerConfig.from_diffusers(SCHEDULER), 50)
    inputs = Inputs(
        text=prompts.text,
        negative_text=prompts.negative_text,
        latents=jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32),
        schedule=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), schedule),
        guidance_scale=jax.ShapeDtypeStruct((), jnp.float32),
    )
    options = Options(True, prompts.encoding, parallel, attention)
    memory = pipe.lower(inputs, options).compile().memory_analysis()

    # Every weight counts: the pipeline holds them all on each device, also those the
    # program leaves out of its arguments (unused: the text encoders' last layers).
    weights = tree_bytes(nnx.state(pipe.models))
    held = weights + tree_bytes(inputs) + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return dict(
        memory_bytes_generation_per_device=held - memory.alias_size_in_bytes,
        weights_bytes_per_device=weights,
        temp_bytes_generation_per_device=memory.temp_size_in_bytes,
    )


def analyze(
    model: str,
    config: DenoiserConfig | Family,
    height: int,
    width: int,
    parallel: ParallelConfig,
    dtype,
    single: dict | None = None,
    attention: AttentionBackend = "auto",
    pipeline: TextToImagePipeline | FluxRun | None = None,
    hosts: int = 1,
    *,
    downscale: int,
) -> StepAnalysis:
    """Compiles the steady-state step of `parallel` (a displaced step for displaced mode)
    for the first C x P devices (one data group, `data_group`) and reads it, with the
    single-device step for comparison (`single`: its `single_step_cost` with xla
    attention, computed here when not given), and the whole generation of `pipeline` (an
    `abstract_pipeline`; None: not measured); with `hosts` > 1, what crosses hosts
    (`host_links`, the whole (D, C, P) mesh's bytes per step). `downscale`: the VAE's
    image pixels per latent pixel (`downscale_factor`)."""
    family = as_family(config)
    refuse_cfg_split(family, parallel.cfg > 1, model)
    data, parallel = parallel.data, data_group(parallel)
    latent_height, latent_width = height // downscale, width // downscale
    denoiser, sampling, latents = abstract_inputs(family, latent_height, latent_width, dtype)
    single = single or single_step_cost(family, height, width, dtype, downscale=downscale)
    generation = {}
    if pipeline is not None:
        generation = run_memory(pipeline, height, width, parallel, attention)
    record = dict(
        **Configuration.fields(model, height, width, parallel, dtype, data),
        data=data,
        batch=family.batch,
        flops_single_step=float(single["flops"]),
        attention=attention,
        hosts=hosts,
        latent_rows_per_patch=[latent_height],
        latent_rows_per_device=latent_height,
        **generation,
    )
    if parallel.mode == "single":
        memory = single["memory"]  # the xla step's: FLOPs stay its, memory is `attention`'s
        if attention != "xla":
            memory = single_step_cost(family, height, width, dtype, attention, downscale=downscale)[
                "memory"
            ]
        return StepAnalysis(
            **record,
            flops_per_device_step=float(single["flops"]),
            bytes_accessed_per_device_step=float(single["bytes accessed"]),
            comm_bytes_per_device_step=0,
            comm_bytes_hlo_per_device_step=0,
            comm_bytes_reference_per_device_step=0,
            memory_bytes_per_device=memory,
            stale_bytes_per_device=0,
            collectives={},
        )
    exchange = {"displaced": "displaced", "sync": "sync", "naive": "none"}[parallel.mode]
    traced = trace_step(denoiser, sampling, latents, parallel, exchange)
    layout, laid_out_latents = laid_out(denoiser, latents, parallel)
    record.update(
        latent_rows_per_patch=list(layout.split.counts),
        latent_rows_per_device=layout.split.slab,
    )
    context = step_context(parallel.mode, parallel, layout.split, latents.shape[2])
    state = jax.eval_shape(schedulers.init_state, sampling.schedule, laid_out_latents)
    received = sum(c.received_bytes for c in traced.collectives())
    if parallel.kv_refresh > 1 and exchange == "displaced":
        kept = trace_step(denoiser, sampling, latents, parallel, exchange, exchange_kv=False)
        kept_bytes = sum(c.received_bytes for c in kept.collectives())
        received = (received + (parallel.kv_refresh - 1) * kept_bytes) // parallel.kv_refresh
    uncompressed = traced
    if parallel.compress != "none":
        uncompressed = trace_step(
            denoiser, sampling, latents, dataclasses.replace(parallel, compress="none"), exchange
        )

    def compile_step(backend: AttentionBackend):
        set_attention(denoiser, backend)
        step = jax.jit(step_function(denoiser, parallel, context, layout=layout))
        weights = nnx.state(denoiser)
        args = (weights, traced.buffers, sampling, laid_out_latents, state, jnp.int32(10))
        return step.lower(*args).compile()

    compiled = compile_step("xla")
    cost = _cost(compiled)
    memory = (compiled if attention == "xla" else compile_step(attention)).memory_analysis()
    hlo = read_schedule(compiled.as_text()).collectives
    return StepAnalysis(
        **record,
        flops_per_device_step=float(cost["flops"]),
        bytes_accessed_per_device_step=float(cost["bytes accessed"]),
        comm_bytes_per_device_step=received,
        comm_bytes_hlo_per_device_step=sum(c.received_bytes for c in hlo),
        comm_bytes_reference_per_device_step=reference_bytes(uncompressed, family, latents),
        memory_bytes_per_device=_memory_bytes(memory),
        stale_bytes_per_device=traced.stale_bytes_per_device(),
        collectives=traffic_by_kind(hlo),
        host_links=host_links(traced, hosts, data) if hosts > 1 else None,
        compress=parallel.compress,
        kv_refresh=parallel.kv_refresh,
    )


def target_loop(
    config: DenoiserConfig | Family,
    height: int,
    width: int,
    parallel: ParallelConfig,
    dtype,
    target: Target,
    attention: AttentionBackend = "auto",
    *,
    downscale: int,
    steps: int = 50,
    xla_options: Mapping[str, Any] | None = None,
) -> TargetAnalysis:
    """The denoising loop of `steps` steps (warm-up and displaced scans) for `parallel` (one
    data group), compiled from shapes for `target`'s chips by its own compiler (a
    `ProgramTooLarge` where it does not fit one chip), and read from its schedule: memory
    per chip and the overlap of the displaced loop's collectives (`overlap.loop_overlap`;
    the synchronous loop's for sync mode). `xla_options`: XLA options compiled with, after
    jaxfusion's own."""
    parallel = dataclasses.replace(parallel, device_pool=tuple(targets.devices(target)))
    denoiser, sampling, latents = abstract_inputs(
        config, height // downscale, width // downscale, dtype, steps=steps
    )
    sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sampling)
    set_attention(denoiser, attention)
    graphdef, weights = nnx.split(denoiser)
    placement = Placement(weights)
    replicated = placement.replicated(parallel)
    rows = placement.rows(parallel, latents.shape[1])

    def run(weights, sampling, latents):
        return denoise(nnx.merge(graphdef, weights), sampling, latents, parallel)

    program = jax.jit(
        run,
        in_shardings=(replicated, replicated, rows),
        out_shardings=rows,
        compiler_options={
            **parallel.compiler_options(),
            **target.compiler_options,
            **(xla_options or {}),
        },
    )
    compiled = targets.compile_for(target, program.lower(weights, sampling, latents))
    schedule = read_schedule(compiled.as_text())
    kind, loop_steps = parallel.schedule(steps)[-1]
    body = overlap.displaced_loop(schedule, len(loop_steps))
    return TargetAnalysis(
        target=target.name,
        loop=kind,
        memory_bytes_per_chip=targets.peak_memory_bytes(compiled),
        hbm_bytes=target.hbm_bytes,
        overlap=overlap.loop_overlap(schedule, body, target),
        schedule=schedule,
        body=body,
    )


@dataclasses.dataclass(frozen=True)
class TargetAnalysis:
    """`target_loop`'s reading: the loop whose body it read (`loop`: "displaced", "sync",
    ...), the peak memory of one chip and its HBM, the overlap, and the schedule itself."""

    target: str
    loop: str
    memory_bytes_per_chip: int
    hbm_bytes: int
    overlap: overlap.LoopOverlap
    schedule: Schedule
    body: str


def data_group(parallel: ParallelConfig) -> ParallelConfig:
    """One data group of `parallel`: its C x P devices (data 1), which compute one image
    as `parallel`'s groups do; mode single where that is one device."""
    devices = parallel.devices // parallel.data
    if devices == 1:
        return ParallelConfig(mode="single")
    return dataclasses.replace(parallel, devices=devices, data=1)


def projected_step_seconds(
    flops_per_device_step: float,
    comm_bytes_per_device_step: int,
    link_gbs: Sequence[float],
    device_tflops: float,
) -> dict:
    """A model of one step's time on slow links, not a measurement: compute (the step's
    FLOPs per device at `device_tflops` TFLOP/s) + the bytes it receives in the program's
    own dtypes (`comm_bytes_per_device_step`: the CPU compiler widens bfloat16 collectives
    to float32 in its HLO, but not the codecs' uint8 codes) over a link of each speed of
    `link_gbs` GB/s, with no overlap of the two (DistriFusion hides the exchange behind
    the step where the link is fast enough; this is the time where it is not)."""
    compute = flops_per_device_step / (device_tflops * 1e12)
    return {
        "kind": "model, not a measurement",
        "device_tflops": device_tflops,
        "compute_s": compute,
        "step_s_by_link_gbs": {
            str(gbs): compute + comm_bytes_per_device_step / (gbs * 1e9) for gbs in link_gbs
        },
    }


def reference_bytes(traced, config: DenoiserConfig | Family, latents: jax.ShapeDtypeStruct) -> int:
    """What one device receives per step under the reference PyTorch scheme for the same
    step: every other device's boundary rows of each k > 1 conv but conv_in (all-gathered,
    where ours go to the two neighbours), K/V and GroupNorm moments (all-gathered, as ours),
    and every other device's denoiser output (all-gathered each step; ours stays sharded).
    FLUX.1's transformer has no convolution and no GroupNorm: the scheme carried over to it
    is its K/V (all-gathered, as ours) and the output's all-gather."""
    family = as_family(config)
    parallel = traced.parallel
    patches = parallel.patches
    total = 0
    for c in traced.collectives():
        if c.kind == "ppermute":
            conv_in = c.shape[-1] == family.latent_channels
            total += 0 if conv_in else (patches - 1) * c.received_bytes
        elif c.axes == ("patch",):
            total += c.received_bytes
    _, height, width, _ = latents.shape
    batch = family.batch // parallel.cfg
    output = batch * (height // patches) * width * family.output_channels
    return total + (patches - 1) * output * jnp.dtype(latents.dtype).itemsize


def _memory_bytes(memory) -> int:
    """Arguments + outputs + temporaries of a compiled program, aliased buffers once."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def load_config(model: str) -> DenoiserConfig:
    """A built-in configuration by name (sd15, sd21, sdxl, sdxl-refiner, flux-dev,
    flux-schnell) or a folder's denoiser config.json: a UNet's or a Flux transformer's (its
    own folder or a pipeline folder)."""
    if model in UNET_CONFIGS:
        return UNetConfig.from_diffusers(UNET_CONFIGS[model])
    if model in FLUX_CONFIGS:
        return FluxConfig.from_diffusers(FLUX_CONFIGS[model])
    from jaxfusion.models import pretrained

    folder = Path(model)
    own = folder / "config.json"
    own_class = json.loads(own.read_text()).get("_class_name") if own.is_file() else None
    if own_class == FluxTransformer2DModel.__name__ or (
        own_class is None and (folder / "transformer" / "config.json").is_file()
    ):
        return pretrained.load_flux_transformer_config(model)
    return pretrained.load_unet_config(model)


def load_family(model: str) -> Family:
    """The family adapter of `model` (see `load_config`), with a Flux pipeline folder's own
    scheduler."""
    config = load_config(model)
    flux = SCHEDULER_CONFIGS.get(model)
    scheduler_file = Path(model) / "scheduler" / "scheduler_config.json"
    if flux is None and isinstance(config, FluxConfig) and scheduler_file.is_file():
        flux = json.loads(scheduler_file.read_text())
    return family_of(config, flux)


def refuse_cfg_split(family: Family, cfg_parallel: bool, model: str) -> None:
    """Refuses CFG halves on separate devices (`cfg_parallel`) for a family without
    classifier-free guidance (ValueError)."""
    if cfg_parallel and not family.guided:
        raise ValueError(
            f"--cfg-parallel: {model} has no classifier-free guidance (FLUX.1 [dev] takes the "
            "guidance scale as conditioning, [schnell] none), so each step has one batch, "
            "not two halves to split over devices; drop --cfg-parallel"
        )


def run(options: AnalyzeOptions, display: StageDisplay | None = None) -> list[StepAnalysis]:
    """`jaxfusion bench analyze`: every (height, devices) of `options`; prints a table,
    writes the JSON file and the plot `options` asks for, and returns the records."""
    display = display or StageDisplay()
    model, dtype = options.model, options.dtype
    family, downscale = load_family(model), downscale_factor(model)
    refuse_cfg_split(family, options.cfg_parallel, model)
    if options.target is not None:
        targets.devices(targets.target(options.target))  # its compiler is there
    pipeline = abstract_pipeline(model, dtype)
    if pipeline is None:
        display.note(f"{model}: only the denoiser is known, the whole generation is not measured")
    if options.mode != "displaced" and (
        set(options.compress) != {"none"} or options.kv_refresh > 1
    ):
        raise ValueError(
            "--compress and --kv-refresh change displaced steps: drop them for --parallel "
            + options.mode
        )
    rows = []  # every row checked before the first compiles
    for height in options.heights:
        width = options.width or height
        for devices in options.devices:
            if devices % options.data:
                raise ValueError(
                    f"--devices {devices} do not split into --data-parallel {options.data} "
                    f"groups: give --devices counts that are multiples of {options.data}"
                )
            group = devices // options.data  # a data group's devices
            mode = "single" if devices == 1 else options.mode
            cfg = 2 if options.cfg_parallel and group > 1 else 1
            codecs = options.compress if mode == "displaced" and group > 1 else ("none",)
            for compress in codecs:
                parallel = ParallelConfig(
                    devices,
                    cfg,
                    options.data,
                    mode=mode,
                    group_norm=options.group_norm,
                    compress=compress,
                    kv_refresh=options.kv_refresh if mode == "displaced" else 1,
                )
                parallel.check_size(height, width, downscale, family.row_unit)
                if devices > 1 and devices % options.hosts:
                    raise ValueError(
                        f"--devices {devices} do not spread evenly over --hosts {options.hosts}"
                    )
                rows.append((height, width, parallel))
    if options.target is not None:
        return run_on_target(options, rows, family, downscale, display)
    records = []
    singles = {}  # the single-device step, compiled once per size
    for height, width, parallel in rows:
        devices, mode, compress = parallel.devices, parallel.mode, parallel.compress
        with display(f"{model} {height}x{width}, {devices} device(s), {mode} {compress}"):
            if (height, width) not in singles:
                singles[height, width] = single_step_cost(
                    family, height, width, dtype, downscale=downscale
                )
            record = analyze(
                model,
                family,
                height,
                width,
                parallel,
                dtype,
                singles[height, width],
                attention=options.attention,
                pipeline=pipeline,
                hosts=options.hosts,
                downscale=downscale,
            )
        model_times = projected_step_seconds(
            record.flops_per_device_step,
            record.comm_bytes_per_device_step,
            options.link_gbs,
            options.device_tflops,
        )
        record = dataclasses.replace(record, projected_step_model=model_times)
        records.append(record)
        display.note(
            f"  projected step (a model, not a measurement; {options.device_tflops:g} TFLOP/s): "
            + ", ".join(
                f"{gbs} GB/s {t:.3f} s" for gbs, t in model_times["step_s_by_link_gbs"].items()
            )
        )
        display.note(
            "  memory per device: whole run "
            f"{_scaled(record.memory_bytes_generation_per_device, 1e-6, ',.0f')} MB"
            + (
                ""
                if record.memory_bytes_generation_t5_freed_per_device is None
                else f" ({record.memory_bytes_generation_t5_freed_per_device / 1e6:,.0f} MB "
                "with T5 freed after encoding)"
            )
            + f"; one step compiled alone {record.memory_bytes_per_device / 1e6:,.0f} MB (its "
            "own program: stale buffers in and out, nothing shared with a run)"
        )
        if record.weights_bytes_by_component:
            display.note(
                "  weights: "
                + ", ".join(
                    f"{name} {size / 1e6:,.0f} MB"
                    for name, size in record.weights_bytes_by_component.items()
                )
            )
        if record.host_links:
            crossing = {k: v["cross_host"] for k, v in record.host_links.items()}
            display.note(
                f"  across {options.hosts} hosts: {sum(crossing.values()) / 1e6:,.1f} MB per "
                "step (" + ", ".join(f"{k} {v / 1e6:,.1f}" for k, v in crossing.items()) + ")"
            )
        write_records(options.json, records)
    print_table(records, display)
    if options.json:
        display.note(f"wrote {options.json}")
    if options.plot:
        plot_records(records, Path(options.plot))
        display.note(f"wrote {options.plot}")
    return records


@dataclasses.dataclass(frozen=True)
class TargetRecord(Configuration):
    """One configuration's denoising loop compiled for a target (the JSON record of `bench
    analyze --target`): memory per chip (`targets.peak_memory_bytes`) and the chip's HBM;
    the body of the loop read (`loop`: its step kind) as `overlap.loop_overlap` models it:
    its FLOPs per device, its collectives' bytes received per device and the share of
    them hidden, compute and exposed exchange time per step and their sum; the projected
    speed-up over the same target's one-device row (None without one). A program that does
    not fit the chip has `loop` "does not fit", the memory the compiler said it needs (None
    where it did not say) and None for the rest. `xla_options`: the XLA options given
    beside jaxfusion's own (`--xla-option`)."""

    target: str
    loop: str
    memory_bytes_per_chip: int | None
    hbm_bytes: int
    step_flops_per_device: int | None = None
    received_bytes_per_step: int | None = None
    hidden_share: float | None = None
    compute_s: float | None = None
    exposed_s: float | None = None
    step_s: float | None = None
    speedup: float | None = None
    collectives: list[dict] = dataclasses.field(default_factory=list)
    xla_options: dict = dataclasses.field(default_factory=dict)


def write_records(path: str | None, records: list) -> None:
    """The records so far as a JSON list at `path` (atomically; nothing without a path),
    written after each configuration so that a long run stopped midway keeps what it
    measured."""
    if path:
        text = json.dumps([dataclasses.asdict(r) for r in records], indent=2) + "\n"
        write_text_atomically(Path(path), text)


def run_on_target(
    options: AnalyzeOptions, rows: list, config: DenoiserConfig | Family, downscale: int, display
) -> list[TargetRecord]:
    """`bench analyze --target`: `target_loop` of every row, a table, the JSON records and
    the schedule pictures `options` asks for."""
    target = targets.target(options.target)
    records = []
    for height, width, parallel in rows:
        name = f"{options.model} {height}x{width}, {parallel.devices} {target.chip}"
        identity = dict(
            **Configuration.fields(options.model, height, width, parallel, options.dtype),
            target=target.name,
            xla_options=dict(options.xla_options),
        )
        try:
            with display(f"{name}, {parallel.mode}: compiling with the {target.platform} compiler"):
                analysis = target_loop(
                    config,
                    height,
                    width,
                    parallel,
                    options.dtype,
                    target,
                    options.attention,
                    downscale=downscale,
                    xla_options=dict(options.xla_options),
                )
        except targets.ProgramTooLarge as error:
            display.note(f"  {name}: {error}")
            records.append(
                TargetRecord(
                    **identity,
                    loop="does not fit",
                    memory_bytes_per_chip=error.needed_bytes,
                    hbm_bytes=error.hbm_bytes,
                )
            )
            write_records(options.json, records)
            continue
        o = analysis.overlap
        single = next(
            (r for r in records if r.devices == 1 and (r.height, r.width) == (height, width)),
            None,
        )
        records.append(
            TargetRecord(
                **identity,
                loop=analysis.loop,
                memory_bytes_per_chip=analysis.memory_bytes_per_chip,
                hbm_bytes=analysis.hbm_bytes,
                step_flops_per_device=o.step_flops,
                received_bytes_per_step=o.received_bytes,
                hidden_share=o.hidden_share,
                compute_s=o.compute_s,
                exposed_s=o.exposed_s,
                step_s=o.step_s,
                speedup=None
                if single is None or single.step_s is None
                else single.step_s / o.step_s,
                collectives=[dataclasses.asdict(c) for c in o.collectives],
            )
        )
        write_records(options.json, records)
        if options.schedule is not None:
            folder = Path(options.schedule)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{Path(options.model).name}-{target.name}-{height}x{width}"
            plot_schedule(
                analysis.schedule,
                analysis.body,
                path.with_name(
                    f"{path.name}-{parallel.devices}-c{parallel.cfg}-{parallel.mode}.png"
                ),
                f"{name}, {parallel.mode} (C={parallel.cfg}): one {analysis.loop} step",
            )
    print_target_table(records, target, display)
    if options.json:
        display.note(f"wrote {options.json}")
    return records


def print_target_table(records: list[TargetRecord], target: Target, display) -> None:
    from rich.table import Table

    table = Table(
        title=f"the denoising loop compiled for {target.name} ({target.chip}) by its own "
        "compiler, per chip; times are a model (jaxfusion.bench.overlap), not measurements",
        caption=f"hidden: share of the step's collective bytes with >= "
        f"{overlap.MIN_WINDOW:.0%} of the step's compute scheduled during them, enough for "
        f"their transfer at {target.link_gbs:g} GB/s; compute at {target.peak_tflops:g} "
        "TFLOP/s peak",
    )
    for column in ("size", "devices", "step", "memory GiB", "HBM GiB", "TFLOP", "exchange MB",
                   "hidden", "compute ms", "exposed ms", "step ms", "speed-up"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            f"{r.height}x{r.width}",
            f"{r.devices} (C={r.cfg})",
            r.loop,
            _scaled(r.memory_bytes_per_chip, 2**-30, ".2f"),
            f"{r.hbm_bytes / 2**30:.2f}",
            _scaled(r.step_flops_per_device, 1e-12, ".2f"),
            _scaled(r.received_bytes_per_step, 1e-6, ",.1f"),
            _scaled(r.hidden_share, 1, ".0%"),
            _scaled(r.compute_s, 1e3, ".1f"),
            _scaled(r.exposed_s, 1e3, ".1f"),
            _scaled(r.step_s, 1e3, ".1f"),
            "—" if r.speedup is None else f"{r.speedup:.2f}x",
        )
    display.console.print(table)


def _scaled(value: float | None, scale: float, spec: str) -> str:
    """`value * scale` formatted, or an em dash for None."""
    return "—" if value is None else format(value * scale, spec)


# The columns of `bench analyze`'s table and what each means (the table's legend).
TABLE_LEGEND = {
    "step GFLOPs": "one denoising step's FLOPs per device (xla attention)",
    "÷ single": "that over the one-device step's",
    "padding": "the share of the latent rows each device computes that are padding (a "
    "height that does not split into equal slabs)",
    "step recv MB": "bytes one device receives per step (traced program, in its dtype)",
    "ref. recv MB": "the same under the reference PyTorch scheme",
    "run MB": "memory of the whole generation per device (text encoders, every step, VAE "
    "decode): what a device needs",
    "run, T5 freed MB": "the same with T5's weights freed once the prompt is encoded (FLUX.1; "
    "its run MB holds every network for the whole run, as its pipeline keeps them)",
    "weights MB": "all networks' weights, part of run MB",
    "stale MB": "the buffers displaced steps keep from the step before, part of run MB",
    "step alone MB": "one step compiled as a program of its own (denoiser weights, stale buffers "
    "in and out, temporaries); not part of run MB, and it can exceed it",
}


def print_table(records: list[StepAnalysis], display) -> None:
    from rich.table import Table

    batches = " or ".join(f"{b}" for b in sorted({r.batch for r in records}))
    table = Table(
        title=f"per device, denoiser batch {batches} (2: CFG): the CPU compiler's estimates"
    )
    for column in ("model", "size", "devices", "mode", *TABLE_LEGEND):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            r.model,
            f"{r.height}x{r.width}",
            f"{r.devices} (D={r.data}, C={r.cfg})" if r.data > 1 else f"{r.devices} (C={r.cfg})",
            r.mode if r.compress == "none" else f"{r.mode} {r.compress}",
            f"{r.flops_per_device_step / 1e9:,.1f}",
            f"{r.flops_per_device_step / r.flops_single_step:.3f}",
            f"{r.padding:.1%}",
            f"{r.comm_bytes_per_device_step / 1e6:,.1f}",
            f"{r.comm_bytes_reference_per_device_step / 1e6:,.1f}",
            _scaled(r.memory_bytes_generation_per_device, 1e-6, ",.0f"),
            _scaled(r.memory_bytes_generation_t5_freed_per_device, 1e-6, ",.0f"),
            _scaled(r.weights_bytes_per_device, 1e-6, ",.0f"),
            f"{r.stale_bytes_per_device / 1e6:,.1f}",
            f"{r.memory_bytes_per_device / 1e6:,.0f}",
        )
    display.console.print(table)
    display.note(
        "Compiled for simulated CPU devices: estimates, not measurements. Columns:\n"
        + "\n".join(f"  {name}: {meaning}" for name, meaning in TABLE_LEGEND.items())
    )


def plot_records(records: list[StepAnalysis], path: Path) -> None:
    """FLOPs and traffic per device against devices, one line per resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (flops, traffic) = plt.subplots(1, 2, figsize=(10, 4))
    for height in sorted({r.height for r in records}):
        rows = sorted((r for r in records if r.height == height), key=lambda r: r.devices)
        devices = [r.devices for r in rows]
        flops.plot(devices, [r.flops_per_device_step / 1e12 for r in rows], "o-", label=f"{height}")
        traffic.plot(devices, [r.comm_bytes_per_device_step / 1e6 for r in rows], "o-",
                     label=f"{height} jaxfusion")  # fmt: skip
        traffic.plot(devices, [r.comm_bytes_reference_per_device_step / 1e6 for r in rows],
                     "x--", label=f"{height} reference scheme")  # fmt: skip
    flops.set(xlabel="devices", ylabel="TFLOPs per device per step", xscale="log", yscale="log")
    traffic.set(xlabel="devices", ylabel="MB received per device per step", xscale="log")
    for axes in (flops, traffic):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(f"{records[0].model}, one denoising step, {records[0].dtype}")
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)

"""Training of the built-in model with optax, on the project's own modules: first the VAE as
an autoencoder, then the UNet and both text encoders with the diffusion loss (epsilon
prediction), on the shapes of `jaxfusion.train.shapes`. Deterministic given the seed.

Each phase is one compiled training step (`jax.jit`, buffers donated) called in a Python
loop, so the progress bar and the loss curve see every step.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich import progress as rich_progress

from jaxfusion import schedulers
from jaxfusion.display import StageDisplay
from jaxfusion.files import staging_folder, write_atomically, write_text_atomically
from jaxfusion.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from jaxfusion.pipelines import SDXLPipeline, model_path
from jaxfusion.pipelines.stable_diffusion import Models
from jaxfusion.tokenizer import load_tokenizer, tokenize, write_tokenizer
from jaxfusion.train import shapes
from jaxfusion.train.config import SNAPSHOT_EVERY, TEXT_ENCODER_WIDTH, TrainConfig, TrainOptions
from jaxfusion.train.noise import pyramid_noise

TEXT_ENCODER = dict(  # and TrainConfig's text_encoder_layers and text_encoder_heads
    hidden_size=TEXT_ENCODER_WIDTH,
    intermediate_size=64,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TEXT_ENCODER_2 = dict(TEXT_ENCODER, hidden_act="gelu", projection_dim=32, pad_token_id=2)
UNET = dict(
    sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 4),
    cross_attention_dim=64,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    norm_num_groups=4,  # 4+ channels a group: one-channel groups on flat images learn slowly
    sample_size=64,
)
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
SIZE_CONDITIONING = (64, 128, 256)  # time_ids sizes seen in training, so any of them works


@dataclasses.dataclass
class History:
    """The loss of every step of each phase, and the phase's wall time in seconds."""

    vae: list[float] = dataclasses.field(default_factory=list)
    decoder: list[float] = dataclasses.field(default_factory=list)
    unet: list[float] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def initial_pipeline(config: TrainConfig) -> SDXLPipeline:
    """The built-in architecture with PyTorch-style random initial weights drawn from
    `config.seed`, the text encoders' as `initial_text_encoders`."""
    rngs = nnx.Rngs(config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp, "tokenizer"), shapes.WORDS)
        write_tokenizer(Path(tmp, "tokenizer_2"), shapes.WORDS, pad_token="!")
        tokenizers = [load_tokenizer(tmp, "tokenizer"), load_tokenizer(tmp, "tokenizer_2")]
    text_encoders = initial_text_encoders(len(tokenizers[0]), config, rngs)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(UNET), rngs=rngs)
    vae = AutoencoderKL(VAEConfig.from_diffusers(dict(VAE, scaling_factor=1.0)), rngs=rngs)
    index = {"force_zeros_for_empty_prompt": True}
    return SDXLPipeline(Models(unet, vae, text_encoders), tokenizers, SCHEDULER, index)


def initial_text_encoders(
    vocab_size: int, config: TrainConfig, rngs: nnx.Rngs
) -> list[CLIPTextModel | CLIPTextModelWithProjection]:
    """Both text encoders with random weights, of `config.text_encoder_layers` layers and
    `config.text_encoder_heads` heads; with `config.sinusoidal_positions`, their position
    embeddings set to `sinusoids`, so that attention can tell near words from far ones from
    the first step (a phrase's place words should bind to its own shape, not another's)."""
    layers = dict(
        num_hidden_layers=config.text_encoder_layers,
        num_attention_heads=config.text_encoder_heads,
    )
    text_encoders = [
        CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TEXT_ENCODER, **layers), rngs=rngs),
        CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=vocab_size, **TEXT_ENCODER_2, **layers), rngs=rngs
        ),
    ]
    if config.sinusoidal_positions:
        for encoder in text_encoders:
            table = encoder.text_model.embeddings.position_embedding.embedding
            table[...] = sinusoids(*table.shape)
    return text_encoders


def sinusoids(positions: int, dim: int, base: float = 100.0) -> jax.Array:
    """(positions, dim) float32: [sin(p f_i), cos(p f_i)] with f_i = base^(-2i/dim), scaled
    to a root mean square of 1 like the token embeddings (Embed's N(0, 1)). A small base
    suits captions of under 30 words (Transformer's 10,000 is for long texts). Computed in
    float64 and rounded once to float32: the table the built-in model's training
    (`scripts/train_builtin_model.sh`) starts from; `models.embeddings.timestep_features`
    gives it in float32, a few roundings away, which would change every weight trained
    from it."""
    frequencies = base ** (-2 * np.arange(dim // 2) / dim)
    angles = np.arange(positions)[:, None] * frequencies[None]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1) * np.sqrt(2)
    return jnp.asarray(table, jnp.float32)


Progress = Callable[[str, int, list[float]], Iterator[int]]


def no_progress(description: str, total: int, losses: list[float]) -> Iterator[int]:
    return iter(range(total))


Snapshot = Callable[[int, SDXLPipeline, History], None]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of diffusion training: `steps` steps, learning rate warming up to `peak`;
    step i draws a batch of `scales[i % len(scales)]` = (image size, batch size) from the
    scene stream `data_seed`, noised with `pyramid_noise(..., noise_discount)`. Its size
    micro-conditioning (time_ids) is the image's size, or, with `random_size_ids`, a random
    one of SIZE_CONDITIONING (the first phase, whose images all have one size, so that the
    model accepts every size's time_ids). `name` keys its wall time in `History.seconds`."""

    name: str
    description: str
    steps: int
    peak: float
    scales: tuple[tuple[int, int], ...]
    data_seed: int
    random_size_ids: bool
    noise_discount: float


def diffusion_phases(config: TrainConfig) -> tuple[Phase, ...]:
    """The UNet and text encoders at `config.image_size`, then `config.scale_rounds` rounds at
    every size of `config.scales`: each round starts from the previous one's averaged weights
    with a fresh optimizer and learning-rate schedule (a warm restart) on the same scenes."""
    sizes = ", ".join(str(size) for size in sorted({size for size, _ in config.scales}))
    first = Phase(
        "unet",
        "training the UNet and text encoders",
        config.unet_steps,
        config.unet_learning_rate,
        ((config.image_size, config.unet_batch_size),),
        config.seed + 1,
        random_size_ids=True,
        noise_discount=0.0,
    )
    rounds = [
        Phase(
            "unet_scales" + (f"_{r}" if r > 1 else ""),
            f"training them at {sizes}"
            + (f" (round {r} of {config.scale_rounds})" if config.scale_rounds > 1 else ""),
            config.scale_steps,
            config.scale_learning_rate,
            config.scales,
            config.seed + 3,
            random_size_ids=False,
            noise_discount=config.scale_noise_discount,
        )
        for r in range(1, config.scale_rounds + 1)
    ]
    return (first, *rounds)


def train(
    config: TrainConfig,
    progress: Progress = no_progress,
    snapshot: Snapshot | None = None,
    snapshot_every: int = SNAPSHOT_EVERY,
    start: str | Path | None = None,
    new_text_encoders: bool = False,
) -> tuple[SDXLPipeline, History]:
    """Trains the built-in model from scratch, or, from `start` (a pipeline folder of the
    built-in architecture, or "builtin": the shipped model), continues the diffusion phases
    from its weights and keeps its VAE; with `new_text_encoders`, from its UNet and VAE but
    `initial_text_encoders`. With `config.decoder_steps`, the decoder is fine-tuned
    (`decoder_phase`) before the UNet.
    `progress(description, total, losses)` yields each phase's step indices (a progress bar,
    say) and may read its losses as they grow; `snapshot(step, pipeline, history)` receives
    the pipeline with the averaged weights every `snapshot_every` diffusion steps (counted
    over all phases), to use during the call only (training reuses its buffers)."""
    history = History()
    if start is not None:
        pipe = SDXLPipeline.from_pretrained(model_path(start))
        if new_text_encoders:
            encoders = initial_text_encoders(len(pipe.tokenizers[0]), config, nnx.Rngs(config.seed))
            models = Models(pipe.models.unet, pipe.models.vae, encoders)
            pipe = SDXLPipeline(models, pipe.tokenizers, SCHEDULER, pipe.model_index)
    else:
        pipe = initial_pipeline(config)
        vae = pipe.models.vae
        begin = time.perf_counter()
        train_vae(vae, vae_phase(config), config, history.vae, progress)
        history.seconds["vae"] = time.perf_counter() - begin
        vae.config = dataclasses.replace(
            vae.config, scaling_factor=latent_scaling_factor(vae, config)
        )
    models = pipe.models
    if config.decoder_steps:
        begin = time.perf_counter()
        train_vae(models.vae, decoder_phase(config), config, history.decoder, progress)
        history.seconds["decoder"] = time.perf_counter() - begin

    def pipeline_with(weights: nnx.State) -> SDXLPipeline:
        nnx.update(models, weights)
        return SDXLPipeline(models, pipe.tokenizers, SCHEDULER, pipe.model_index)

    def take_snapshot(step: int, weights: nnx.State) -> None:
        if snapshot is not None and step % snapshot_every == 0:
            snapshot(step, pipeline_with(weights), history)

    for phase in diffusion_phases(config):
        if phase.steps == 0:
            continue
        begin = time.perf_counter()
        pipe = pipeline_with(
            train_diffusion(pipe, phase, config, history.unet, progress, take_snapshot)
        )
        history.seconds[phase.name] = time.perf_counter() - begin
    return pipe, history


@dataclasses.dataclass(frozen=True)
class AutoencoderPhase:
    """One phase of VAE training: `steps` steps, learning rate warming up to `peak`; step i
    draws a batch of `scales[i % len(scales)]` = (image size, batch size) from the scene
    stream `data_seed`. With `decoder_only` the encoder is frozen, so its latent space (and
    a UNet trained on it) stays as it was."""

    description: str
    steps: int
    peak: float
    scales: tuple[tuple[int, int], ...]
    data_seed: int
    decoder_only: bool


def vae_phase(config: TrainConfig) -> AutoencoderPhase:
    """The whole VAE at `config.image_size`, from scratch."""
    scale = (config.image_size, config.vae_batch_size)
    return AutoencoderPhase(
        "training the VAE", config.vae_steps, config.vae_learning_rate, (scale,), config.seed, False
    )


def decoder_phase(config: TrainConfig) -> AutoencoderPhase:
    """The decoder alone at every size of `config.decoder_scales`, on its own scenes."""
    return AutoencoderPhase(
        "fine-tuning the VAE's decoder",
        config.decoder_steps,
        config.decoder_learning_rate,
        config.decoder_scales,
        config.seed + 4,
        True,
    )


def train_vae(
    vae: AutoencoderKL,
    phase: AutoencoderPhase,
    config: TrainConfig,
    losses: list[float],
    progress: Progress,
) -> None:
    """The VAE as an autoencoder: mean squared error of the reconstruction from a latent
    sample, plus `kl_weight` x the KL divergence to N(0, 1) (constant when only the decoder
    learns). Updates `vae` in place."""

    def loss_fn(vae: AutoencoderKL, images: jax.Array, key: jax.Array) -> jax.Array:
        posterior = vae.encode(images)
        reconstruction = vae.decode(posterior.sample(key))
        kl = 0.5 * jnp.mean(
            jnp.sum(posterior.mean**2 + posterior.std**2 - 1 - posterior.logvar, axis=(1, 2, 3))
        )
        return jnp.mean((reconstruction - images) ** 2) + config.kl_weight * kl

    decoder = nnx.All(nnx.Param, lambda path, _: path[0] in ("decoder", "post_quant_conv"))
    optimizer = optax.adamw(schedule(phase.peak, phase.steps, config))
    step = training_step(loss_fn, optimizer)
    graphdef, params, rest = nnx.split(vae, decoder if phase.decoder_only else nnx.Param, ...)
    opt_state = optimizer.init(params)
    key = jax.random.key(phase.data_seed)
    for i in progress(phase.description, phase.steps, losses):
        size, batch_size = phase.scales[i % len(phase.scales)]
        images, _ = shapes.batch(phase.data_seed, i, batch_size, size, config.object_counts)
        params, opt_state, loss = step(
            graphdef, params, rest, opt_state, jax.random.fold_in(key, i), images
        )
        losses.append(float(loss))
    nnx.update(vae, params)


def latent_scaling_factor(vae: AutoencoderKL, config: TrainConfig) -> float:
    """1 / the standard deviation of the VAE's latent means over 256 training images, so the
    UNet sees unit-variance latents (how SD's 0.18215 was chosen)."""
    images, _ = shapes.batch(config.seed + 2, 0, 256, config.image_size, config.object_counts)
    return float(1.0 / jnp.std(jax.jit(lambda x: vae.encode(x).mean)(images)))


def train_diffusion(
    pipe: SDXLPipeline,
    phase: Phase,
    config: TrainConfig,
    losses: list[float],
    progress: Progress,
    snapshot: Callable[[int, nnx.State], None],
) -> nnx.State:
    """One phase of the UNet and both text encoders with the epsilon-prediction loss on the
    frozen VAE's latents, from the pipeline's weights; the captions are encoded exactly as
    the pipeline encodes prompts. Returns the exponential moving average of the trained
    weights; `snapshot(diffusion steps done in all phases, average)` sees it after every step.
    """
    alpha_bar = jnp.asarray(
        schedulers.common.alphas_cumprod(schedulers.SchedulerConfig.from_diffusers(SCHEDULER))
    )
    snr = alpha_bar / (1 - alpha_bar)
    weights = jnp.minimum(snr, config.min_snr_gamma) / snr

    def loss_fn(models: Models, batch: dict[str, Any], key: jax.Array) -> jax.Array:
        vae = models.vae
        latents = jax.lax.stop_gradient(vae.scale_latents(vae.encode(batch["images"]).mean))
        conditioning = pipe.encode_prompt(models, batch["token_ids"], batch["time_ids"], None)
        keys = jax.random.split(key, 3)
        b = latents.shape[0]
        keep = jax.random.uniform(keys[0], (b,)) >= config.unconditional_probability
        states = conditioning.encoder_hidden_states * keep[:, None, None]
        pooled = conditioning.text_embeds * keep[:, None]
        t = jax.random.randint(keys[1], (b,), 0, alpha_bar.shape[0])
        noise = pyramid_noise(keys[2], latents.shape, phase.noise_discount)
        a = alpha_bar[t][:, None, None, None]
        noisy = jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise
        prediction = models.unet(noisy, t, states, pooled, batch["time_ids"])
        errors = jnp.mean((prediction - noise) ** 2, axis=(1, 2, 3))
        return jnp.mean(weights[t] * errors)

    is_trainable = nnx.All(nnx.Param, lambda path, _: path[0] in ("unet", "text_encoders"))
    optimizer = optax.adamw(schedule(phase.peak, phase.steps, config))
    step = training_step(loss_fn, optimizer, ema_decay=config.ema_decay)
    graphdef, params, rest = nnx.split(pipe.models, is_trainable, ...)
    opt_state = (optimizer.init(params), jax.tree.map(jnp.copy, params), jnp.float32(0))
    key = jax.random.key(phase.data_seed)
    size_ids = np.random.default_rng([config.seed, 1]).choice(
        SIZE_CONDITIONING, size=(phase.steps, max(b for _, b in phase.scales))
    )
    for i in progress(phase.description, phase.steps, losses):
        image_size, batch_size = phase.scales[i % len(phase.scales)]
        images, captions = shapes.batch(
            phase.data_seed, i, batch_size, image_size, config.object_counts, config.unplaced
        )
        size = (
            size_ids[i, :batch_size, None]
            if phase.random_size_ids
            else np.full((batch_size, 1), image_size)
        )
        crop = np.zeros((batch_size, 1))
        batch = dict(
            images=images,
            token_ids=tuple(tokenize(tokenizer, captions) for tokenizer in pipe.tokenizers),
            time_ids=np.concatenate([size, size, crop, crop, size, size], 1).astype(np.float32),
        )
        params, opt_state, loss = step(
            graphdef, params, rest, opt_state, jax.random.fold_in(key, i), batch
        )
        losses.append(float(loss))
        snapshot(len(losses), opt_state[1])
    return opt_state[1]


def schedule(peak: float, steps: int, config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    warmup = min(config.warmup_steps, steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, 1), peak / 10)


def training_step(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    ema_decay: float | None = None,
) -> Callable:
    """The compiled update `(graphdef, params, rest, opt_state, key, batch) -> (params,
    opt_state, loss)` for `loss_fn(model, batch, key)`, where the model is
    `nnx.merge(graphdef, params, rest)` and only `params` are trained. With `ema_decay`,
    opt_state is (optax state, moving average of params, step count) and the average is
    updated too, with the decay warming up as min(ema_decay, (1 + n) / (10 + n)) so that the
    first, random weights leave it quickly."""

    def step(graphdef, params, rest, opt_state, key, batch):
        def loss_of(params):
            return loss_fn(nnx.merge(graphdef, params, rest), batch, key)

        loss, grads = jax.value_and_grad(loss_of)(params)
        state = opt_state[0] if ema_decay is not None else opt_state
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if ema_decay is None:
            return params, state, loss
        _, average, count = opt_state
        decay = jnp.minimum(ema_decay, (1.0 + count) / (10.0 + count))
        average = optax.incremental_update(params, average, 1 - decay)
        return params, (state, average, count + 1), loss

    return jax.jit(step, static_argnums=0, donate_argnums=(1, 3))


def save_loss_curve(history: History, path: Path) -> None:
    """A PNG of the losses of each phase that ran (VAE, diffusion) against steps (log scale),
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = (
        ("VAE reconstruction", history.vae),
        ("decoder reconstruction", history.decoder),
        ("diffusion (UNet)", history.unet),
    )
    phases = [(name, losses) for name, losses in phases if losses]  # --from: no VAE phase
    figure, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for ax, (name, losses) in zip(axes[0], phases, strict=True):
        ax.plot(losses, linewidth=0.5, alpha=0.4)
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, linewidth=1.5)
        ax.set(title=f"{name} loss", xlabel="step", yscale="log")
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def final_losses(history: History) -> dict[str, float]:
    """Each phase's loss, as the mean of its last 100 steps."""
    phases = (("vae", history.vae), ("decoder", history.decoder), ("unet", history.unet))
    return {name: float(np.mean(losses[-100:])) for name, losses in phases if losses}


def save_record(
    config: TrainConfig,
    history: History,
    path: Path,
    start: str | Path | None = None,
    new_text_encoders: bool = False,
) -> None:
    """`training.json`: the configuration (and the folder training continued from, if any),
    the diffusion steps done so far, the finished phases' wall times and the final losses."""
    record = {
        "config": dataclasses.asdict(config),
        "started_from": None if start is None else str(start),
        "new_text_encoders": new_text_encoders,
        "diffusion_steps": len(history.unet),
        "seconds": history.seconds,
        "final_loss": final_losses(history),
        "jax": jax.__version__,
        "platform": jax.devices()[0].device_kind,
    }
    text = json.dumps(record, indent=2) + "\n"
    write_text_atomically(path, text)


def run(options: TrainOptions, display: StageDisplay) -> None:
    """Trains as `options` say, showing progress on `display`, and writes the folder."""
    out, config = options.out, options.config
    if out.exists() and not options.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    origin = (options.start, options.new_text_encoders)

    def progress_bar(description: str, total: int, losses: list[float]) -> Iterator[int]:
        columns = (
            rich_progress.TextColumn("{task.description}"),
            rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(),
            rich_progress.TextColumn("loss {task.fields[loss]}"),
            rich_progress.TimeElapsedColumn(),
            rich_progress.TimeRemainingColumn(),
        )
        with rich_progress.Progress(*columns, console=display.console) as bar:
            task = bar.add_task(description, total=total, loss="-")
            for i in range(total):
                yield i
                loss = f"{np.mean(losses[-50:]):.4f}"
                bar.update(task, advance=1, loss=loss)
                if not display.console.is_terminal and (i + 1) % max(1, total // 20) == 0:
                    display.note(f"{description}: step {i + 1}/{total}, loss {loss}")

    def save_snapshot(step: int, pipe: SDXLPipeline, history: History) -> None:
        folder = Path(options.snapshots) / f"step-{step}"
        pipe.save_pretrained(folder, overwrite=True)
        save_record(config, history, folder / "training.json", *origin)

    pipe, history = train(
        config,
        progress_bar,
        save_snapshot if options.snapshots else None,
        options.snapshot_every,
        start=options.start,
        new_text_encoders=options.new_text_encoders,
    )
    with display(f"writing {out}"), staging_folder(out, overwrite=options.overwrite) as folder:
        pipe.save_pretrained(folder, overwrite=True)
        save_loss_curve(history, folder / "loss.png")
        save_record(config, history, folder / "training.json", *origin)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in final_losses(history).items())
    display.note(
        f"trained in {sum(history.seconds.values()) / 60:.1f} min; final losses (mean of the "
        f"last 100 steps): {losses}; wrote {out} (with loss.png and training.json)"
    )

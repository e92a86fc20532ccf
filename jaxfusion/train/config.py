"""The settings of a training run (no heavy imports: the command line reads the defaults)."""

import dataclasses
from pathlib import Path

SNAPSHOT_EVERY = 1000  # diffusion steps between snapshots (`jaxfusion train --snapshots`)
TEXT_ENCODER_WIDTH = 32  # the hidden size of the built-in model's text encoders
DECODER_PIXELS = 16 * 64 * 64  # in each decoder fine-tuning step's batch, at every size
DECODER_SIZES = (64, 128, 256)  # the image sizes decoder fine-tuning may take


def scales_of_equal_pixels(sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(image size, batch size) of each of `sizes` for decoder fine-tuning: every step sees
    DECODER_PIXELS pixels (16 images at 64, 4 at 128, 1 at 256)."""
    return tuple((size, DECODER_PIXELS // size**2) for size in sizes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the built-in model is trained: the VAE, then the UNet and text encoders at
    `image_size` on white noise, then `scale_rounds` rounds of both at every size of
    `scales` on pyramid noise. The defaults are the first of the four runs that made the
    shipped model (`scripts/train_builtin_model.sh`); the later three continue it with new
    text encoders and more two-shape scenes."""

    seed: int = 0
    image_size: int = 64
    # Probability that a training scene holds 1, 2, 3 objects; None: the stream of the first
    # run (one object in half the scenes, else two or three alike).
    object_counts: tuple[float, float, float] | None = None
    # Probability that a caption leaves out the places of its objects ("a red circle and a
    # blue square"): the runs that made the model shipped before this one named every place.
    unplaced: float = 0.0
    # New text encoders (from scratch, or `jaxfusion train --new-text-encoders`): layers,
    # heads, and position embeddings that start as `trainer.sinusoids` rather than random.
    text_encoder_layers: int = 2
    text_encoder_heads: int = 2
    sinusoidal_positions: bool = False
    vae_steps: int = 600
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    # Then the decoder alone, on the frozen encoder's latents at each (image size, batch
    # size) of decoder_scales in turn: sharper shapes from the same latent space.
    decoder_steps: int = 0
    decoder_scales: tuple[tuple[int, int], ...] = scales_of_equal_pixels(DECODER_SIZES)
    decoder_learning_rate: float = 5e-4
    unet_steps: int = 5000
    unet_batch_size: int = 32
    unet_learning_rate: float = 1e-3
    # The multi-scale rounds: step i trains on scales[i % len(scales)] = (image size, batch
    # size), half the steps at 256, on pyramid noise of `scale_noise_discount`
    # (jaxfusion/train/noise.py: on white noise a model at 256 reads the layout from the
    # initial noise, not the prompt). Each round restarts the learning-rate schedule. What
    # the rounds give: docs/builtin-model.md.
    scale_steps: int = 3000
    scale_rounds: int = 4
    scales: tuple[tuple[int, int], ...] = ((256, 4), (128, 8), (256, 4), (64, 32))
    scale_learning_rate: float = 5e-4
    scale_noise_discount: float = 0.7
    warmup_steps: int = 200
    ema_decay: float = 0.999
    unconditional_probability: float = 0.1  # caption dropped: all-zero text conditioning
    min_snr_gamma: float = 5.0  # loss weight min(SNR, gamma) / SNR (arXiv 2303.09556)

    def __post_init__(self) -> None:
        width, heads = TEXT_ENCODER_WIDTH, self.text_encoder_heads
        if self.text_encoder_layers < 1 or width % heads:
            raise ValueError(
                f"the text encoders need at least one layer and a head count that divides their "
                f"width {width}: check --text-encoder-layers and --text-encoder-heads"
            )
        counts = self.object_counts
        if counts is not None and (min(counts) < 0 or abs(sum(counts) - 1) > 1e-6):
            raise ValueError(f"--object-counts {list(counts)} are not probabilities summing to 1")
        if not 0 <= self.unplaced <= 1:
            raise ValueError(f"--unplaced {self.unplaced} is not a probability (0 to 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """`jaxfusion train`: trains `config`, then writes the pipeline folder `out` (diffusers
    layout, safetensors; an existing one is replaced only with `overwrite`) with its loss
    curve `loss.png` and `training.json`. `start`: a trained built-in pipeline folder to
    continue from, keeping its VAE (with `new_text_encoders`, its UNet and VAE, and new text
    encoders); `snapshots`: a folder that also receives the pipeline every `snapshot_every`
    diffusion steps, as `step-N`."""

    out: Path
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    start: str | Path | None = None
    new_text_encoders: bool = False
    overwrite: bool = False
    snapshots: str | Path | None = None
    snapshot_every: int = SNAPSHOT_EVERY

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.new_text_encoders and self.start is None:
            raise ValueError(
                "--new-text-encoders starts from a trained pipeline: add --from FOLDER"
            )

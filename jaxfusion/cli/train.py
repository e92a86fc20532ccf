"""`jaxfusion train`: trains the built-in model (`jaxfusion.train.trainer`) as its
`TrainOptions` say."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jaxfusion.train.config import (
    DECODER_SIZES,
    SNAPSHOT_EVERY,
    TrainConfig,
    TrainOptions,
    scales_of_equal_pixels,
)

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay

TRAIN_DEFAULTS = TrainConfig()


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion train` to `commands`."""
    train = commands.add_parser(
        "train", help="train the built-in model (coloured shapes) on this machine"
    )
    train.add_argument("--out", required=True, help="new pipeline folder (diffusers layout)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, default=TRAIN_DEFAULTS.vae_steps)
    train.add_argument(
        "--decoder-steps",
        type=int,
        default=TRAIN_DEFAULTS.decoder_steps,
        help="steps that fine-tune the VAE's decoder alone (on the frozen encoder's latents at "
        "each of --decoder-sizes in turn: the latent space, so the UNet, stays as it was), "
        "before the UNet steps",
    )
    train.add_argument(
        "--decoder-sizes",
        type=int,
        nargs="+",
        default=[size for size, _ in TRAIN_DEFAULTS.decoder_scales],
        metavar="SIZE",
        help="image sizes of the decoder steps, 64, 128 or 256 (default: 64 128 256; 16 images "
        "a step at 64, 4 at 128, 1 at 256)",
    )
    train.add_argument("--unet-steps", type=int, default=TRAIN_DEFAULTS.unet_steps)
    train.add_argument(
        "--scale-steps",
        type=int,
        default=TRAIN_DEFAULTS.scale_steps,
        help="steps of each round of the multi-scale phase (64, 128 and 256 pixels, pyramid "
        "noise), after the UNet steps",
    )
    train.add_argument(
        "--scale-rounds",
        type=int,
        default=TRAIN_DEFAULTS.scale_rounds,
        help="rounds of the multi-scale phase, each restarting its learning-rate schedule",
    )
    train.add_argument(
        "--from",
        dest="start",
        metavar="FOLDER",
        help="continue from this trained built-in pipeline (builtin: the shipped model): keep "
        "its VAE, run the diffusion phases from its weights (with --unet-steps 0: the "
        "multi-scale phase only)",
    )
    train.add_argument(
        "--new-text-encoders",
        action="store_true",
        help="with --from: keep its UNet and VAE but start both text encoders afresh",
    )
    train.add_argument(
        "--text-encoder-layers",
        type=int,
        metavar="N",
        help=f"layers of new text encoders (default: {TRAIN_DEFAULTS.text_encoder_layers})",
    )
    train.add_argument(
        "--text-encoder-heads",
        type=int,
        metavar="N",
        help=f"attention heads of new text encoders (default: {TRAIN_DEFAULTS.text_encoder_heads})",
    )
    train.add_argument(
        "--sinusoidal-positions",
        action="store_true",
        default=None,
        help="start new text encoders' position embeddings as sinusoids, not random",
    )
    train.add_argument(
        "--object-counts",
        type=float,
        nargs=3,
        metavar=("P1", "P2", "P3"),
        help="probability that a training scene holds 1, 2, 3 objects (default: 1 half the "
        "time, else 2 or 3 alike)",
    )
    train.add_argument(
        "--unplaced",
        type=float,
        default=TRAIN_DEFAULTS.unplaced,
        metavar="P",
        help="probability that a caption leaves out its objects' places, as in 'a red circle' "
        f"(default: {TRAIN_DEFAULTS.unplaced})",
    )
    train.add_argument("--overwrite", action="store_true", help="replace the output folder")
    train.add_argument(
        "--snapshots", help="also write the pipeline every N diffusion steps to DIR/step-N"
    )
    train.add_argument(
        "--snapshot-every",
        type=int,
        default=SNAPSHOT_EVERY,
        metavar="N",
        help=f"(default: {SNAPSHOT_EVERY})",
    )
    train.set_defaults(command=run_train)


def run_train(args: argparse.Namespace, display: StageDisplay) -> int:
    options = train_options(args)
    from jaxfusion.train import trainer

    trainer.run(options, display)
    return 0


def train_options(args: argparse.Namespace) -> TrainOptions:
    """The `TrainOptions` of the arguments; ValueError names a flag that is out of range or
    does not apply."""
    encoder = dict(
        text_encoder_layers=args.text_encoder_layers,
        text_encoder_heads=args.text_encoder_heads,
        sinusoidal_positions=args.sinusoidal_positions,
    )
    encoder = {name: value for name, value in encoder.items() if value is not None}
    if encoder and args.start and not args.new_text_encoders:
        raise ValueError(
            "--text-encoder-layers, --text-encoder-heads and --sinusoidal-positions shape new "
            "text encoders; --from keeps its own: add --new-text-encoders"
        )
    if not set(args.decoder_sizes) <= set(DECODER_SIZES):
        raise ValueError(
            f"--decoder-sizes {args.decoder_sizes}: each must be one of {DECODER_SIZES}"
        )
    config = TrainConfig(
        seed=args.seed,
        vae_steps=args.vae_steps,
        decoder_steps=args.decoder_steps,
        decoder_scales=scales_of_equal_pixels(tuple(args.decoder_sizes)),
        unet_steps=args.unet_steps,
        scale_steps=args.scale_steps,
        scale_rounds=args.scale_rounds,
        object_counts=None if args.object_counts is None else tuple(args.object_counts),
        unplaced=args.unplaced,
        **encoder,
    )
    return TrainOptions(
        out=args.out,
        config=config,
        start=args.start,
        new_text_encoders=args.new_text_encoders,
        overwrite=args.overwrite,
        snapshots=args.snapshots,
        snapshot_every=args.snapshot_every,
    )

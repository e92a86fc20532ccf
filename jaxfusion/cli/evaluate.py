"""`jaxfusion eval`: PSNR and SSIM of displaced (each GroupNorm rule, each codec) and naive
against single, on a list of prompts and seeds."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jaxfusion.bench.options import EvalOptions
from jaxfusion.cli.options import (
    WARMUP_HELP,
    add_codec_options,
    add_measurement_options,
    filling,
    load,
    prompts_file,
    request_options,
)
from jaxfusion.cli.running import add_distributed_options
from sharding.names import GROUP_NORM_RULES, NAIVE_SPLITS

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion eval` to `commands`."""
    evaluate = commands.add_parser(
        "eval", help="PSNR/SSIM of displaced (each GroupNorm rule) and naive against single"
    )
    add_measurement_options(evaluate, EvalOptions.steps)
    evaluate.add_argument(
        "--prompts", help="a text file, one prompt per line (default: a built-in list)"
    )
    evaluate.add_argument("--seeds", type=int, nargs="+", default=list(EvalOptions.seeds))
    evaluate.add_argument(
        "--devices", type=int, default=EvalOptions.devices, help="patch devices (CPU: simulated)"
    )
    evaluate.add_argument(
        "--gn", choices=GROUP_NORM_RULES, nargs="+", default=list(EvalOptions.group_norm)
    )
    evaluate.add_argument(
        "--warmup-steps", type=int, default=EvalOptions.warmup_steps, help=WARMUP_HELP
    )
    evaluate.add_argument("--naive-split", choices=NAIVE_SPLITS, default=EvalOptions.naive_split)
    add_codec_options(
        evaluate, [], "also displaced with each codec, compared with single and with uncompressed"
    )
    evaluate.add_argument("--out", required=True, help="new folder: images, metrics.json, grid")
    add_distributed_options(evaluate)
    evaluate.set_defaults(command=run_eval)


def run_eval(args: argparse.Namespace, display: StageDisplay) -> int:
    from sharding.distributed import agree, is_main_process

    writes = is_main_process()  # the others compute their share of the images only
    options = agree(
        lambda: EvalOptions(
            **request_options(args),
            out=args.out if writes else None,
            model=args.model,
            prompts=prompts_file(args.prompts) if args.prompts else EvalOptions.prompts,
            seeds=args.seeds,
            devices=args.devices,
            group_norm=args.gn,
            warmup_steps=args.warmup_steps,
            naive_split=args.naive_split,
            compress=args.compress,
            kv_refresh=args.kv_refresh,
        )
    )
    from jaxfusion.bench import evaluate

    pipe, _ = load(args, display, check=lambda abstract: evaluate.check(abstract, options))
    with filling(options.out):
        evaluate.run(pipe, options, display)
    return 0

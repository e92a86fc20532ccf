"""The `jaxfusion` command: generate, compare, convert, bench analyze|time, profile, eval.

It parses the arguments and calls the library: `jaxfusion.pipelines` loads, the pipeline
generates, `jaxfusion.bench` measures (with the options of `jaxfusion.bench.options`). The
parser imports no JAX, so that `--help` answers at once: its choices and defaults come from
JAX-free modules, and each command imports what it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxfusion.bench.options import (
    AnalyzeOptions,
    EvalOptions,
    ProfileOptions,
    TimingOptions,
    read_prompts,
)
from jaxfusion.models.names import ATTENTION_BACKENDS
from jaxfusion.schedulers.config import KINDS
from jaxfusion.train.config import SNAPSHOT_EVERY, TrainConfig
from sharding.names import COMPRESSIONS, GROUP_NORM_RULES, MODES, NAIVE_SPLITS

if TYPE_CHECKING:
    from jaxfusion.compilation_cache import CacheHits
    from jaxfusion.display import StageDisplay
    from jaxfusion.interrupts import EndOnSignals
    from jaxfusion.multiprocess import StartUp
    from jaxfusion.pipelines import TextToImagePipeline
    from sharding.parallel import ParallelConfig

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_STEPS = 50
# The rule of sharding.parallel.default_warmup_steps.
WARMUP_HELP = (
    "displaced: steps 0..K run synchronously (default: min(4, max(1, steps // 4)), so 4 from "
    "16 steps, 1 for 4 steps)"
)
TRAIN_DEFAULTS = TrainConfig()
GUIDANCE_HELP = (
    "classifier-free guidance scale, 0 or more: 1 or less turns guidance off, as diffusers "
    "(default as diffusers: 5.0 SDXL, 7.5 SD)"
)


# Libraries' notices that are not about the user's request ("PyTorch was not found", ...).
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def main(argv: Sequence[str] | None = None) -> int:
    from jaxfusion.display import StageDisplay

    display = StageDisplay()
    with end_on_termination(display):
        return run_command(argv, display)


def run_command(argv: Sequence[str] | None, display: StageDisplay) -> int:
    """Parses `argv` and runs its command; its exit status. A multi-process run that fails
    ends at once (`sharding.distributed.exit_now`)."""
    from jaxfusion.display import escape

    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    devices = getattr(args, "devices", 1)
    devices = max(devices) if isinstance(devices, list) else devices
    show_warnings_as_notes(display)
    joined = False  # a multi-process run: this process has started to join it
    try:
        if args.command is run_analyze:  # compiled for simulated CPU devices: no GPU needed
            import jax

            jax.config.update("jax_platforms", "cpu")
            simulate_cpu_devices(devices)
        else:
            start = start_up(args)
            joined = start is not None
            if joined:
                start_processes(start, args, devices)
            elif devices > 1:
                simulate_cpu_devices(devices)
        return args.command(args, display)
    except Exception as error:
        if joined:  # a peer's failure may follow from a stop: end as the stop says, if so
            from jaxfusion.interrupts import end_if_peer_stopped

            end_if_peer_stopped()
        if isinstance(error, (ValueError, TypeError, OSError, ImportError)):
            display.note(f"[red]error:[/red] {escape(str(error))}")
            code = 2
        elif joined:
            import traceback

            traceback.print_exc()
            code = 1
        else:
            raise
    if joined:  # the others may wait for this one in a collective: end now, not at exit
        from sharding.distributed import exit_now

        exit_now(code)
    return code


def end_on_termination(display: StageDisplay | None = None) -> EndOnSignals:
    """From now (until the returned object's `restore`, or the end of its `with` block),
    SIGINT and SIGTERM end the command within moments, whatever runs (XLA compiling or
    running included): the outputs being written are removed, one line says what was
    stopped (on `display`), the exit status is 128 + the signal (`jaxfusion.interrupts`)."""
    from jaxfusion.interrupts import EndOnSignals

    if display is None:
        return EndOnSignals()
    return EndOnSignals(display.final, lambda: display.stage)


def show_warnings_as_notes(display: StageDisplay) -> None:
    """Python warnings about the request (jaxfusion's own) print as one line each; the
    libraries' warnings underneath are silenced."""
    import warnings

    from jaxfusion.display import escape

    def show(message, category, filename, lineno, file=None, line=None):
        display.note(f"[yellow]warning:[/yellow] {escape(str(message))}")

    warnings.showwarning = show
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="jaxfusion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxfusion", description="Stable Diffusion (XL) text-to-image in JAX."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate an image from a prompt")
    add_generation_options(generate)
    generate.add_argument(
        "--out", required=True, help="output .png, or .npy (float32 (H, W, 3) in [0, 1])"
    )
    add_image_options(generate)
    add_distributed_options(generate)
    generate.set_defaults(command=run_generate)

    compare = commands.add_parser(
        "compare", help="run diffusers (PyTorch) and jaxfusion from the same initial latents"
    )
    add_generation_options(compare)
    compare.add_argument("--runs", type=int, default=3, help="timed runs after a warm-up run")
    compare.add_argument(
        "--out", help="a .png with jaxfusion's image, diffusers' and their difference (x10)"
    )
    add_image_options(compare)  # --refiner and --high-noise-frac are refused
    compare.set_defaults(command=run_compare)

    convert = commands.add_parser(
        "convert", help="diffusers pipeline folder -> Flax checkpoint folder, or back"
    )
    convert.add_argument("source", help="pipeline folder (diffusers or Flax) or hub id")
    convert.add_argument("destination", help="new folder to write")
    convert.add_argument(
        "--to-diffusers", action="store_true", help="write safetensors (diffusers) weights"
    )
    convert.add_argument("--dtype", choices=DTYPES, default="float32")
    convert.add_argument("--overwrite", action="store_true", help="replace the destination")
    add_loading_options(convert)
    convert.set_defaults(command=run_convert)

    train = commands.add_parser(
        "train", help="train the built-in model (coloured shapes) on this machine"
    )
    train.add_argument("--out", required=True, help="new pipeline folder (diffusers layout)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, default=TRAIN_DEFAULTS.vae_steps)
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
        help="continue from this trained built-in pipeline: keep its VAE, run the diffusion "
        "phases from its weights (with --unet-steps 0: the multi-scale phase only)",
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

    bench = commands.add_parser("bench", help="measurements").add_subparsers(
        required=True, metavar="BENCHMARK"
    )
    analyze = bench.add_parser(
        "analyze", help="per-device FLOPs, memory and traffic of one step, from shapes alone"
    )
    analyze.add_argument(
        "--model", default=AnalyzeOptions.model, help="sd15, sd21, sdxl, or a model folder"
    )
    analyze.add_argument("--height", type=int, nargs="+", default=list(AnalyzeOptions.heights))
    analyze.add_argument("--width", type=int, help="default: the height")
    analyze.add_argument("--devices", type=int, nargs="+", default=list(AnalyzeOptions.devices))
    analyze.add_argument("--parallel", choices=MODES[1:], default=AnalyzeOptions.mode)
    analyze.add_argument("--gn", choices=GROUP_NORM_RULES, default=AnalyzeOptions.group_norm)
    analyze.add_argument("--cfg-parallel", action="store_true")
    analyze.add_argument(
        "--data-parallel",
        type=int,
        default=AnalyzeOptions.data,
        metavar="D",
        help="D groups of --devices / D devices, one prompt each (figures per group device)",
    )
    analyze.add_argument(
        "--hosts", type=int, default=1, help="also count the bytes that cross between H hosts"
    )
    add_codec_options(analyze, ["none"], COMPRESS_HELP)
    analyze.add_argument(
        "--link-gbs",
        type=float,
        nargs="+",
        default=list(AnalyzeOptions.link_gbs),
        help="link speeds (GB/s) of the projected step time (a model, not a measurement)",
    )
    analyze.add_argument(
        "--device-tflops",
        type=float,
        default=AnalyzeOptions.device_tflops,
        help="the device throughput of the projection's compute time",
    )
    analyze.add_argument("--dtype", choices=DTYPES, default=AnalyzeOptions.dtype)
    add_attention_option(analyze)
    analyze.add_argument("--json", help="write one record per configuration")
    analyze.add_argument("--plot", help="a .png of FLOPs and traffic per device")
    analyze.add_argument(
        "--target",
        help="compile the denoising loop for this accelerator with its own compiler "
        "(v5e-8, v6e-8, v5p-16, v4-16, h100-8, a100-8; pip install 'jaxfusion[targets]') "
        "and report memory per chip and how much of the exchange the schedule hides",
    )
    analyze.add_argument(
        "--schedule", metavar="FOLDER", help="with --target: a .png of each loop's schedule"
    )
    analyze.set_defaults(command=run_analyze)

    timing = bench.add_parser(
        "time", help="median wall time per denoising step and per image, modes x devices"
    )
    add_measurement_options(timing, TimingOptions.steps, TimingOptions.prompt)
    timing.add_argument(
        "--devices", type=int, nargs="+", default=list(TimingOptions.devices), help="1 runs single"
    )
    timing.add_argument(
        "--parallel", choices=MODES[1:], nargs="+", default=list(TimingOptions.modes)
    )
    timing.add_argument(
        "--runs", type=int, default=TimingOptions.runs, help="timed runs after a warm-up run"
    )
    add_codec_options(timing, ["none"], "displaced mode once per codec: " + COMPRESS_HELP)
    timing.add_argument(
        "--torch", action="store_true", help="also time diffusers (PyTorch) on the same config"
    )
    timing.add_argument("--json", help="write one record per configuration")
    add_distributed_options(timing)
    timing.set_defaults(command=run_time)

    profile = commands.add_parser(
        "profile",
        help="a jax.profiler trace of a few steps, the optimized HLO, a collectives summary",
    )
    add_measurement_options(profile, ProfileOptions.steps, ProfileOptions.prompt)
    add_parallel_options(profile)
    profile.add_argument("--out", required=True, help="new folder for the trace and reports")
    add_distributed_options(profile)
    profile.set_defaults(command=run_profile)

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
    return parser


def add_codec_options(parser: argparse.ArgumentParser, default: list[str], help: str) -> None:
    """--compress NAME [NAME ...] and --kv-refresh K of the measurements (one K for all)."""
    parser.add_argument(
        "--compress", choices=COMPRESSIONS, nargs="+", default=default, metavar="CODEC", help=help
    )
    parser.add_argument("--kv-refresh", type=int, default=1, metavar="K", help=KV_REFRESH_HELP)


def add_attention_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="attention kernel: auto (xla for short sequences, else cudnn on NVIDIA GPUs in "
        "bfloat16/float16, else chunked), xla, chunked (exact, memory-bounded), cudnn",
    )


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help='weight-file variant, e.g. "fp16"')
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_option,
        metavar="PATH[:SCALE]",
        help="fuse a LoRA (safetensors file, folder or hub id; diffusers/PEFT or kohya "
        "format) into the weights, times SCALE (default 1); repeatable",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (.bin, .ckpt); they run code when loaded",
    )


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="diffusers pipeline folder or hub id (default: the built-in model)"
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt", action="append", help="a prompt; several for a batch (one image each)"
    )
    prompts.add_argument("--prompts", help="a text file of prompts, one per line")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=guidance_option, help=GUIDANCE_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=KINDS, help="default: the model folder's own")
    parser.add_argument(
        "--latents", help="initial noise .npy, NCHW (batch, channels, height/f, width/f)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    add_attention_option(parser)
    add_loading_options(parser)
    add_parallel_options(parser)


def add_image_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image-to-image and the SDXL refiner")
    group.add_argument(
        "--image", help="start from this image (resized to --height and --width if both given)"
    )
    group.add_argument(
        "--strength",
        type=strength_option,
        help="with --image: how much to change it, in (0, 1] (default as diffusers: 0.8 SD, "
        "0.3 SDXL)",
    )
    group.add_argument(
        "--refiner", help="an SDXL refiner folder or hub id: it denoises the last steps"
    )
    group.add_argument(
        "--high-noise-frac",
        type=float,
        help="with --refiner: the fraction of the steps the base denoises (default 0.8)",
    )


def add_measurement_options(
    parser: argparse.ArgumentParser, steps: int, prompt: str | None = None
) -> None:
    """The model and request of `bench time`, `profile` and `eval`: the --steps default, and
    the --prompt default (None: no --prompt, as eval takes --prompts)."""
    parser.add_argument(
        "--model", help="diffusers pipeline folder or hub id (default: the built-in model)"
    )
    if prompt is not None:
        parser.add_argument("--prompt", default=prompt)
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=guidance_option, help=GUIDANCE_HELP)
    parser.add_argument("--scheduler", choices=KINDS, help="default: the folder's own")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    add_attention_option(parser)
    add_loading_options(parser)


COMPRESS_HELP = "the codec of what displaced steps exchange and keep (K/V and conv halos)"
KV_REFRESH_HELP = "displaced steps exchange self-attention K/V only every K-th step"


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("patch parallelism")
    group.add_argument(
        "--devices", type=int, default=1, help="devices for one image (CPU: simulated)"
    )
    group.add_argument(
        "--parallel", choices=MODES, help="default: displaced with several devices, else single"
    )
    group.add_argument("--warmup-steps", type=int, default=None, help=WARMUP_HELP)
    group.add_argument(
        "--gn", choices=GROUP_NORM_RULES, default="corrected", help="GroupNorm in displaced steps"
    )
    group.add_argument(
        "--cfg-parallel",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="put the two guidance halves on different devices (C = 2)",
    )
    group.add_argument("--naive-split", choices=NAIVE_SPLITS, default="row")
    group.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="D",
        help="split the prompts over D device groups, --devices / D devices each",
    )
    group.add_argument("--compress", choices=COMPRESSIONS, default="none", help=COMPRESS_HELP)
    group.add_argument("--kv-refresh", type=int, default=1, metavar="K", help=KV_REFRESH_HELP)


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (hosts); --devices counts all")
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address; 'auto': JAX's detection (SLURM, Open MPI, TPU pods)",
    )
    group.add_argument("--num-processes", type=int, metavar="K")
    group.add_argument("--process-id", type=int, metavar="I")
    group.add_argument(
        "--distributed-timeout",
        type=int,
        default=300,
        metavar="S",
        help="seconds to wait for every process at start-up, and for a silent one later",
    )


def start_up(args: argparse.Namespace) -> StartUp | None:
    """The multi-process start-up the distributed options ask for, checked (None: they do
    not ask for one)."""
    if getattr(args, "coordinator", None) is None and getattr(args, "num_processes", None) is None:
        return None
    from jaxfusion.multiprocess import StartUp

    auto = args.coordinator == "auto"
    start = StartUp(
        None if auto else args.coordinator,
        args.num_processes,
        args.process_id,
        args.distributed_timeout,
    )
    start.check()
    return start


# Options that may differ between the processes of a run: which process it is, the paths
# of its files (each host has its own), how long it waits.
PER_PROCESS_OPTIONS = {
    "command", "coordinator", "process_id", "distributed_timeout",
    "out", "json", "model", "prompts", "image", "latents", "lora", "refiner",
}  # fmt: skip


def start_processes(start: StartUp, args: argparse.Namespace, devices: int) -> None:
    """Joins the multi-process run `start` describes, explaining a start-up that fails;
    then every process checks that the others run the same command, options and
    versions, and a signal to any of them ends all (`jaxfusion.interrupts`)."""
    import jax
    import jaxlib
    from jax._src import distributed  # the client of JAX's coordination service

    import jaxfusion
    from jaxfusion import interrupts, multiprocess
    from sharding.distributed import initialize

    # Its SIGTERM handler (a preemption notice for `reached_preemption_sync_point`, which
    # jaxfusion does not use) would take SIGTERM from `jaxfusion.interrupts`.
    jax.config.update("jax_enable_preemption_service", False)
    with multiprocess.explained(start):
        initialize(
            start.coordinator,
            start.num_processes,
            start.process_id,
            devices=devices,
            timeout_s=start.timeout_s,
        )
    client, index, count = distributed.global_state.client, jax.process_index(), jax.process_count()
    interrupts.watch_peers(client, index, count)
    arguments = {
        "the command": args.command.__name__.removeprefix("run_"),
        **{
            f"--{name.replace('_', '-')}": str(value)
            for name, value in sorted(vars(args).items())
            if name not in PER_PROCESS_OPTIONS
        },
        "jaxfusion": jaxfusion.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
    multiprocess.check_same_arguments(client, index, count, arguments, start.timeout_s)


def lora_option(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (PATH, SCALE); a ':' of an existing path is part of it."""
    path, colon, scale = text.rpartition(":")
    if not colon or Path(text).exists():
        return text, 1.0
    value = float_option(
        scale,
        f"{text!r}: no such file or folder, and {scale!r} after its last ':' is not a "
        f"number: use PATH or PATH:SCALE, e.g. {path}:0.8",
    )
    return path, value


def guidance_option(text: str) -> float:
    """--guidance: 0 or more."""
    value = float_option(text, f"{text!r} is not a number")
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text} is negative: use 0 to 1 to turn classifier-free guidance off (as "
            "diffusers runs any value up to 1), or above 1 to guide (default 5.0 SDXL, 7.5 SD)"
        )
    return value


def strength_option(text: str) -> float:
    """--strength: in (0, 1]."""
    value = float_option(text, f"{text!r} is not a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text} is not in (0, 1]: the fraction of the steps that change the image "
            "(0.3: a light touch, 1: all of them, as from noise)"
        )
    return value


def float_option(text: str, refusal: str) -> float:
    """A finite number, or argparse's refusal of the option (`refusal`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(refusal) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: use a finite number")
    return value


def prompts_file(path: str) -> list[str]:
    """The prompts of --prompts FILE (`read_prompts`), a file that cannot be read refused
    in the option's words."""
    try:
        return read_prompts(path)
    except OSError as error:
        raise OSError(
            f"--prompts {path}: {error.strerror or error}: name a text file, one prompt a line"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not a UTF-8 text file, one prompt a line") from None


def load_loras(pipe: TextToImagePipeline, loras: Sequence[tuple[str, float]]) -> None:
    for path, scale in loras:
        pipe.load_lora(path, scale)


def simulate_cpu_devices(count: int) -> None:
    """Lets JAX's CPU backend offer `count` devices (it must run before JAX starts its
    backends); accelerators are unaffected. Skipped when XLA_FLAGS already sets a count."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        jax.config.update("jax_num_cpu_devices", count)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The `ParallelConfig` of the patch-parallelism options."""
    from sharding.parallel import ParallelConfig

    if args.cfg_parallel and args.guidance is not None and args.guidance <= 1:
        raise ValueError(
            f"--cfg-parallel puts the two halves of classifier-free guidance on different "
            f"devices, but guidance is off (--guidance {args.guidance:g} is 1 or less): pass "
            "--no-cfg-parallel (or leave --cfg-parallel out), or a guidance above 1"
        )
    return ParallelConfig(
        devices=args.devices,
        cfg=2 if args.cfg_parallel else 1,
        mode=args.parallel,
        warmup_steps=args.warmup_steps,
        group_norm=args.gn,
        naive_split=args.naive_split,
        data=getattr(args, "data_parallel", 1),
        compress=args.compress,
        kv_refresh=args.kv_refresh,
    )


def run_generate(args: argparse.Namespace, display: StageDisplay) -> int:
    from jaxfusion.display import escape
    from jaxfusion.images import check_output_path, save_image
    from sharding.distributed import agree, is_main_process

    # Only process 0 writes; every process reads its inputs, and all end if one cannot.
    writes = is_main_process()

    def inputs():
        out = check_output_path(args.out) if writes else Path(args.out)
        return out, dict(generation_kwargs(args), **image_kwargs(args))

    out, kwargs = agree(inputs)
    if args.refiner is None:
        if args.high_noise_frac is not None:
            raise ValueError("--high-noise-frac is for the hand-off to --refiner: pass --refiner")
        pipe, cache_hits = load(args, display, check=lambda abstract: abstract.prepare(**kwargs))
        images = generate(pipe, kwargs, cache_hits, display)
    else:
        from jaxfusion.pipelines import ensemble, load_pipeline

        ensemble.check_refiner_folder(args.refiner)
        frac = ensemble.HIGH_NOISE_FRAC if args.high_noise_frac is None else args.high_noise_frac
        base_call, refiner_call = ensemble.split_call(kwargs, frac)
        refiner = load_pipeline(args.refiner, abstract=True, **loading_options(args))
        base, cache_hits = load(
            args,
            display,
            check=lambda abstract: ensemble.check_hand_off(
                abstract, refiner, base_call, refiner_call
            ),
        )
        latents = generate(base, base_call, cache_hits, display)
        refiner = load_pipeline(args.refiner, stage=display, **loading_options(args))
        images = generate(refiner, dict(refiner_call, image_latents=latents), cache_hits, display)
    if not writes:
        return 0
    paths = output_paths(out, len(images))
    for image, path in zip(images, paths, strict=True):
        save_image(image, path)
    display.note(escape(f"wrote {', '.join(map(str, paths))}"))
    return 0


def generate(
    pipe: TextToImagePipeline, kwargs: dict[str, Any], cache_hits: CacheHits, display: StageDisplay
) -> Any:
    """`pipe(**kwargs)`, saying how it runs over devices and whether its program came from
    the disk cache."""
    request, options = pipe.prepare(**kwargs)
    display.note(describe_parallel(options.parallel, len(request.schedule.timesteps)))
    hits = cache_hits.count

    def compiling(name: str) -> AbstractContextManager:
        def outcome() -> str | None:
            if cache_hits.count > hits:
                return "traced; the compiled program came from the disk cache"
            return None

        return display(name, outcome)

    pipe.compile(request, options, compiling)
    return pipe.run(request, options, display)


def describe_parallel(parallel: ParallelConfig, steps: int) -> str:
    """How a run of `steps` steps uses the devices, in a line: "displaced on 4 devices, steps
    0-4 synchronous", "single device", ..."""
    if parallel.mode == "single":
        return "single device"
    layout = [f"{parallel.data} prompt groups"] if parallel.data > 1 else []
    layout += ["2 guidance halves"] if parallel.cfg > 1 else []
    if layout:
        layout.append(f"{parallel.patches} patches")
    line = f"{parallel.mode} on {parallel.devices} devices"
    line += f" ({' x '.join(layout)})" if layout else ""
    if parallel.mode == "naive":
        return f"{line}, {parallel.naive_split} slabs"
    if parallel.mode == "sync":
        return line
    warm = dict(parallel.schedule(steps))["warm-up"]
    synchronous = f"step {warm[0]}" if len(warm) == 1 else f"steps {warm[0]}-{warm[-1]}"
    line += f", {synchronous} synchronous"
    if parallel.compress != "none":
        line += f", exchange compressed {parallel.compress}"
    if parallel.kv_refresh > 1:
        line += f", K/V every {parallel.kv_refresh} steps"
    return line


def run_compare(args: argparse.Namespace, display: StageDisplay) -> int:
    import numpy as np

    from jaxfusion import diffusers_backend
    from jaxfusion.display import escape
    from jaxfusion.images import check_output_path, psnr, save_image, side_by_side

    out = check_output_path(args.out) if args.out else None
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    diffusers_backend.check_installed()
    for option, value in (("--refiner", args.refiner), ("--high-noise-frac", args.high_noise_frac)):
        if value is not None:
            raise ValueError(
                f"compare runs one pipeline, not the base -> refiner hand-off: leave out "
                f"{option} (to compare the refiner alone, pass it as --model with --image)"
            )
    kwargs = dict(generation_kwargs(args), **image_kwargs(args))
    pipe, cache_hits = load(args, display, check=lambda abstract: abstract.prepare(**kwargs))
    image = kwargs.get("image")
    height, width = pipe.size(args.height, args.width) if image is None else image.shape[:2]
    if kwargs["latents"] is None:
        kwargs["latents"] = pipe.initial_latents(len(kwargs["prompt"]), height, width, args.seed)
    with display("loading the diffusers (PyTorch) pipeline"):
        torch_pipe = diffusers_backend.load_diffusers_pipeline(
            model_path(args),
            dtype=args.dtype,
            scheduler=args.scheduler,
            image_to_image=image is not None,
            loras=args.lora,
        )
    if image is not None:  # one starting image for every prompt, as jaxfusion takes it
        image = np.repeat(image[None], len(kwargs["prompt"]), axis=0)
    torch_kwargs = dict(
        prompt=kwargs["prompt"],
        negative_prompt=kwargs["negative_prompt"],
        height=height,
        width=width,
        image=image,
        strength=pipe.default_strength if kwargs["strength"] is None else kwargs["strength"],
        num_inference_steps=args.steps,
        guidance_scale=pipe.default_guidance_scale if args.guidance is None else args.guidance,
        latents=kwargs["latents"],
        # Ours, the noise euler_a and lcm add at each step (trailing spacing may add a step).
        step_noise=pipe.step_noises(
            len(kwargs["prompt"]), height, width, args.seed, args.steps + 1
        ),
    )
    with display("jaxfusion: warm-up run"):
        ours = generate(pipe, kwargs, cache_hits, display)
    jax_times = timed_runs(lambda: pipe(**kwargs), args.runs, "jaxfusion", display)
    with display("diffusers: warm-up run"):
        theirs = diffusers_backend.run_diffusers(torch_pipe, **torch_kwargs)
    torch_times = timed_runs(
        lambda: diffusers_backend.run_diffusers(torch_pipe, **torch_kwargs),
        args.runs,
        "diffusers",
        display,
    )
    jax_median, torch_median = statistics.median(jax_times), statistics.median(torch_times)
    display.note(
        f"PSNR {psnr(ours, theirs):.2f} dB, max abs difference "
        f"{float(np.abs(ours - theirs).max()):.3g} (images in [0, 1])\n"
        f"median wall time per call ({len(ours)} image(s), {args.runs} runs after warm-up): "
        f"jaxfusion {jax_median:.3f} s, diffusers {torch_median:.3f} s, "
        f"diffusers / jaxfusion = {torch_median / jax_median:.2f}"
    )
    if out is not None:
        difference = np.clip(np.abs(ours[0] - theirs[0]) * 10, 0, 1)
        save_image(side_by_side([ours[0], theirs[0], difference]), out)
        display.note(escape(f"wrote {out} (jaxfusion | diffusers | difference x10)"))
    return 0


def run_convert(args: argparse.Namespace, display: StageDisplay) -> int:
    from jaxfusion.pipelines import load_pipeline

    destination = Path(args.destination)
    if destination.exists() and not args.overwrite:
        raise FileExistsError(f"{destination} exists: pass --overwrite to replace it")
    loading = dict(dtype=args.dtype, variant=args.variant, allow_pickle=args.allow_pickle)
    # A broken folder or LoRA fails here, before any weight is read.
    load_loras(load_pipeline(args.source, abstract=True, **loading), args.lora)
    pipe = load_pipeline(args.source, stage=display, **loading)
    load_loras(pipe, args.lora)
    kind = "diffusers (safetensors)" if args.to_diffusers else "Flax (orbax)"
    with display(f"writing {kind} folder {args.destination}"):
        pipe.save_pretrained(args.destination, flax=not args.to_diffusers, overwrite=args.overwrite)
    return 0


def run_analyze(args: argparse.Namespace, display: StageDisplay) -> int:
    options = AnalyzeOptions(
        model=args.model,
        heights=args.height,
        width=args.width,
        devices=args.devices,
        mode=args.parallel,
        group_norm=args.gn,
        cfg_parallel=args.cfg_parallel,
        data=args.data_parallel,
        hosts=args.hosts,
        compress=args.compress,
        kv_refresh=args.kv_refresh,
        link_gbs=args.link_gbs,
        device_tflops=args.device_tflops,
        dtype=args.dtype,
        attention=args.attention,
        json=args.json,
        plot=args.plot,
        target=args.target,
        schedule=args.schedule,
    )
    from jaxfusion.bench import analyze

    analyze.run(options, display)
    return 0


def run_train(args: argparse.Namespace, display: StageDisplay) -> int:
    from jaxfusion.train import trainer

    return trainer.run(args, display)


def run_time(args: argparse.Namespace, display: StageDisplay) -> int:
    from sharding.distributed import agree, is_main_process

    writes = is_main_process()  # the others time their share of each call, and write nothing
    options = agree(
        lambda: TimingOptions(
            **request_options(args),
            model=args.model,
            prompt=args.prompt,
            devices=args.devices,
            modes=args.parallel,
            compress=args.compress,
            kv_refresh=args.kv_refresh,
            runs=args.runs,
            torch_model=model_path(args) if args.torch else None,
            json=args.json if writes else None,
        )
    )
    from jaxfusion.bench import timing

    pipe, _ = load(args, display, check=lambda abstract: timing.check(abstract, options))
    timing.run(pipe, options, display)
    return 0


def run_profile(args: argparse.Namespace, display: StageDisplay) -> int:
    from sharding.distributed import agree, is_main_process

    writes = is_main_process()  # the others run the same calls, untraced, and write nothing
    options = agree(
        lambda: ProfileOptions(
            **request_options(args),
            out=args.out if writes else None,
            parallel=parallel_config(args),
            prompt=args.prompt,
        )
    )
    from jaxfusion.bench import profile

    if len(profile.steady_steps(options.parallel, options.steps)) < 2:  # refused before running
        steady = profile.describe_steady_state(None, options.parallel, options.steps)
        raise ValueError(f"--steps {options.steps}: {steady}")
    pipe, _ = load(args, display, check=lambda abstract: profile.check(abstract, options))
    with filling(options.out):
        profile.run(pipe, options, display)
    return 0


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


def filling(out: Path | None) -> AbstractContextManager:
    """The --out folder a command fills file by file (None: this process writes none):
    removed, or emptied if it was there, if the command is stopped."""
    from jaxfusion import files

    return contextlib.nullcontext() if out is None else files.filling(out)


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `jaxfusion.bench.options.Generation` fields of a measurement's arguments."""
    return dict(
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
    )


def model_path(args: argparse.Namespace) -> str | Path:
    """The pipeline folder (or hub id) --model names; without it, the built-in model's."""
    if args.model is not None:
        return args.model
    from jaxfusion import builtin

    return builtin.builtin_model_path()


def load(
    args: argparse.Namespace,
    display: StageDisplay,
    check: Callable[[TextToImagePipeline], object] | None = None,
) -> tuple[TextToImagePipeline, CacheHits]:
    """(the pipeline --model names, the counter of programs served by the disk cache), with
    JAX's persistent compilation cache turned on. `check` runs first on the pipeline with
    shapes for weights (configs, tokenizers and the weight files' names read, nothing
    else), so that a request it refuses is refused before any weight is read."""
    from jaxfusion import builtin
    from jaxfusion.compilation_cache import enable_compilation_cache
    from jaxfusion.pipelines import load_pipeline

    if args.model is None:
        display.note(f"model: {builtin.DESCRIPTION}")
    loading = loading_options(args)
    if check is not None:
        abstract = load_pipeline(model_path(args), abstract=True, **loading)
        load_loras(abstract, args.lora)
        check(abstract)
    cache_hits = enable_compilation_cache()
    pipe = load_pipeline(model_path(args), stage=display, **loading)
    if args.lora:
        with display(f"fusing {len(args.lora)} LoRA(s)"):
            load_loras(pipe, args.lora)
    return pipe, cache_hits


def loading_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `load_pipeline` options of the loading arguments."""
    return dict(
        dtype=args.dtype,
        variant=args.variant,
        allow_pickle=args.allow_pickle,
        attention=args.attention,
    )


def image_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The image-to-image arguments of the pipeline call of `generate` and `compare`: --image
    read (and resized to --height x --width where both are given), --strength."""
    if args.image is None:
        return dict(strength=args.strength)  # the pipeline refuses a strength without image
    from jaxfusion.images import read_image

    size = None if None in (args.height, args.width) else (args.height, args.width)
    return dict(image=read_image(args.image, size), strength=args.strength)


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call of `generate` and `compare`."""
    import numpy as np

    latents = None
    prompts = args.prompt or prompts_file(args.prompts)
    if args.latents is not None:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(
                f"--latents {args.latents} is not a .npy array file (numpy.save): {error}"
            ) from None
        if not isinstance(latents, np.ndarray):
            raise ValueError(f"--latents {args.latents} is an archive: save one array (numpy.save)")
        if latents.ndim != 4:
            raise ValueError(
                f"--latents {args.latents} has shape {latents.shape}; expected NCHW "
                "(batch, channels, height/f, width/f)"
            )
        if len(prompts) == 1:
            prompts = prompts * latents.shape[0]
    return dict(
        prompt=prompts,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        latents=latents,
        scheduler=args.scheduler,
        parallel=parallel_config(args),
    )


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` for one image; `name-0.png`, `name-1.png`, ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def timed_runs(
    run: Callable[[], object], runs: int, name: str, display: StageDisplay
) -> list[float]:
    times = []
    with display(f"{name}: {runs} timed run(s)"):
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    sys.exit(main())

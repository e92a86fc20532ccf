"""`jaxfusion bench analyze` (one step's FLOPs, memory and traffic per device, from shapes)
and `jaxfusion bench time` (wall time per step and per image)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jaxfusion.bench.options import AnalyzeOptions, TimingOptions
from jaxfusion.cli.options import (
    COMPRESS_HELP,
    DTYPES,
    add_attention_option,
    add_codec_options,
    add_measurement_options,
    load,
    model_path,
    request_options,
)
from jaxfusion.cli.running import add_distributed_options
from sharding.names import GROUP_NORM_RULES, MODES

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion bench` (`analyze`, `time`) to `commands`."""
    bench = commands.add_parser("bench", help="measurements").add_subparsers(
        required=True, metavar="BENCHMARK"
    )
    analyze = bench.add_parser(
        "analyze", help="per-device FLOPs, memory and traffic of one step, from shapes alone"
    )
    analyze.add_argument(
        "--model",
        default=AnalyzeOptions.model,
        help="sd15, sd21, sdxl, flux-dev, flux-schnell, or a model folder",
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
    analyze.add_argument(
        "--xla-option",
        metavar="NAME=VALUE",
        type=xla_option,
        action="append",
        default=[],
        help="with --target: compile with this XLA option too (after jaxfusion's own), e.g. "
        "xla_tpu_enable_scheduler_memory_pressure_tracking=false; repeatable",
    )
    analyze.set_defaults(command=run_analyze, cpu_only=True)

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


def xla_option(text: str) -> tuple[str, bool | int | float | str]:
    """NAME=VALUE -> (NAME, VALUE as a bool, int, float or else the text)."""
    name, equals, value = text.partition("=")
    if not (name and equals and value):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


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
        xla_options=tuple(args.xla_option),
    )
    from jaxfusion.bench import analyze

    analyze.run(options, display)
    return 0


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

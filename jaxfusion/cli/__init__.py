"""The `jaxfusion` command: generate, compare, convert, train, bench analyze|time, profile,
eval.

It parses the arguments and calls the library: `jaxfusion.pipelines` loads, the pipeline
generates, `jaxfusion.bench` measures (with the options of `jaxfusion.bench.options`),
`jaxfusion.train` trains (with `jaxfusion.train.config.TrainOptions`). Each command's module
holds its parser beside the function it runs; `options` holds the options several commands
share, `running` what every command runs in (signals, warnings, devices, processes). The
parser imports no JAX, so that `--help` answers at once: its choices and defaults come from
JAX-free modules, and each command imports what it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxfusion.cli import bench, compare, convert, evaluate, generate, profile, train
from jaxfusion.cli.running import end_on_termination, run_command

# In the order `--help` lists them.
COMMANDS = (generate, compare, convert, train, bench, profile, evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxfusion.display import StageDisplay

    display = StageDisplay()
    with end_on_termination(display):
        return run_command(build_parser().parse_args(argv), display)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxfusion", description="Stable Diffusion (XL) text-to-image in JAX."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser

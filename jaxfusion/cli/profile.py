"""`jaxfusion profile`: a jax.profiler trace of a few steps, the optimized HLO and a summary
of the collectives."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jaxfusion.bench.options import ProfileOptions
from jaxfusion.cli.options import (
    add_measurement_options,
    add_parallel_options,
    filling,
    load,
    parallel_config,
    request_options,
)
from jaxfusion.cli.running import add_distributed_options

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion profile` to `commands`."""
    profile = commands.add_parser(
        "profile",
        help="a jax.profiler trace of a few steps, the optimized HLO, a collectives summary",
    )
    add_measurement_options(profile, ProfileOptions.steps, ProfileOptions.prompt)
    add_parallel_options(profile)
    profile.add_argument("--out", required=True, help="new folder for the trace and reports")
    add_distributed_options(profile)
    profile.set_defaults(command=run_profile)


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

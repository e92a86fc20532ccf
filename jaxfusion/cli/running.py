"""What every command runs in: the libraries' notices quieted, Python warnings shown as
notes, SIGINT and SIGTERM ending it at once, and its devices: simulated CPU devices, or the
processes of a multi-process run (its options, `add_distributed_options`), which check that
they all run the same command."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay
    from jaxfusion.interrupts import EndOnSignals
    from jaxfusion.multiprocess import StartUp

# Libraries' notices that are not about the user's request ("PyTorch was not found", ...).
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def run_command(args: argparse.Namespace, display: StageDisplay) -> int:
    """Runs the command `args` (parsed) names; its exit status. A multi-process run that
    fails ends at once (`sharding.distributed.exit_now`)."""
    from jaxfusion.display import escape

    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    devices = getattr(args, "devices", 1)
    devices = max(devices) if isinstance(devices, list) else devices
    show_warnings_as_notes(display)
    joined = False  # a multi-process run: this process has started to join it
    try:
        if getattr(args, "cpu_only", False):  # compiled for simulated CPU devices (no GPU)
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
        from jaxfusion.interrupts import end_last_after_error
        from sharding.distributed import exit_now

        end_last_after_error()
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


def simulate_cpu_devices(count: int) -> None:
    """Lets JAX's CPU backend offer `count` devices (it must run before JAX starts its
    backends); accelerators are unaffected. Skipped when XLA_FLAGS already sets a count."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        jax.config.update("jax_num_cpu_devices", count)


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

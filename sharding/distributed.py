"""Several processes, one mesh: JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program over the global mesh (`ParallelConfig.mesh` orders the
devices by process, then id, so a process's devices are neighbours on the patch axis); each
computes the slabs of its own devices, and collectives cross processes (on CPU, through
gloo). Every process must load the same weights and prepare the same request; `agree` ends
all of them when one fails before the run, and a peer that dies during it (or fails and
leaves by `exit_now`) is noticed by the coordinator's heartbeats, which end the others.
"""

import itertools
import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

import jax
import numpy as np

DEFAULT_TIMEOUT_S = 300
Result = TypeVar("Result")
# The run's timeout (`initialize`), for `wait_for_peers`, and the count of its barriers.
_timeout_s = DEFAULT_TIMEOUT_S
_barriers = itertools.count()


class DistributedError(ConnectionError):
    """A multi-process run cannot start or go on: a process did not join, or failed (an
    OSError, as the command line reports those)."""


class PeerFailed(DistributedError):
    """Another process failed, so this one ends too (its own error is in its output)."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    devices: int | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> None:
    """Joins this process to a multi-process run (before anything else uses JAX).

    coordinator: "HOST:PORT" of process 0's coordinator; num_processes: K; process_id: I in
        0..K-1. All None: JAX's auto-detection (SLURM, Open MPI, TPU pods).
    devices: N, the global devices the run asks for: on CPU each of the K processes
        simulates N / K of them (accelerators are unaffected).
    timeout_s: how long start-up waits for every process to join, and how long a process
        that stopped answering (killed, hung) is waited for before every other one ends.
    """
    given = [coordinator is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ValueError(
            "a multi-process run needs all of --coordinator HOST:PORT, --num-processes K and "
            "--process-id I (or none of them, for SLURM / Open MPI / TPU auto-detection)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1}")
    if timeout_s < 1:
        raise ValueError(f"timeout {timeout_s} s: use 1 or more")
    global _timeout_s
    _timeout_s = timeout_s
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if devices is not None and num_processes is not None:
        if devices % num_processes:
            raise ValueError(
                f"--devices {devices} counts the devices of all {num_processes} processes: use "
                f"a multiple of {num_processes}"
            )
        jax.config.update("jax_num_cpu_devices", devices // num_processes)
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=timeout_s,
        )
    except Exception as error:  # JAX raises XlaRuntimeError or RuntimeError, unwrapped
        raise DistributedError(
            f"process {process_id} could not join the run at {coordinator} within {timeout_s} s "
            f"(all {num_processes} processes must start, with the same --coordinator): {error}"
        ) from error


def wait_for_peers(devices: Iterable[jax.Device], what: str) -> None:
    """Waits until every other process with some of `devices` gets here (at once where
    they are all this process's), for the run's timeout: before a program over them runs,
    so that a process still compiling it (a slower host, or one whose compilation cache
    lacks it) is waited for as long as the timeout says, not the 30 s that a CPU (gloo)
    collective waits for its peers when it first connects them. `what`: what comes next,
    for the error."""
    processes = sorted({device.process_index for device in devices})
    if processes == [jax.process_index()]:
        return
    from jax._src import distributed  # the client JAX's own multi-host utilities use

    barrier = f"jaxfusion-{next(_barriers)}"
    try:
        distributed.global_state.client.wait_at_barrier(barrier, _timeout_s * 1000, processes)
    except Exception as error:  # XlaRuntimeError, DEADLINE_EXCEEDED
        raise DistributedError(
            f"process {jax.process_index()} waited {_timeout_s} s for processes {processes} "
            f"before {what}: one is slower (compiling) or failed; --distributed-timeout S "
            f"waits longer: {error}"
        ) from error


def exit_now(code: int) -> NoReturn:
    """Ends this process of a multi-process run that failed, at once, with exit status
    `code`: not through JAX's exit handler, whose shutdown barrier waits for every process
    (while another may be waiting in a collective for this one: both would hang). The
    others then end through the coordination service: its heartbeats miss this process
    within the timeout (where this is process 0, the service itself is gone)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main_process() -> bool:
    """Whether this process writes outputs and prints summaries (process 0)."""
    return jax.process_index() == 0


def agree(prepare: Callable[[], Result]) -> Result:
    """`prepare()` on every process, which all go on only if it succeeded on all: where it
    raised, that error; elsewhere `PeerFailed` naming the processes that failed. Without
    it a process that fails before the run leaves the others waiting in its collectives."""
    error = None
    try:
        result = prepare()
    except Exception as raised:  # re-raised below, after the others know
        error = raised
    if jax.process_count() > 1:
        flags = process_allgather(np.int32(error is not None))
        failed = [int(i) for i in np.flatnonzero(flags)]
        if failed and error is None:
            raise PeerFailed(
                f"process(es) {failed} failed while preparing the run (their error is in "
                "their output); every process ends"
            )
    if error is not None:
        raise error
    return result


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of `array` as numpy on this process, gathered from every process where
    some of its shards live on other processes' devices."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return process_allgather(array)


def process_allgather(value):
    """`jax.experimental.multihost_utils.process_allgather` (tiled for arrays that span
    processes, stacked per process for process-local values)."""
    from jax.experimental import multihost_utils

    tiled = isinstance(value, jax.Array) and not value.is_fully_addressable
    return np.asarray(multihost_utils.process_allgather(value, tiled=tiled))

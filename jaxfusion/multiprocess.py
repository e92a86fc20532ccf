"""Starting a multi-process run from the command line, so that its start-up explains itself.

JAX aborts a process that cannot join the run with a C++ stack, after about twice the
timeout. Here the options are checked before JAX sees them (the process id is in range,
the coordinator's host name resolves, process 0's port is free); a process that has not
joined once the timeout is well past says in one line why it may be (no coordinator
answers, or not every process joined) and ends before JAX would; and once joined, every
process checks that all were started with the same options and versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import socket
import threading
from collections.abc import Iterator

from jaxfusion import interrupts

NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
ARGUMENTS_KEY = "jaxfusion/arguments/{}"  # process I's options and versions (JSON)
COMPARED_KEY = "jaxfusion/compared/{}"  # process I has read every process's options
REFUSED_KEY = "jaxfusion/refused/{}"  # process I refuses the run and ends
# JAX gives up on joining after about twice the timeout: end, explained, well before that.
OVERDUE = 1.5


@dataclasses.dataclass(frozen=True)
class StartUp:
    """A multi-process run's start-up options: `coordinator` "HOST:PORT" (None: JAX's
    detection, SLURM / Open MPI / TPU pods), `num_processes` K and `process_id` I (None
    with it), `timeout_s` (--distributed-timeout)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of --coordinator, brackets of an IPv6 host removed."""
        host, _, port = self.coordinator.rpartition(":")
        return host.strip("[]"), int(port)

    def check(self) -> None:
        """Refuses, in the options' words, what would make JAX fail or abort: a process id
        out of range, a --coordinator that is not HOST:PORT, a host name that does not
        resolve, and on process 0 a port already in use."""
        k, i = self.num_processes, self.process_id
        if k is not None and k < 1:
            raise ValueError(f"--num-processes {k}: use 1 or more")
        if k is not None and i is not None and not 0 <= i < k:
            raise ValueError(
                f"--process-id {i} is not in 0..{k - 1} (--num-processes {k}): number the "
                f"processes 0 to {k - 1}, process 0 on the coordinator's host"
            )
        if self.coordinator is None:
            return
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"--coordinator {self.coordinator}: use HOST:PORT, process 0's host name or "
                "address and a free port, e.g. node0:12345 (or 'auto' for JAX's detection)"
            )
        host, port = self.address
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ValueError(
                f"--coordinator {self.coordinator}: the host name {host} does not resolve "
                f"({error.strerror}): check its spelling, or give process 0's IP address"
            ) from None
        if i == 0:
            check_port_free(port, self.coordinator)

    def overdue_line(self) -> str:
        """Why this process has not joined the run within the timeout, and what to check."""
        k, i, timeout = self.num_processes, self.process_id, self.timeout_s
        longer = f"or wait longer (--distributed-timeout, now {timeout} s)"
        if self.coordinator is None:
            return (
                f"error: the run did not start within {timeout} s of JAX's cluster detection "
                f"(--coordinator auto): check that every process was started, {longer}"
            )
        host, port = self.address
        if i != 0 and not answers(host, port):
            return (
                f"error: process {i} found no coordinator at {host}:{port} within {timeout} s: "
                f"check that process 0 runs on {host} with --coordinator {self.coordinator}, "
                f"that this host reaches {host} on port {port} (a firewall?), {longer}"
            )
        return (
            f"error: process {i} waited {timeout} s at {host}:{port} for all {k} processes to "
            f"join: check that each was started with --coordinator {self.coordinator}, "
            f"--num-processes {k} and its own --process-id (0 to {k - 1}), {longer}"
        )


def check_port_free(port: int, coordinator: str) -> None:
    """Refuses a coordinator port that process 0 cannot serve on this host (in use, or
    reserved), binding it as JAX will: all addresses, IPv6 and IPv4, else IPv4 alone."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind((address, port))
            return
        except OSError as error:
            if family == socket.AF_INET6 and error.errno in NO_IPV6:
                continue
            raise ValueError(
                f"--coordinator {coordinator}: process 0 cannot serve the coordinator on port "
                f"{port} of this host ({error.strerror}): choose a free port"
            ) from None


def answers(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def explained(start: StartUp) -> Iterator[None]:
    """Around joining: if the block has not ended OVERDUE x the timeout later, the process
    ends with `StartUp.overdue_line` (exit status 2), before JAX would abort it."""
    timer = threading.Timer(
        start.timeout_s * OVERDUE, lambda: interrupts.end(start.overdue_line(), 2)
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_same_arguments(
    client, index: int, count: int, arguments: dict[str, str], timeout_s: int
) -> None:
    """Refuses a run whose processes were started with other `arguments` (option -> value,
    and the versions) than this one's: every process publishes its own through the
    coordination service (`client`) and reads the others' (waiting `timeout_s` at most).
    Raises ValueError naming the first option that differs and the processes, or
    ConnectionError for a process that does not publish them in time (it failed).

    Where they differ every process finds it, and none ends before all have compared (a
    process that ends takes the others down through the coordination service, with a C++
    stack, before they could say why); process 0, whose service that is, ends last."""
    client.key_value_set(ARGUMENTS_KEY.format(index), json.dumps(arguments))
    others = [other for other in range(count) if other != index]
    difference = None
    for other in others:
        published = _published(client, ARGUMENTS_KEY, other, timeout_s, "send its options")
        theirs = json.loads(published)
        for name in sorted(set(arguments) | set(theirs)):
            mine, its = arguments.get(name, "none"), theirs.get(name, "none")
            if mine != its and difference is None:
                difference = (
                    f"the processes of the run differ: {name} {mine} on process {index}, {its} "
                    f"on process {other}: start every process with the same command and "
                    "options (all but --process-id and file paths) and the same versions of "
                    "jaxfusion, jax and jaxlib"
                )
    if difference is None:
        return
    client.key_value_set(COMPARED_KEY.format(index), "1")
    for other in others:
        _published(client, COMPARED_KEY, other, timeout_s, "compare the options")
    try:
        interrupts.end_last(client, REFUSED_KEY, index, count, timeout_s)
    except TimeoutError as error:
        raise ConnectionError(
            f"{error} (--distributed-timeout): see its output ({error.__cause__})"
        ) from None
    raise ValueError(difference)


def _published(client, key: str, other: int, timeout_s: int, what: str) -> str:
    """The value process `other` sets at `key` (formatted with its index) once it has done
    `what`, waiting `timeout_s` at most."""
    try:
        return client.blocking_key_value_get(key.format(other), timeout_s * 1000)
    except Exception as error:  # JAX's DEADLINE_EXCEEDED
        raise ConnectionError(
            f"process {other} joined the run but did not {what} within "
            f"{timeout_s} s (--distributed-timeout): see its output ({error})"
        ) from None

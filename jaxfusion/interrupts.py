"""Ending a command promptly when it is asked to stop (SIGINT, SIGTERM), at any stage.

Python runs signal handlers in the main thread between bytecodes, but the main thread may
be inside XLA for minutes (compiling, running a program), and a compiled program cannot be
interrupted. So the handlers do nothing themselves: the signal also wakes a thread of ours
(`signal.set_wakeup_fd`), which waits for an output being moved into place to get there,
removes the outputs being written (`jaxfusion.files`), says in one line what was stopped,
and ends the process at once, with status 128 + the signal: `os._exit`, no interpreter
shutdown under a running XLA (which is what crashed before), no traceback.

In a multi-process run (`watch_peers`) the process asked to stop tells the others through
JAX's coordination service (its key-value store); each ends the same way, saying why.
Process 0, which serves the coordination service, ends last, once the others have read it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from jaxfusion import files

SIGNALS = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
STOP_KEY = "jaxfusion/stop"  # "STATUS WHY": a process was stopped, every process ends
ENDED_KEY = "jaxfusion/ended/{}"  # process I has read the stop and ends
FAILED_KEY = "jaxfusion/failed/{}"  # process I ends on an error, its line printed
POLL_S = 0.1  # how often a process of a multi-process run looks for a stop
ENDED_WAIT_S = 5.0  # how long process 0 waits for the others to end before it does
SERVICE_GRACE_S = 0.2  # then for their exit to complete, before the service goes


def _no_stage() -> str | None:
    return None


_say: Callable[[str], None] = print  # prints the last line
_stage: Callable[[], str | None] = _no_stage  # names what runs now
_ending = threading.Lock()  # one ending per process, whichever thread gets there first
_peers: _Peers | None = None


class EndOnSignals:
    """From its creation (in the main thread) until `restore` (or the end of its `with`
    block), SIGINT and SIGTERM end the process promptly at any stage; a signal the process
    inherited as ignored stays ignored (as SIGINT in a shell script's background job).
    `say` prints the last line (default: print); `stage` names what runs now."""

    def __init__(
        self,
        say: Callable[[str], None] | None = None,
        stage: Callable[[], str | None] | None = None,
    ):
        global _say, _stage
        _say, _stage = say or print, stage or _no_stage
        read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._handlers = {
            signum: signal.signal(signum, _wakes_the_watcher)
            for signum in SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN
        }
        self._wakeup_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=_watch, args=(read,), name="jaxfusion-signals", daemon=True).start()

    def restore(self) -> None:
        """The signal handling from before (the watching thread ends); if the process is
        ending (`end`), waits for that instead."""
        _wait_if_ending()
        signal.set_wakeup_fd(self._wakeup_fd)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        os.close(self._write)  # `_watch` reads the end of the pipe

    def __enter__(self) -> EndOnSignals:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _wakes_the_watcher(signum: int, frame: Any) -> None:
    """The Python-level handler, run in the main thread only when it is back in Python: it
    does nothing, as Python has already woken `_watch` (the wakeup fd)."""


def _watch(fd: int) -> None:
    with open(fd, "rb", buffering=0) as pipe:
        while received := pipe.read(64):  # one byte per signal: its number
            for signum in received:
                if signum in SIGNALS:
                    stopped_by(signum)


def stopped_by(signum: int) -> NoReturn:
    """Ends the process for signal `signum` (and the run's other processes, if any)."""
    name, stage = SIGNALS[signum], _stage()
    line = f"stopped by {name}" + (f" while {stage}" if stage else "")
    if _peers is not None:
        _peers.tell(128 + signum, f"process {_peers.index} was stopped by {name}")
        line += "; every process of the run ends"
    end(line, 128 + signum)


def end(line: str, status: int) -> NoReturn:
    """Ends the process now, with exit status `status`, once no output is half moved into
    place: the outputs being written are removed (and named after `line`), `line` said."""
    if not _ending.acquire(blocking=False):  # another thread is ending the process
        _wait_if_ending()
    try:
        files.hold_commits()
        removed = files.remove_unfinished()
        if removed:
            line += f" (not written: {', '.join(map(str, removed))})"
        _say(line)
    finally:
        # Nothing after the last line: what other threads print now goes nowhere.
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):  # standard output and error
            os.dup2(devnull, fd)
        if _peers is not None:
            _peers.ended()
        os._exit(status)


def _wait_if_ending() -> None:
    """Where the process is ending (`end`, in another thread): waits for its end."""
    while _ending.locked():
        time.sleep(60)


def end_if_peer_stopped() -> None:
    """In a multi-process run, where an error reaches the command: if a process of the run
    was stopped, the error is a consequence (its peer gone): end as that stop says."""
    told = _peers.told() if _peers is not None else None
    if told is not None:
        _peers.end(told)


def end_last_after_error() -> None:
    """In a multi-process run, where this process ends on an error whose line it has
    printed: process 0 waits (`end_last`, at most ENDED_WAIT_S) for the others to say the
    same, so that the coordination service it serves outlives their error lines (a process
    whose service goes first is aborted by JAX, maybe before it prints); the others say so
    and go. A peer that does not say so in time (busy in a collective) is not waited for:
    the service's heartbeats end it."""
    if _peers is None:
        return
    with contextlib.suppress(TimeoutError):
        end_last(_peers.client, FAILED_KEY, _peers.index, _peers.count, ENDED_WAIT_S)


def watch_peers(client: Any, index: int, count: int) -> None:
    """In a multi-process run (`client`: JAX's coordination service client; this is process
    `index` of `count`): a stop of any process ends this one, and a stop of this one ends
    the others (with `EndOnSignals` installed)."""
    global _peers
    _peers = _Peers(client, index, count)
    threading.Thread(target=_peers.watch, name="jaxfusion-peers", daemon=True).start()
    # Before JAX's own shutdown at exit (atexit runs the last registered first): no request
    # of ours may be under way while the client is shut down and the interpreter ends.
    atexit.register(_peers.close)


class _Peers:
    """The other processes of a multi-process run, through the coordination service."""

    def __init__(self, client: Any, index: int, count: int):
        self.client, self.index, self.count = client, index, count
        self.stopping = threading.Event()  # this process was stopped: its own stop is no news
        self.closed = threading.Event()
        self.idle = threading.Lock()  # held while a request of `watch` is under way

    def watch(self) -> None:
        """Polls for a stop (a blocking request would outlive the client at exit)."""
        while not self.closed.wait(POLL_S):
            with self.idle:
                if self.closed.is_set():
                    return
                told = self.told()
            if told is not None and not self.stopping.is_set():
                self.end(told)

    def told(self) -> str | None:
        """The stop another process posted ("STATUS WHY"), if any."""
        try:
            return self.client.key_value_try_get(STOP_KEY)
        except Exception:  # not posted (NOT_FOUND), or the service is going
            return None

    def end(self, told: str) -> NoReturn:
        """Ends this process for the stop `told`."""
        status, why = told.split(" ", 1)
        stage = _stage()
        while_stage = f" while {stage}" if stage else ""
        end(f"stopped{while_stage}: {why}, so every process of the run ends", int(status))

    def tell(self, status: int, why: str) -> None:
        """Asks every process to end with `status`, saying `why`."""
        self.stopping.set()
        # If the service is gone, the others end through its heartbeats.
        with contextlib.suppress(Exception):
            self.client.key_value_set(STOP_KEY, f"{status} {why}", allow_overwrite=True)

    def ended(self) -> None:
        """Says this process ends; process 0 first waits for the others to say so (for
        ENDED_WAIT_S at most): `end_last`."""
        with contextlib.suppress(Exception):  # a process already gone, or out of time: end
            end_last(self.client, ENDED_KEY, self.index, self.count, ENDED_WAIT_S)

    def close(self) -> None:
        """Stops watching, once no request is under way (at a normal exit)."""
        self.closed.set()
        with self.idle:
            pass


def end_last(client: Any, key: str, index: int, count: int, timeout_s: float) -> None:
    """Process `index` of `count` says at `key` (formatted with its index) that it ends.
    Process 0, whose exit takes the coordination service (`client`'s) down and with it any
    process still using it, first waits for every other process to say so, `timeout_s` in
    all, then SERVICE_GRACE_S for their exits to complete: it ends last. Raises TimeoutError
    naming the first process that does not say so in time (from the service's error)."""
    client.key_value_set(key.format(index), "1", allow_overwrite=True)
    if index != 0:
        return
    deadline = time.monotonic() + timeout_s
    for other in range(1, count):
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        try:
            client.blocking_key_value_get(key.format(other), max(left_ms, 1))
        except Exception as error:  # JAX's DEADLINE_EXCEEDED, or the service gone
            raise TimeoutError(
                f"process {other} joined the run but did not end within {timeout_s:g} s"
            ) from error
    time.sleep(SERVICE_GRACE_S)

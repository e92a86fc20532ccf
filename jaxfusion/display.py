"""The command line's progress display: a spinner per long stage on a terminal (a line when
it starts elsewhere), and a line with its duration when it ends."""

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

__all__ = ["StageDisplay", "escape"]  # escape: text shown as is, brackets and all


class StageDisplay:
    """`with display("compiling"): ...` shows the stage while it runs, then "✓ compiling
    (12.3 s)". `last_seconds` holds the duration of the stage that ended last."""

    def __init__(self, console: Console | None = None):
        # Off a terminal (logs, CI) rich would assume 80 columns and squeeze tables.
        width = None if sys.stderr.isatty() else 160
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True, width=width)
        self.last_seconds = 0.0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if not self.console.is_terminal:  # a log shows what runs, not only what ended
            self.console.print(f"{name} ...")
        with self.console.status(f"{name} ..."):
            yield
        self.last_seconds = time.perf_counter() - start
        self.console.print(f"[green]✓[/green] {name} ({self.last_seconds:.1f} s)")

    def note(self, text: str) -> None:
        self.console.print(text)

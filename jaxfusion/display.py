"""The command line's progress display: a spinner per long stage on a terminal (a line when
it starts elsewhere), and a line with its duration when it ends."""

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.status import Status

__all__ = ["StageDisplay", "escape"]  # escape: text shown as is, brackets and all
Outcome = Callable[[], str | None]  # what a stage turned out to do, asked when it ends


class StageDisplay:
    """`with display("compiling"): ...` shows the stage while it runs, then "✓ compiling
    (12.3 s)". `last_seconds` holds the duration of the stage that ended last; `stage`
    names the innermost stage running now (None between stages)."""

    def __init__(self, console: Console | None = None):
        # Off a terminal (logs, CI) rich would assume 80 columns and squeeze tables.
        width = None if sys.stderr.isatty() else 160
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True, width=width)
        self.last_seconds = 0.0
        self._stages: list[str] = []
        self._statuses: list[Status] = []

    @property
    def stage(self) -> str | None:
        return self._stages[-1] if self._stages else None

    @contextlib.contextmanager
    def __call__(self, name: str, outcome: Outcome | None = None) -> Iterator[None]:
        """The stage `name` around the block. `outcome`, called when it ends, may say what
        the stage turned out to do instead: the last line is then "✓ OUTCOME (12.3 s)"."""
        start = time.perf_counter()
        if not self.console.is_terminal:  # a log shows what runs, not only what ended
            self.console.print(f"{name} ...")
        status = self.console.status(f"{name} ...")
        self._stages.append(name)
        self._statuses.append(status)
        try:
            with status:
                yield
        finally:
            self._stages.pop()
            self._statuses.pop()
        self.last_seconds = time.perf_counter() - start
        line = (outcome() if outcome is not None else None) or name
        self.console.print(f"[green]✓[/green] {line} ({self.last_seconds:.1f} s)")

    def note(self, text: str) -> None:
        self.console.print(text)

    def final(self, text: str) -> None:
        """Prints `text` (plain, not markup) as the display's last line, from any thread:
        the spinner of a running stage is taken down first (and the cursor shown again)."""
        for status in list(self._statuses):
            status.stop()
        self.console.print(escape(text))
        self.console.show_cursor(True)  # hidden by any other live display (a progress bar)

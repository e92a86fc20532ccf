"""Stopping a command: SIGTERM and SIGINT end `jaxfusion generate` within moments whatever it
does (XLA compiling or running a program included), with the signal's exit status, one
line naming what was stopped, no traceback and no output left; outputs being written are
removed (`jaxfusion.files`). The multi-process case is in test_distributed.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import SCRIPT

from jaxfusion import cli, files

PROMPT = "a red circle at the top left"
# From the signal to the process's end: moments where nothing waits for an output to be
# moved into place, and a busy 2-core machine's slack.
END_WITHIN_S = 5.0
START_WITHIN_S = 300.0  # start-up, loading and compiling on a busy machine


def stopped(tmp_path: Path, signum: int, stage: str, after_s: float, *args: str):
    """`jaxfusion generate --prompt PROMPT ARGS --out tmp_path/image.png` (its cache in
    tmp_path/cache), sent `signum` `after_s` seconds after a stage named `stage...` starts:
    (exit status, seconds from the signal to its end, its output)."""
    log = tmp_path / "log.txt"
    env = dict(os.environ, JAXFUSION_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    command = [str(SCRIPT), "generate", "--prompt", PROMPT, *args]
    with open(log, "w") as output:
        process = subprocess.Popen(
            [*command, "--out", str(tmp_path / "image.png")],
            stdout=output,
            stderr=output,
            env=env,
            # As a terminal's foreground job: SIGINT not ignored (a background job's is).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + START_WITHIN_S
        while not started(stage, log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(after_s)
        process.send_signal(signum)
        sent = time.monotonic()
        status = process.wait(timeout=60)
        return status, time.monotonic() - sent, log.read_text()
    finally:
        process.kill()


def started(stage: str, output: str) -> bool:
    """Whether `output` shows a stage whose name starts with `stage` as started."""
    return any(line.startswith(stage) and line.endswith(" ...") for line in output.splitlines())


def outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("cache", "log.txt"))


@pytest.mark.parametrize(
    ("signum", "stage", "after_s", "options", "last_line"),
    [
        # 4 devices at 128x128: XLA compiles for 10 s or more here; the signal 3 s into the
        # stage (its tracing done, the compiler running).
        (
            signal.SIGTERM, "compiling", 3.0, ["--devices", "4", "--height", "128",
            "--width", "128"], "stopped by SIGTERM while compiling",
        ),
        # 1000 steps at 256x256 run for a minute or more here; the signal 1 s into them.
        (
            signal.SIGINT, "denoising", 1.0, ["--height", "256", "--width", "256", "--steps",
            "1000"], "stopped by SIGINT (Ctrl-C) while denoising 1 image(s), 1000 steps",
        ),
    ],
    ids=["sigterm-compiling", "sigint-denoising"],
)  # fmt: skip
def test_a_signal_ends_the_command_at_once(tmp_path, signum, stage, after_s, options, last_line):
    status, seconds, output = stopped(tmp_path, signum, stage, after_s, *options)
    print(f"{last_line}: ended {seconds:.2f} s after the signal")
    assert status == 128 + signum, output
    assert seconds < END_WITHIN_S
    assert f"✓ {stage}" not in output  # it ended before the stage did
    assert output.splitlines()[-1] == last_line
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert outputs(tmp_path) == []


def test_a_stop_removes_the_outputs_being_written(tmp_path):
    """What `jaxfusion.interrupts` removes before it ends the process: a staging folder (the
    target never appears), a new folder being filled, and the files put into a folder the
    user made (which stays, empty); outputs already in place stay."""
    done, made = tmp_path / "done.txt", tmp_path / "made"
    files.write_text_atomically(done, "whole\n")
    made.mkdir()
    with (
        pytest.raises(InterruptedError),  # the process would end here: the blocks do not go on
        files.staging_folder(tmp_path / "converted") as staging,
        files.filling(tmp_path / "new"),
        files.filling(made),
    ):
        (staging / "weights").write_text("half")
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "a.png").write_text("one")
        (made / "trace").mkdir()
        (made / "trace" / "t.json").write_text("{")
        removed = files.remove_unfinished()
        raise InterruptedError
    assert sorted(removed) == [tmp_path / "converted", made, tmp_path / "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.txt", "made"]
    assert list(made.iterdir()) == []
    assert done.read_text() == "whole\n"


def test_the_signal_handling_from_before_returns_after_the_command():
    """In a process that runs the command's entry point (a test, a notebook), the command's
    handlers are in place while it runs and the earlier ones return after it."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with cli.end_on_termination():
        assert signal.getsignal(signal.SIGTERM) is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_writing_leaves_no_file(tmp_path, signum):
    """The atomic writer under the command's handling, stopped halfway through a write:
    neither the output nor its temporary file stays, and the line names the output."""
    ready, target = tmp_path / "ready", tmp_path / "image.png"
    code = (
        "import time\n"
        "from pathlib import Path\n"
        "from jaxfusion.cli import end_on_termination\n"
        "from jaxfusion.files import write_atomically\n"
        "def slow_write(tmp):\n"
        "    Path(tmp).write_bytes(b'partial')\n"
        f"    Path({str(ready)!r}).touch()\n"
        "    time.sleep(60)\n"
        "end_on_termination()\n"
        f"write_atomically(Path({str(target)!r}), slow_write)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 128 + signum
    assert output.strip().endswith(f"(not written: {target})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]

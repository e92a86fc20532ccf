"""The `jaxfusion` command: the installed console script run as a user runs it (a
subprocess), or its entry point in this process for refusals (no start-up to wait for)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("jaxfusion")


def jaxfusion_command(cache: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """`jaxfusion ARGS` with its cache folder `cache` and no hub access; asserts its exit
    status is `expect` (showing its output otherwise) and returns the finished process."""
    env = dict(os.environ, JAXFUSION_CACHE=str(cache), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def refused(capsys, *argv: str) -> str:
    """The error line of `jaxfusion ARGV` run in this process (`capsys`: pytest's fixture),
    which must exit with 2 (argparse's refusals raise SystemExit(2))."""
    from jaxfusion import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    return " ".join(capsys.readouterr().err.split())

"""The installed `jaxfusion` console script, run as a user runs it: a subprocess."""

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

"""Writing outputs atomically: a file or folder appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def write_atomically(target: Path, write: Callable[[str], object]) -> None:
    """Calls `write(temporary_path)` beside `target`, then renames it onto `target`, so no
    half-written file is left behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(target: Path, text: str) -> None:
    """`write_atomically` for a text file."""
    write_atomically(target, lambda tmp: Path(tmp).write_text(text))


def check_new_folder(out: str | Path) -> Path:
    """`out` as a folder a command may fill: new or empty, in a folder that exists (raises
    FileExistsError or FileNotFoundError otherwise)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder: name a new one")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    return out


@contextlib.contextmanager
def staging_folder(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; when the block succeeds it becomes
    `target` (replacing an existing one only with `overwrite`), when it fails it is deleted.
    So a folder of several files appears whole or not at all."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another path or allow overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        if target.exists():
            old = Path(
                tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old")
            )
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

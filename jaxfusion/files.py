"""Writing outputs atomically: a file or folder appears whole or not at all.

What is being written is known here (`unfinished`), so that a command asked to stop at
any moment (`jaxfusion.interrupts`) removes it, and waits for an output being moved into
place (`hold_commits`) instead of ending halfway through a replacement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Unfinished:
    """`path`, removed if the command stops, is the unfinished form of `output` (the name
    the user gave); with `keep_folder`, `path` is a folder the user made, emptied instead."""

    path: Path
    output: Path
    keep_folder: bool = False


_unfinished: dict[Path, Unfinished] = {}
# Held while an output is moved into place: a stopping command waits for it (`hold_commits`).
_commit_lock = threading.Lock()


@contextlib.contextmanager
def unfinished(path: Path, output: Path, *, keep_folder: bool = False) -> Iterator[None]:
    """Within the block `path` is `output` being written: `remove_unfinished` removes it."""
    _unfinished[path] = Unfinished(path, output, keep_folder)
    try:
        yield
    finally:
        _unfinished.pop(path, None)


def hold_commits() -> None:
    """Waits until no output is being moved into place, and lets none start: for a process
    that ends next, so that no replacement is left half done."""
    _commit_lock.acquire()


def remove_unfinished() -> list[Path]:
    """Removes every output being written (their temporary files and folders; folders the
    user made are emptied); returns the outputs, as the user named them."""
    removed = []
    for entry in list(_unfinished.values()):  # a copy: the main thread may still write
        if not entry.path.exists():  # not started, or already moved into place
            continue
        if entry.path.is_dir():
            children = entry.path.iterdir() if entry.keep_folder else [entry.path]
            for child in list(children):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        else:
            entry.path.unlink(missing_ok=True)
        removed.append(entry.output)
    return removed


def write_atomically(target: Path, write: Callable[[str], object]) -> None:
    """Calls `write(temporary_path)` beside `target`, then renames it onto `target`, so no
    half-written file is left behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with unfinished(Path(tmp), target):
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
            with _commit_lock:
                os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(target: Path, text: str) -> None:
    """`write_atomically` for a text file."""
    write_atomically(target, lambda tmp: Path(tmp).write_text(text))


def check_parent_folder(path: Path, option: str) -> None:
    """Refuses `path` (the value of `option`) whose folder is missing or is a file."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(
            f"{option} {path}: {parent} is a file, not a folder: name a path in a folder"
        )
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {parent} does not exist")


def check_new_folder(out: str | Path) -> Path:
    """`out` as a folder a command may fill: new or empty, in a folder that exists (raises
    FileExistsError, FileNotFoundError or NotADirectoryError otherwise)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder: name a new one")
    check_parent_folder(out, "--out")
    return out


@contextlib.contextmanager
def filling(folder: Path) -> Iterator[None]:
    """Within the block `folder` (new or empty, `check_new_folder`) is an output being
    written, file by file: a stopped command removes it, or empties it if it was there."""
    with unfinished(folder, folder, keep_folder=folder.is_dir()):
        yield


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
        with unfinished(staging, target):
            yield staging
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
            with _commit_lock:
                _replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, target: Path) -> None:
    """Moves `staging` onto `target`, an existing `target` first set aside, then deleted."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / target.name)
    os.replace(staging, target)
    shutil.rmtree(old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

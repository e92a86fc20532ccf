"""The fenced code blocks of the README and the documentation pages, and how the tests run
them (`tests/test_docs.py`, `tests/test_docs_examples.py`).

Every `bash` and `python` block runs as written, in a fresh folder, on the built-in model,
unless its first line says what it needs (`# needs: an SDXL checkpoint and a GPU`). Two
kinds of line are not run here but checked: the quick start's install (`python3 -m venv
.venv && . .venv/bin/activate && pip install -e SPEC && ...`: the extras SPEC names must
exist, and the rest of the line runs in this environment, where they are installed), and
the commands CI runs itself (the whole test suite, the docs build): `.ci/run` must run them.
docs/performance.md is left out: it is generated, and its blocks are the measurements that
`benchmarks/performance_page.py --run` runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
GENERATED = {DOCS / "performance.md"}
RUN = ("bash", "python")
NEEDS = "# needs:"
INSTALL = re.compile(
    r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e (?P<spec>\S+) && "
)
# Commands that CI runs itself (.ci/run); running them here would run the suite in itself.
RUN_BY_CI = ("python -m pytest -q", "mkdocs build --strict")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"

    @property
    def needs(self) -> str | None:
        """What the block needs that the tests do not have, from its first line; None: it
        runs."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NEEDS) :].strip() if first.startswith(NEEDS) else None


def pages() -> list[Path]:
    """The README and every documentation page but the generated one."""
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if p not in GENERATED)]


def blocks(file: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    found, opened, language, lines = [], None, "", []
    for number, text in enumerate(file.read_text().splitlines(), start=1):
        match = FENCE.match(text)
        if opened is None and match:
            opened, language, lines = number, match.group(1), []
        elif opened is not None and text.strip() == "```":
            found.append(Block(file, opened, language, "\n".join(lines) + "\n"))
            opened = None
        elif opened is not None:
            lines.append(text)
    assert opened is None, f"{file}:{opened}: a fence is not closed"
    return found


def runnable_blocks() -> list[Block]:
    """Every block that runs, each distinct code once (the README's quick start is also on
    the getting-started page)."""
    seen, runnable = set(), []
    for page in pages():
        for block in blocks(page):
            if block.language in RUN and block.needs is None and block.code not in seen:
                seen.add(block.code)
                runnable.append(block)
    return runnable


def split_for_this_machine(block: Block) -> tuple[str, list[str], list[str]]:
    """(the code to run here, the extras its install lines name, the commands CI runs for
    it): install prefixes and CI's own commands taken out of a bash block."""
    if block.language != "bash":
        return block.code, [], []
    lines, extras, by_ci = [], [], []
    for line in block.code.splitlines():
        match = INSTALL.match(line)
        if match:
            extras.append(shlex.split(match.group("spec"))[0])
            line = line[match.end() :]
        install = re.match(r"^pip install -e (\S+) && ", line)
        if install:
            extras.append(shlex.split(install.group(1))[0])
            line = line[install.end() :]
        if line.strip() in RUN_BY_CI:
            by_ci.append(line.strip())
            continue
        lines.append(line)
    return "\n".join(lines) + "\n", extras, by_ci


def outputs(code: str) -> list[str]:
    """The files a block says it writes: every `--out X`."""
    return re.findall(r"--out\s+(\S+)", code)


def run_block(block: Block, folder: Path, cache: Path) -> subprocess.CompletedProcess:
    """Runs the block in `folder` as a user would, with this Python's `jaxfusion` and
    `python` first on PATH, JAX on the CPU and no hub access; asserts it succeeded, printed
    no traceback and wrote every `--out` it names."""
    code, _, _ = split_for_this_machine(block)
    bin_dir = str(Path(sys.executable).parent)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        JAX_PLATFORMS="cpu",
        JAXFUSION_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
    )
    if block.language == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )
    shown = f"{block.name}\n{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, shown
    assert "Traceback" not in result.stderr, shown
    for out in outputs(code):
        written = sorted(folder.glob(Path(out).stem + "*"))
        assert written, f"{block.name}: --out {out} was not written\n{shown}"
    return result

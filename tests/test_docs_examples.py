"""Every runnable code block of the documentation pages (docs/*.md but the generated
performance page) runs as written on the built-in model, each in a fresh folder: see
tests/doc_blocks.py for the rule and what is checked. The README's run in test_docs.py."""

from pathlib import Path

import pytest
from doc_blocks import ROOT, run_block, runnable_blocks, split_for_this_machine

BLOCKS = [
    b
    for b in runnable_blocks()
    if b.file != ROOT / "README.md" and split_for_this_machine(b)[0].strip()
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-cache")


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_docs_example_runs(block, tmp_path, cache):
    run_block(block, tmp_path, cache)

"""The README and the documentation: the README stays a short landing page whose links
land; every code block either runs (here and in tests/test_docs_examples.py) or says what it
needs; the quick start's commands are the ones CI runs; the command-line reference that the
docs build generates covers every option of every command (against argparse's own help);
the notebook is served beside the pages."""

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from doc_blocks import (
    DOCS,
    ROOT,
    RUN,
    RUN_BY_CI,
    blocks,
    pages,
    run_block,
    runnable_blocks,
    split_for_this_machine,
)
from markdown.extensions.toc import slugify

from jaxfusion.cli import build_parser


def hook(name: str):
    """A module of docs/hooks/, loaded from its file as MkDocs loads it."""
    spec = importlib.util.spec_from_file_location(name, DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_reference = hook("cli_reference")
serve_notebook = hook("serve_notebook")

README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_a_landing_page():
    assert len(README.read_bytes()) <= 12 * 1024
    text = README.read_text()
    for section in ("## Quick start", "## Examples", "## Documentation"):
        assert section in text
    assert "mkdocs build --strict" in text  # the local docs build


def anchors(page: Path) -> set[str]:
    """The heading ids MkDocs gives a page (its default toc slugify)."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {slugify(re.sub(r"[`*]", "", heading), "-") for heading in headings}


def test_readme_links_land():
    """MkDocs checks the docs' own links in strict mode; the README is not a page of the
    site, so its links to files and to headings in them are checked here."""
    for target in LINK.findall(README.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), target
        if anchor:
            assert anchor in anchors(file), target


def test_every_block_runs_or_says_what_it_needs():
    """bash and python blocks run unless marked; the others are output or text."""
    for page in pages():
        for block in blocks(page):
            assert block.language, f"{block.name}: give the fence a language (text for output)"
            if block.language in RUN and block.needs is not None:
                assert len(block.needs) > 5, f"{block.name}: say what it needs"
    names = {block.name for block in runnable_blocks()}
    assert {b.name for b in blocks(README) if b.language in RUN and b.needs is None} <= names
    assert len(names) >= 10


def test_quick_start_installs_what_pyproject_offers_and_ci_runs_its_test_command():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    readme = [b for b in blocks(README) if b.language == "bash"]
    installs, by_ci = set(), set()
    for block in (b for page in pages() for b in blocks(page) if b.language == "bash"):
        _, specs, commands = split_for_this_machine(block)
        installs.update(specs)
        by_ci.update(commands)
    for spec in installs:
        assert spec == "." or re.fullmatch(r"\.\[(\w+)\]", spec), spec
        for extra in re.findall(r"\[(\w+)\]", spec):
            assert extra in extras, spec
    assert {".", ".[test]", ".[docs]"} <= installs
    assert by_ci == set(RUN_BY_CI)
    # CI installs the dev extra, which holds the test and docs extras, then runs them.
    assert 'pip install --quiet -e ".[dev]"' in ci
    assert {"jaxfusion[test]", "jaxfusion[docs]"} <= set(extras["dev"])
    for command in RUN_BY_CI:
        assert re.search(rf"^{re.escape(command)}$", ci, re.MULTILINE), command
    # The README's two quick-start commands, as they were: install and generate; install
    # the test extras and run the whole suite.
    assert readme[0].code.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert readme[0].code.rstrip().endswith("--out image.png")
    assert readme[1].code.strip().endswith('pip install -e ".[test]" && python -m pytest -q')


def option_strings(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))


def test_cli_reference_lists_every_option_of_every_command():
    """The generated reference against argparse's own --help of each command."""
    parser = build_parser()
    reference = cli_reference.reference(parser)
    assert set(reference) == {
        "generate", "compare", "convert", "train", "bench analyze", "bench time", "profile",
        "eval",
    }  # fmt: skip
    for words, _, sub in cli_reference.commands(parser):
        text = reference[" ".join(words)]
        expected = option_strings(sub.format_help()) - {"--help"}
        assert expected, words
        table = {line for line in text.splitlines() if line.startswith("| ")}
        listed = option_strings("\n".join(table))
        assert expected <= listed, (words, expected - listed)
        for action in sub._actions:
            if action.help and "--help" not in action.option_strings:
                assert action.help.split("(")[0].strip()[:30] in text, action.option_strings


def test_cli_page_places_every_command_once():
    page = (DOCS / "cli.md").read_text()
    filled = cli_reference.fill(page, cli_reference.reference())
    assert "<!-- cli:" not in filled
    for name in ("generate", "bench analyze", "eval"):
        assert f"### `jaxfusion {name}`" in filled
    with pytest.raises(ValueError, match=r"missing \['eval'\]"):
        cli_reference.fill(page.replace("<!-- cli: eval -->", ""), cli_reference.reference())
    with pytest.raises(ValueError, match=r"unknown \['serve'\]"):
        cli_reference.fill(page + "\n<!-- cli: serve -->\n", cli_reference.reference())


def test_the_notebook_is_served_with_the_docs_and_linked():
    assert serve_notebook.NOTEBOOK == ROOT / "notebooks" / "quickstart.ipynb"
    assert serve_notebook.NOTEBOOK.is_file()
    assert "(quickstart.ipynb)" in (DOCS / "getting-started.md").read_text()
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks/serve_notebook.py" in mkdocs and "docs/hooks/cli_reference.py" in mkdocs


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-cache")


# Blocks left with nothing to run here (install, then a command CI runs) are checked above.
README_BLOCKS = [
    b for b in runnable_blocks() if b.file == README and split_for_this_machine(b)[0].strip()
]


@pytest.mark.slow
@pytest.mark.parametrize("block", README_BLOCKS, ids=[b.name for b in README_BLOCKS])
def test_readme_example_runs(block, tmp_path, cache):
    result = run_block(block, tmp_path, cache)
    if "psnr" in block.code:  # the Python example prints its comparison: displaced is close
        (line,) = [line for line in result.stdout.splitlines() if "dB from one device" in line]
        assert float(re.search(r"([\d.]+) dB", line).group(1)) > 20, line

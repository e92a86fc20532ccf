"""Serves the quick-start notebook with the site (`quickstart.ipynb` beside the pages), so
that the getting-started page can offer it for download and Colab's upload. An MkDocs hook:
the notebook stays where the tests run it, `notebooks/quickstart.ipynb`."""

from __future__ import annotations

from pathlib import Path

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "quickstart.ipynb"


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, NOTEBOOK.name, abs_src_path=str(NOTEBOOK)))
    return files

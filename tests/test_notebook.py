"""The quick-start notebook runs from top to bottom (as Colab would run it, in a fresh
kernel) and what it prints holds: `sync` equals `single`, `naive` is worse than
`displaced`."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_and_sync_equals_single():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOK.parent}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    psnr = {
        name: float(value)
        for name, value in re.findall(r"(\w+): PSNR against single\s+(\S+) dB", printed)
    }
    assert set(psnr) == {"single", "sync", "displaced", "naive"}, printed
    assert psnr["sync"] > 60 and psnr["naive"] < psnr["displaced"], psnr
    assert "trace.json.gz" in printed

"""`bench analyze`'s table: each number under the column that names it, the whole run's
memory apart from the step compiled alone (which can be the larger: a program of its own
that holds its stale buffers twice), and a legend naming every column."""

import io

from rich.console import Console

from jaxfusion.bench.analyze import TABLE_LEGEND, StepAnalysis, print_table
from jaxfusion.display import StageDisplay

# SDXL 3840x3840 on 8 devices as the CPU compiler estimated it: the step alone larger than
# the whole run, as issue 43 found it.
RECORD = StepAnalysis(
    model="sdxl",
    height=3840,
    width=3840,
    devices=8,
    patch=8,
    cfg=1,
    mode="displaced",
    dtype="bfloat16",
    flops_per_device_step=41.5e12,
    flops_single_step=300.0e12,
    bytes_accessed_per_device_step=1.0e12,
    comm_bytes_per_device_step=10_380_000_000,
    comm_bytes_hlo_per_device_step=20_000_000_000,
    comm_bytes_reference_per_device_step=10_760_000_000,
    memory_bytes_per_device=31_000_000_000,
    stale_bytes_per_device=5_680_000_000,
    collectives={},
    memory_bytes_generation_per_device=23_300_000_000,
    weights_bytes_per_device=6_940_000_000,
    temp_bytes_generation_per_device=16_000_000_000,
)


def rendered(records) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None)
    print_table(records, StageDisplay(console))
    return console.file.getvalue()


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("┃│").replace("┃", "│").split("│")]


def row_of(text: str) -> dict[str, str]:
    """The table's one row of `text`, column name -> cell."""
    lines = text.splitlines()
    (header,) = [line for line in lines if "model" in line and "size" in line]
    (row,) = [line for line in lines if "3840x3840" in line]
    return dict(zip(cells(header), cells(row), strict=True))


def test_every_number_sits_under_its_column():
    text = rendered([RECORD])
    assert row_of(text) == {
        "model": "sdxl",
        "size": "3840x3840",
        "devices": "8 (C=1)",
        "mode": "displaced",
        "step GFLOPs": "41,500.0",
        "÷ single": "0.138",
        "padding": "0.0%",
        "step recv MB": "10,380.0",
        "ref. recv MB": "10,760.0",
        "run MB": "23,300",
        "run, T5 freed MB": "—",  # no T5 in SDXL
        "weights MB": "6,940",
        "stale MB": "5,680.0",
        "step alone MB": "31,000",
    }
    # The legend under the table names every column and says which can be the larger.
    for name in TABLE_LEGEND:
        assert f"{name}: " in text
    assert "not part of run MB, and it can exceed it" in text
    assert "estimates, not measurements" in text
    assert text.index("step alone MB: ") > text.index("31,000")  # the legend after the table


def test_a_model_known_by_its_unet_alone_has_no_run_memory():
    unet_only = StepAnalysis(
        **{
            **RECORD.__dict__,
            "memory_bytes_generation_per_device": None,
            "weights_bytes_per_device": None,
        }
    )
    table = row_of(rendered([unet_only]))
    assert table["run MB"] == table["weights MB"] == "—"
    assert table["step alone MB"] == "31,000"

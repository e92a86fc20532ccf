"""The denoising loop compiled for a real accelerator's topology by its own compiler (no
hardware): `bench analyze --target` reads the displaced loop's body from the schedule."""

import argparse
import dataclasses
import json

import jax.numpy as jnp
import pytest

from jaxfusion.bench import analyze, targets
from jaxfusion.bench.options import AnalyzeOptions
from jaxfusion.builtin import builtin_model_path
from jaxfusion.cli.bench import xla_option
from sharding import ParallelConfig
from sharding.analysis import trace_step

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jaxfusion[targets]'")

STEPS = 8  # warm-up: steps 0..2, displaced: steps 3..7


@pytest.fixture(scope="module")
def model():
    path = str(builtin_model_path())
    return analyze.load_config(path), analyze.downscale_factor(path)


@pytest.fixture(scope="module")
def displaced(model):
    config, downscale = model
    parallel = ParallelConfig(4, mode="displaced")
    v5e = targets.target("v5e-8")
    record = analyze.target_loop(
        config, 64, 64, parallel, "bfloat16", v5e, "xla", downscale=downscale, steps=STEPS
    )
    return parallel, record


def test_displaced_loop_body_exchanges_what_the_traced_step_exchanges(model, displaced):
    """The loop read is the displaced scan (5 steps); the bytes its collectives deliver to
    one device equal those of the traced displaced step's collectives (the jaxpr, before
    any compiler; in bfloat16, which the TPU compiler keeps: it sends float32 K/V that only
    feed default-precision matmuls as bfloat16), and the halo permutes are asynchronous (a
    start and a done)."""
    config, _ = model
    parallel, record = displaced
    assert record.loop == "displaced" and record.overlap.trip_count == STEPS - 3
    unet, sampling, latents = analyze.abstract_inputs(config, 16, 16, "bfloat16", steps=STEPS)
    traced = trace_step(unet, sampling, latents, parallel, "displaced")
    assert record.overlap.received_bytes == sum(c.received_bytes for c in traced.collectives())
    body = record.schedule.collectives_in(record.body)
    assert body and all(c.done > c.start for c in body if c.kind == "collective-permute")
    assert 0 < record.memory_bytes_per_chip < record.hbm_bytes


def test_displaced_loop_hides_what_sync_exposes(model, displaced):
    """The same loop in sync mode is the control: each of its collectives is read as soon as
    it arrives, so none has compute beside it; the displaced loop, compiled with the
    overlap options (`ParallelConfig.compiler_options`), sends the same bytes and has most
    of them travel beside at least a tenth of the step's compute (68.8% when written)."""
    config, downscale = model
    parallel, record = displaced
    sync = analyze.target_loop(
        config,
        64,
        64,
        dataclasses.replace(parallel, mode="sync"),
        "bfloat16",
        targets.target("v5e-8"),
        "xla",
        downscale=downscale,
        steps=STEPS,
    )
    assert sync.loop == "sync" and sync.overlap.received_bytes == record.overlap.received_bytes
    assert sync.overlap.hidden_share == 0
    assert record.overlap.hidden_share > 0.5


def test_overlap_model_is_the_stated_formula(displaced):
    """Exposed time: each collective's transfer less its window's compute, summed, at
    least the step's transfer less its compute; hidden share: bytes of the collectives with
    a tenth of the step's compute in their window, enough for their transfer."""
    _, record = displaced
    o, v5e = record.overlap, targets.target("v5e-8")
    compute = o.step_flops / (v5e.peak_tflops * 1e12)
    transfers = [c.received_bytes / (v5e.link_gbs * 1e9) for c in o.collectives]
    windows = [c.window_flops / (v5e.peak_tflops * 1e12) for c in o.collectives]
    exposed = sum(max(0, t - w) for t, w in zip(transfers, windows, strict=True))
    assert o.exposed_s == pytest.approx(max(exposed, sum(transfers) - compute))
    hidden = sum(
        c.received_bytes
        for c, t, w in zip(o.collectives, transfers, windows, strict=True)
        if c.window_flops >= 0.1 * o.step_flops and w >= t
    )
    assert o.hidden_share == pytest.approx(hidden / o.received_bytes)


def test_analyze_target_table_and_records(tmp_path, model):
    """`bench analyze --target` from Python: one record per row, the one-device row first
    so that the 4-device row has its projected speed-up; the schedule pictures written."""
    options = analyze.AnalyzeOptions(
        model=str(builtin_model_path()),
        heights=(64,),
        devices=(1, 4),
        dtype="float32",
        attention="xla",
        target="v5e-8",
        schedule=tmp_path / "schedules",
        json=tmp_path / "records.json",
    )
    single, four = analyze.run(options)
    assert (single.loop, four.loop) == ("single", "displaced")
    assert four.speedup == pytest.approx(single.step_s / four.step_s)
    assert single.received_bytes_per_step == 0 and four.received_bytes_per_step > 0
    assert len(list((tmp_path / "schedules").glob("*.png"))) == 2
    assert (tmp_path / "records.json").is_file()
    assert dataclasses.asdict(four)["target"] == "v5e-8" and jnp.dtype(four.dtype) == jnp.float32


def test_a_row_that_does_not_fit_is_recorded(monkeypatch, tmp_path):
    """A configuration the chip's HBM cannot hold is a row of the table and the JSON (the
    memory the compiler said it needs, the rest empty), not the end of the command."""
    needed, hbm = 20 * 2**30, targets.target("v5e-8").hbm_bytes

    def too_large(*args, **kwargs):
        raise targets.ProgramTooLarge("the program needs 20.00 GiB per chip", needed, hbm)

    monkeypatch.setattr(analyze, "target_loop", too_large)
    options = analyze.AnalyzeOptions(
        model=str(builtin_model_path()),
        heights=(64,),
        devices=(4,),
        dtype="float32",
        attention="xla",
        target="v5e-8",
        json=tmp_path / "records.json",
    )
    (record,) = analyze.run(options)
    assert (record.loop, record.memory_bytes_per_chip, record.hbm_bytes) == (
        "does not fit",
        needed,
        hbm,
    )
    assert record.hidden_share is None and record.speedup is None
    (written,) = json.loads((tmp_path / "records.json").read_text())
    assert written["loop"] == "does not fit" and written["memory_bytes_per_chip"] == needed


def test_xla_option_values():
    assert xla_option("xla_flag=false") == ("xla_flag", False)
    assert xla_option("xla_limit=32") == ("xla_limit", 32)
    assert xla_option("xla_ratio=0.5") == ("xla_ratio", 0.5)
    assert xla_option("xla_mode=fast") == ("xla_mode", "fast")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        xla_option("xla_flag")
    with pytest.raises(ValueError, match="add --target"):
        AnalyzeOptions(xla_options=(("xla_flag", True),))

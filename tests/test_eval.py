"""`jaxfusion eval` on a tiny random SDXL pipeline (2 prompts, 1 seed, 2 devices, 3 steps:
three compiles), checked by the algorithm's own identity (displaced with every step in
warm-up is synchronous patch parallelism, which equals single), by scikit-image's metrics of
the written PNGs, and by the grid's layout; refusals come before the model is loaded or
anything compiles."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from commands import jaxfusion_command
from PIL import Image
from pipelines import SIZE, save_random_pipeline
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jaxfusion import cli
from jaxfusion.bench import evaluate
from jaxfusion.bench.options import EvalOptions

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]
STEPS = 3
MODES = ["single", "displaced-corrected", "naive"]
GAP = 4  # jaxfusion.images.grid's default


def skimage_ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """The setting of Wang et al. 2004, written out here as the oracle of `images.ssim`."""
    return structural_similarity(
        image,
        reference,
        channel_axis=-1 if image.ndim == 3 else None,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_random_pipeline(tmp_path_factory.mktemp("model"), "sdxl-light")


@pytest.fixture(scope="module")
def evaluation(model, tmp_path_factory) -> tuple[Path, str]:
    """(the --out folder, stderr) of one eval with every step in warm-up (--warmup-steps
    STEPS - 1)."""
    folder = tmp_path_factory.mktemp("eval")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
    out = folder / "out"
    result = jaxfusion_command(
        folder / "cache", "eval", "--model", str(model), "--prompts", str(prompts),
        "--seeds", "0", "--devices", "2", "--gn", "corrected", "--steps", str(STEPS),
        "--warmup-steps", str(STEPS - 1), "--out", str(out),
    )  # fmt: skip
    return out, result.stderr


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float64) / 255


@pytest.mark.slow
def test_eval_writes_every_image_and_the_metrics(evaluation):
    out, stderr = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    names = [f"p{i}-s0-{mode}.png" for i in range(len(PROMPTS)) for mode in MODES]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(names)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "metrics.json"]
    assert metrics["config"]["prompts"] == PROMPTS and metrics["config"]["seeds"] == [0]
    assert list(metrics["config"]["modes"]) == MODES
    assert metrics["config"]["modes"]["displaced-corrected"]["warmup_steps"] == STEPS - 1
    assert [(r["prompt_index"], r["seed"]) for r in metrics["images"]] == [(0, 0), (1, 0)]
    for mode in MODES[1:]:
        assert mode in stderr
        for metric in ("psnr_db", "ssim"):
            values = [r["metrics"][mode][metric] for r in metrics["images"]]
            if None not in values:  # null: infinite PSNR
                assert metrics["mean"][mode][metric] == pytest.approx(np.mean(values))
    assert f"x{metrics['grid']['difference_gain']}" in stderr


@pytest.mark.slow
def test_displaced_with_every_step_in_warmup_equals_single(evaluation):
    """The algorithm's identity: no step is displaced, so the image is single's up to
    float32 rounding (its PNG at most one level off)."""
    out, _ = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    for record in metrics["images"]:
        scores = record["metrics"]["displaced-corrected"]
        assert scores["psnr_db"] is None or scores["psnr_db"] > 60
        assert scores["ssim"] == pytest.approx(1.0, abs=1e-6)
        files = record["files"]
        difference = read_png(out / files["displaced-corrected"]) - read_png(out / files["single"])
        assert np.abs(difference).max() <= 1 / 255 + 1e-9


@pytest.mark.slow
def test_naive_metrics_agree_with_skimage_on_the_pngs(evaluation):
    """The metrics come from the float images; the PNGs round them to 8 bits, which moves
    PSNR and SSIM of clearly different images very little."""
    out, _ = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    for record in metrics["images"]:
        naive, single = (read_png(out / record["files"][mode]) for mode in ("naive", "single"))
        scores = record["metrics"]["naive"]
        assert scores["psnr_db"] < 40  # no exchange between the slabs: clearly different
        expected = peak_signal_noise_ratio(single, naive, data_range=1.0)
        assert scores["psnr_db"] == pytest.approx(expected, abs=0.02)
        assert scores["ssim"] == pytest.approx(skimage_ssim(naive, single), abs=0.002)


@pytest.mark.slow
def test_grid_layout(evaluation):
    """Rows: (prompt, seed). Columns: the modes, then each non-reference mode's amplified
    absolute difference from single."""
    out, _ = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    columns, rows = metrics["grid"]["columns"], metrics["grid"]["rows"]
    assert columns[: len(MODES)] == MODES and len(columns) == 2 * len(MODES) - 1
    assert rows == ["p0-s0", "p1-s0"]
    grid = read_png(out / "grid.png")
    assert grid.shape == (
        len(rows) * SIZE + (len(rows) - 1) * GAP,
        len(columns) * SIZE + (len(columns) - 1) * GAP,
        3,
    )

    def cell(row: int, column: int) -> np.ndarray:
        top, left = row * (SIZE + GAP), column * (SIZE + GAP)
        return grid[top : top + SIZE, left : left + SIZE]

    for row, record in enumerate(metrics["images"]):
        images = {mode: read_png(out / record["files"][mode]) for mode in MODES}
        for column, mode in enumerate(MODES):
            np.testing.assert_array_equal(cell(row, column), images[mode])
        naive_difference = np.abs(images["naive"] - images["single"])
        gain = metrics["grid"]["difference_gain"]
        expected = np.clip(naive_difference * gain, 0, 1)
        np.testing.assert_allclose(cell(row, len(columns) - 1), expected, atol=(gain + 1) / 255)
    assert np.all(grid[SIZE : SIZE + GAP] == 1.0)  # white between the rows


def test_existing_out_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """Exit status 2, and the message is about --out: the (missing) model was never read."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # JAX started
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for existing in (out, out / "keep.txt"):
        argv = ["eval", "--model", str(tmp_path / "nowhere"), "--out", str(existing)]
        assert cli.main(argv) == 2
        stderr = capsys.readouterr().err
        assert "exists" in stderr and "no such folder" not in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_options_are_checked_when_made(tmp_path):
    """The library's refusals (the command makes its options before it loads the model)."""
    out = tmp_path / "out"
    assert EvalOptions(out=str(out)).out == out and not out.exists()
    with pytest.raises(ValueError, match="a seed is repeated"):
        EvalOptions(out=out, seeds=[1, 2, 1])
    with pytest.raises(ValueError, match="2 or more patch devices"):
        EvalOptions(out=out, devices=1)
    with pytest.raises(ValueError, match="at least one prompt"):
        EvalOptions(out=out, prompts=[])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EvalOptions(out=tmp_path / "missing" / "out")
    with pytest.raises(ValueError, match="name them with --compress"):
        EvalOptions(out=out, kv_refresh=2)


def test_codec_runs_beside_the_uncompressed_one(tmp_path):
    """--compress none residual-int4 --kv-refresh 2: both codecs with K/V every 2nd step,
    named after them, beside displaced with K/V every step (what they are compared with)."""
    options = EvalOptions(
        out=tmp_path / "out", devices=4, steps=10, group_norm=["stale"],
        compress=["none", "residual-int4"], kv_refresh=2,
    )  # fmt: skip
    modes = evaluate.mode_configs(options)
    assert list(modes) == [
        "single", "displaced-stale", "displaced-stale+none+kv2",
        "displaced-stale+residual-int4+kv2", "naive",
    ]  # fmt: skip
    plain = modes["displaced-stale"]
    assert (plain.compress, plain.kv_refresh, plain.group_norm) == ("none", 1, "stale")
    for name, codec in [("none", "none"), ("residual-int4", "residual-int4")]:
        run = modes[f"displaced-stale+{name}+kv2"]
        assert run == dataclasses.replace(plain, compress=codec, kv_refresh=2)
    without = evaluate.mode_configs(dataclasses.replace(options, compress=["none"], kv_refresh=1))
    assert list(without) == ["single", "displaced-stale", "naive"]  # none alone adds nothing


def test_invalid_size_is_refused_before_compiling(model, tmp_path):
    result = jaxfusion_command(
        tmp_path / "cache", "eval", "--model", str(model), "--devices", "2", "--height", "8",
        "--out", str(tmp_path / "out"), expect=2,
    )  # fmt: skip
    assert "height=8" in result.stderr and "compiling" not in result.stderr
    assert not (tmp_path / "out").exists()

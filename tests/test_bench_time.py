"""`jaxfusion bench time`: the library's bookkeeping against a scripted clock (fake pipelines,
passed in, whose calls take known times: the medians, step times and speed-ups are then
known exactly), the command's refusals before loading anything, and one real run of the
console script on a tiny random pipeline beside diffusers."""

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from pipelines import SIZE, save_random_pipeline

from jaxfusion import cli, diffusers_backend
from jaxfusion.bench import timing
from jaxfusion.bench.options import TimingOptions
from jaxfusion.pipelines import Request
from sharding.parallel import ParallelConfig

SCRIPT = Path(sys.executable).with_name("jaxfusion")
# Seconds of the scripted calls: a fixed cost and a cost per step per mode.
FIXED = 0.5
PER_STEP = {"single": 0.1, "sync": 0.07, "displaced": 0.04, "torch": 0.3}
COMPILE = 100.0  # added to each warm-up call
OUTLIER = 7.0  # added to the first timed call of each step count: the median drops it


class Clock:
    """time.perf_counter for `timing`, advanced by the fake pipelines' calls."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[tuple[str, int, int]] = []
        self.configs: list[ParallelConfig] = []  # of the jaxfusion calls

    def perf_counter(self) -> float:
        return self.now

    def call(self, mode: str, devices: int, steps: int) -> None:
        seen = self.calls.count((mode, devices, steps))
        extra = COMPILE if seen == 0 else OUTLIER if seen == 1 else 0.0
        self.now += FIXED + PER_STEP[mode] * steps + extra
        self.calls.append((mode, devices, steps))


class FakePipeline:
    """jaxfusion's pipeline as `bench time` uses it; calls are checked as the real one
    checks them (`Request.of`, no option of a model family) and take the clock's scripted
    time."""

    default_guidance_scale = 5.0
    dtype = np.dtype(np.float32)

    def __init__(self, clock: Clock):
        self.clock = clock

    def size(self, height, width):
        return height or SIZE, width or SIZE

    def check_parallel(self, parallel, height, width, guidance):
        parallel.mesh()

    def initial_latents(self, batch, height, width, seed):
        return np.zeros((batch, 4, height // 2, width // 2), np.float32)

    def __call__(self, *args, **kwargs):
        request = Request.of(*args, **kwargs)
        assert not request.conditioning
        parallel = request.parallel
        assert request.height == request.width == SIZE
        self.clock.call(parallel.mode, parallel.devices, request.num_inference_steps)
        self.clock.configs.append(parallel)


TORCH_MODEL = "tiny-diffusers"


@pytest.fixture
def scripted(monkeypatch) -> Clock:
    """A clock, and fake diffusers pipelines (of TORCH_MODEL only) that advance it."""
    clock = Clock()
    torch_pipe = types.SimpleNamespace(device=torch.device("cpu"))
    signature = inspect.signature(diffusers_backend.run_diffusers)

    def load_diffusers_pipeline(path, *, dtype, scheduler):
        assert (path, dtype, scheduler) == (TORCH_MODEL, "float32", None)
        return torch_pipe

    def run_diffusers(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        assert bound.arguments["pipe"] is torch_pipe
        assert bound.arguments["latents"].shape == (1, 4, SIZE // 2, SIZE // 2)
        clock.call("torch", 1, bound.arguments["num_inference_steps"])

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(diffusers_backend, "load_diffusers_pipeline", load_diffusers_pipeline)
    monkeypatch.setattr(diffusers_backend, "run_diffusers", run_diffusers)
    return clock


def bench_time(clock: Clock, **options) -> list[timing.TimingRecord]:
    """`bench time` of the fake pipeline on `clock`, as the library runs it."""
    return timing.run(FakePipeline(clock), TimingOptions(model="tiny", **options))


def test_baseline_steps_leave_displaced_steps_between():
    for steps in range(2, 40):
        synchronous = ParallelConfig().warmup(steps) + 1
        baseline = timing.baseline_steps(steps)
        assert 1 <= baseline < steps
        assert baseline >= min(steps // 2, synchronous)
        if steps > synchronous:  # steps baseline..steps-1 are displaced ones
            assert baseline >= synchronous
    # The default warm-up min(4, max(1, steps // 4)): 1 up to 7 steps, 2 at 10, 4 at 50.
    assert [timing.baseline_steps(n) for n in (2, 3, 5, 6, 10, 50)] == [1, 2, 2, 3, 5, 25]
    assert not timing.displaced_steps(2)
    assert timing.displaced_steps(4) == range(2, 4)
    assert timing.displaced_steps(50) == range(5, 50)
    assert timing.displaced_steps(7, warmup_steps=5) == range(6, 7)


def test_scripted_timings(scripted, tmp_path):
    out = tmp_path / "times.json"
    returned = bench_time(
        scripted, devices=[1, 2], modes=["sync", "displaced"], steps=10, runs=3,
        torch_model=TORCH_MODEL, json=out,
    )  # fmt: skip

    # Each configuration: a warm-up call of 10 and 5 steps, then 3 rounds of both.
    configs = [("single", 1), ("sync", 2), ("displaced", 2), ("torch", 1)]
    assert scripted.calls == [
        (mode, devices, steps) for mode, devices in configs for steps in [10, 5] * 4
    ]
    data = json.loads(out.read_text())
    records = data["records"]
    assert [dataclasses.asdict(r) for r in returned] == records
    assert [(r["backend"], r["mode"], r["devices"]) for r in records] == [
        ("jax", "single", 1), ("jax", "sync", 2), ("jax", "displaced", 2), ("torch", "single", 1),
    ]  # fmt: skip
    image = {mode: FIXED + 10 * step for mode, step in PER_STEP.items()}
    for r, (mode, _) in zip(records, configs, strict=True):
        assert (r["model"], r["height"], r["width"], r["steps"], r["baseline_steps"]) == (
            "tiny", SIZE, SIZE, 10, 5,
        )  # fmt: skip
        assert (r["runs"], r["dtype"], r["step_method"]) == (
            3, "float32", "(median at 10 steps - median at 5) / 5",
        )  # fmt: skip
        assert r["median_image_s"] == pytest.approx(image[mode])
        assert r["median_baseline_image_s"] == pytest.approx(FIXED + 5 * PER_STEP[mode])
        assert r["median_step_s"] == pytest.approx(PER_STEP[mode])
        assert r["speedup_vs_single"] == pytest.approx(image["single"] / image[mode])
        assert r["step_speedup_vs_single"] == pytest.approx(PER_STEP["single"] / PER_STEP[mode])
    platform = jax.devices()[0].platform
    assert {r["platform"] for r in records[:3]} == {platform}
    assert (records[3]["platform"], records[3]["device_kind"]) == ("cpu", "cpu")
    assert ("share this host's" in data["note"]) == (platform == "cpu")
    ratio = image["torch"] / image["single"]
    assert (
        f"diffusers (PyTorch) / jaxfusion single: {ratio:.2f} per image, 3.00 per step"
        in (data["note"])
    )


def test_displaced_without_displaced_steps_and_noise(scripted, tmp_path, monkeypatch):
    """Two steps are both synchronous ones in displaced mode (the default warm-up is at
    least 1); a step count whose medians do not differ gives no step time, and no speed-up
    per step."""
    monkeypatch.setitem(PER_STEP, "displaced", 0.0)
    out = tmp_path / "times.json"
    bench_time(scripted, devices=[1, 2], modes=["displaced"], steps=2, runs=3, json=out)
    data = json.loads(out.read_text())
    single, displaced = data["records"]
    assert single["median_step_s"] == pytest.approx(PER_STEP["single"])
    assert displaced["median_step_s"] is displaced["step_speedup_vs_single"] is None
    assert displaced["speedup_vs_single"] == pytest.approx((FIXED + 0.2) / FIXED)
    assert displaced["warmup_steps"] == 1 and single["warmup_steps"] is None
    assert "steps 0..1 synchronously (the default warm-up of 2 steps): none is" in data["note"]
    assert "a step time is missing" in data["note"]


def test_displaced_once_per_codec(scripted):
    """--compress: one displaced row per codec, each call under its codec and --kv-refresh;
    the other modes once, uncompressed."""
    records = bench_time(
        scripted, devices=[1, 2], modes=["sync", "displaced"], steps=10, runs=1,
        compress=["none", "residual-int4"], kv_refresh=2,
    )  # fmt: skip
    rows = [("single", "none", 1), ("sync", "none", 1)]
    rows += [("displaced", "none", 2), ("displaced", "residual-int4", 2)]
    assert [(r.mode, r.compress, r.kv_refresh) for r in records] == rows
    called = [(p.mode, p.compress, p.kv_refresh) for p in scripted.configs]
    assert called == [row for row in rows for _ in range(4)]  # 2 warm-up + 2 timed calls each
    assert [timing.mode_label(r) for r in records][2:] == [
        "displaced none kv/2", "displaced residual-int4 kv/2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "options, message",
    [
        (["--parallel", "sync", "--compress", "fp8"], "add --parallel displaced"),
        (["--runs", "0"], "--runs 0"),
        (["--steps", "1"], "--steps 1"),
        (["--devices", "0"], "--devices 0"),
        (["--json", "/nowhere/times.json"], "folder /nowhere does not exist"),
    ],
)
def test_refusals_before_loading(tmp_path, capsys, options, message):
    """Exit status 2 and the message about the option: the (missing) model was never read."""
    model = str(tmp_path / "nowhere")
    assert cli.main(["bench", "time", "--model", model, "--devices", "1", *options]) == 2
    error = capsys.readouterr().err
    assert message in error and "no such folder" not in error


@pytest.mark.slow
def test_console_script_on_a_tiny_pipeline(tmp_path):
    """The real pipelines, compiled for 2 and 1 steps on one device, and diffusers. No time
    is checked, so XLA compiles without optimizations (half the time) and PyTorch runs one
    thread (OpenMP threads on a busy machine's cores can wait on each other for seconds)."""
    model = save_random_pipeline(tmp_path / "model", "sd")
    out = tmp_path / "times.json"
    env = dict(
        os.environ,
        JAXFUSION_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        [str(SCRIPT), "bench", "time", "--model", str(model), "--devices", "1", "--steps", "2",
         "--runs", "1", "--torch", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    single = data["records"][0]
    assert [(r["backend"], r["mode"], r["devices"]) for r in data["records"]] == [
        ("jax", "single", 1), ("torch", "single", 1),
    ]  # fmt: skip
    for r in data["records"]:
        assert (r["height"], r["width"], r["steps"], r["baseline_steps"]) == (SIZE, SIZE, 2, 1)
        assert 0 < r["median_image_s"] < math.inf and 0 < r["median_baseline_image_s"] < math.inf
        assert r["median_step_s"] is None or 0 < r["median_step_s"] < math.inf
        assert r["speedup_vs_single"] == single["median_image_s"] / r["median_image_s"]
    assert single["speedup_vs_single"] == 1.0
    assert "diffusers (PyTorch) / jaxfusion single" in data["note"]
    assert "median wall time" in result.stderr and "diffusers" in result.stderr

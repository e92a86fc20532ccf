"""`jaxfusion bench time`: median wall time per image and per denoising step of the full
pipeline (prompt encoding, the denoising loop, VAE decoding) for each configuration of
modes x devices, and optionally of the diffusers (PyTorch) pipeline on the same request.

Per image: the median of `--runs` timed calls after one warm-up call (which compiles).

Per step: a marginal figure, free of a call's fixed costs (text encoders, VAE decoder,
dispatch). Each configuration also runs with fewer steps, `b`, and

    step time = (median time at `steps` steps - median time at `b` steps) / (steps - b).

`b` is half of `steps`, raised to the first displaced step of displaced mode's schedule
(`ParallelConfig.schedule`, with the default warm-up of `steps` steps, kept at `b` steps)
when `steps` has displaced steps: the steps between `b` and `steps` are then displaced
steps in displaced mode (the loop's ordinary steps in the other modes). With fewer steps
displaced mode runs synchronous steps only, and the output says so. The timed calls
alternate between the two step counts, so that a change in the machine's load shifts both
medians alike. A difference at or below zero is timing noise: that step time is left out.

Speed-ups are over jaxfusion on one device (mode single): its median over the row's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxfusion import builtin, diffusers_backend
from jaxfusion.bench.options import TimingOptions
from jaxfusion.display import StageDisplay
from jaxfusion.files import write_text_atomically
from sharding.distributed import is_main_process
from sharding.parallel import ParallelConfig

if TYPE_CHECKING:
    from jaxfusion.pipelines import TextToImagePipeline


@dataclasses.dataclass(frozen=True)
class TimingRecord:
    """One configuration's timings (a JSON record of `bench time`).

    backend: "jax" (jaxfusion) or "torch" (diffusers); platform, device_kind: where it ran.
    median_image_s: the median wall time of one call (one image) at `steps` steps.
    baseline_steps, median_baseline_image_s: the smaller step count and its median.
    median_step_s: the marginal time per step, as `step_method` says; None where the two
        medians differ by timing noise only.
    speedup_vs_single, step_speedup_vs_single: jaxfusion single's median over this row's,
        per image and per step; None without a single row or without step times.
    warmup_steps: displaced mode's W (steps 0..W synchronous, at both step counts); None
        in the other modes.
    compress, kv_refresh: displaced mode's codec and K/V refresh interval
        (`ParallelConfig`); "none" and 1 in the other modes.
    """

    model: str
    height: int
    width: int
    steps: int
    baseline_steps: int
    devices: int
    mode: str
    dtype: str
    backend: str
    platform: str
    device_kind: str
    runs: int
    median_image_s: float
    median_baseline_image_s: float
    median_step_s: float | None
    step_method: str
    speedup_vs_single: float | None = None
    step_speedup_vs_single: float | None = None
    warmup_steps: int | None = None
    compress: str = "none"
    kv_refresh: int = 1


def mode_label(parallel: ParallelConfig | TimingRecord) -> str:
    """The mode, with the codec and the K/V refresh interval where displaced steps use
    them: "displaced", "displaced fp8", "displaced none kv/2"."""
    parts = [parallel.mode]
    if parallel.compress != "none" or parallel.kv_refresh > 1:
        parts.append(parallel.compress)
    if parallel.kv_refresh > 1:
        parts.append(f"kv/{parallel.kv_refresh}")
    return " ".join(parts)


def displaced_steps(steps: int, warmup_steps: int | None = None) -> range:
    """The displaced steps of displaced mode's loop of `steps` steps (none: an empty range),
    from `ParallelConfig.schedule` (warmup_steps None: the default warm-up)."""
    schedule = ParallelConfig(mode="displaced", warmup_steps=warmup_steps).schedule(steps)
    return dict(schedule).get("displaced", range(0))


def baseline_steps(steps: int, warmup_steps: int | None = None) -> int:
    """The smaller step count of the per-step difference: half of `steps`, raised to the
    first displaced step when displaced mode has displaced steps in `steps`."""
    displaced = displaced_steps(steps, warmup_steps)
    return max(steps // 2, displaced.start) if displaced else steps // 2


def configurations(options: TimingOptions) -> list[ParallelConfig]:
    """Mode single on 1 device, each of `options.modes` on more (displaced once per codec of
    `options.compress`, with `options.kv_refresh`); each devices count once; with the
    default warm-up of `options.steps` steps (also for the calls with fewer)."""
    return [
        ParallelConfig(devices=n, mode=mode, **codec).for_steps(options.steps)
        for n in dict.fromkeys(options.devices)
        for mode in (["single"] if n == 1 else options.modes)
        for codec in (
            [dict(compress=c, kv_refresh=options.kv_refresh) for c in options.compress]
            if mode == "displaced"
            else [{}]
        )
    ]


def check(pipe: TextToImagePipeline, options: TimingOptions) -> list[ParallelConfig]:
    """Refuses options that some configuration cannot run (an abstract pipeline is enough:
    nothing compiles); returns the configurations."""
    configs = configurations(options)
    height, width = pipe.size(options.height, options.width)
    guidance = pipe.default_guidance_scale if options.guidance is None else options.guidance
    for parallel in configs:
        pipe.check_parallel(parallel, height, width, guidance > 1.0)
    return configs


def run(
    pipe: TextToImagePipeline, options: TimingOptions, display: StageDisplay | None = None
) -> list[TimingRecord]:
    """`jaxfusion bench time` on `pipe`: checks every configuration, then times each (and
    diffusers on `options.torch_model`); prints a table and the notes (process 0 of a
    multi-process run, where every process takes part in each call), writes the JSON file
    `options.json` asks for, and returns the records."""
    display = display or StageDisplay()
    configs = check(pipe, options)
    height, width = pipe.size(options.height, options.width)
    guidance = pipe.default_guidance_scale if options.guidance is None else options.guidance
    dtype = np.dtype(pipe.dtype).name
    torch_pipe = None
    if options.torch_model is not None:
        with display("loading the diffusers (PyTorch) pipeline"):
            torch_pipe = diffusers_backend.load_diffusers_pipeline(
                options.torch_model, dtype=dtype, scheduler=options.scheduler
            )

    steps, runs = options.steps, options.runs
    small = baseline_steps(steps)
    request = dict(height=height, width=width, guidance_scale=guidance)
    record = functools.partial(
        TimingRecord,
        model=options.model or builtin.NAME,
        height=height,
        width=width,
        steps=steps,
        baseline_steps=small,
        dtype=dtype,
        runs=runs,
        step_method=f"(median at {steps} steps - median at {small}) / {steps - small}",
    )
    device = jax.devices()[0]
    records = []
    for parallel in configs:
        call = functools.partial(
            pipe, options.prompt, scheduler=options.scheduler, parallel=parallel, **request
        )
        label = f"jaxfusion {mode_label(parallel)}, {parallel.devices} device(s)"
        times = measure(call, steps, small, runs, label, display)
        records.append(
            record(
                devices=parallel.devices,
                mode=parallel.mode,
                compress=parallel.compress,
                kv_refresh=parallel.kv_refresh,
                backend="jax",
                platform=device.platform,
                device_kind=device.device_kind,
                warmup_steps=parallel.warmup_steps if parallel.mode == "displaced" else None,
                **times,
            )
        )
    if torch_pipe is not None:
        latents = pipe.initial_latents(1, height, width, seed=0)
        call = functools.partial(
            diffusers_backend.run_diffusers, torch_pipe, options.prompt, latents=latents, **request
        )
        times = measure(call, steps, small, runs, "diffusers (PyTorch)", display)
        platform, kind = torch_device(torch_pipe)
        records.append(
            record(
                devices=1,
                mode="single",
                backend="torch",
                platform=platform,
                device_kind=kind,
                **times,
            )
        )
    records = with_speedups(records)

    note = notes(records, device.platform)
    if is_main_process():
        print_table(records, display)
        display.note(note)
    if options.json:
        text = json.dumps(
            {"note": note, "records": [dataclasses.asdict(r) for r in records]}, indent=2
        )
        write_text_atomically(Path(options.json), text + "\n")
        display.note(f"wrote {options.json}")
    return records


def measure(
    call: Callable[..., object],
    steps: int,
    small: int,
    runs: int,
    label: str,
    display: StageDisplay,
) -> dict[str, float | None]:
    """`call(num_inference_steps=n)` for n = `steps` and `small`: a warm-up call of each,
    then `runs` rounds that time each once -> the medians and the marginal step time (the
    `TimingRecord` fields)."""
    with display(f"{label}: warm-up calls, {steps} and {small} steps"):
        call(num_inference_steps=steps)
        call(num_inference_steps=small)
    times: dict[int, list[float]] = {steps: [], small: []}
    with display(f"{label}: {runs} timed call(s) of each"):
        for _ in range(runs):
            for n in times:
                start = time.perf_counter()
                call(num_inference_steps=n)
                times[n].append(time.perf_counter() - start)
    image, baseline = statistics.median(times[steps]), statistics.median(times[small])
    step = (image - baseline) / (steps - small)
    return dict(
        median_image_s=image,
        median_baseline_image_s=baseline,
        median_step_s=step if step > 0 else None,
    )


def torch_device(torch_pipe: Any) -> tuple[str, str]:
    """(platform, device kind) of a diffusers pipeline: ("cuda", "NVIDIA H100 ..."),
    ("cpu", "cpu")."""
    import torch

    device = torch_pipe.device
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return device.type, kind


def with_speedups(records: list[TimingRecord]) -> list[TimingRecord]:
    """`records` with their speed-ups over the jaxfusion single-device record, if any."""
    single = _single(records)
    if single is None:
        return records
    return [
        dataclasses.replace(
            r,
            speedup_vs_single=single.median_image_s / r.median_image_s,
            step_speedup_vs_single=_ratio(single.median_step_s, r.median_step_s),
        )
        for r in records
    ]


def notes(records: list[TimingRecord], platform: str) -> str:
    """What the figures mean: how they were measured, the CPU caveat, displaced mode
    without displaced steps, missing step times, and diffusers over jaxfusion single."""
    first = records[0]
    lines = [
        f"per image: the median of {first.runs} timed call(s) after a warm-up call (which "
        f"compiles); per step: {first.step_method}, a step's cost without the fixed costs "
        "of a call (text encoders, VAE decoder)."
    ]
    if platform == "cpu":
        lines.append(
            f"CPU: the simulated devices share this host's {os.cpu_count()} cores, so "
            "multi-device times measure the overhead of patch parallelism, not a speed-up."
        )
    displaced = next((r for r in records if r.mode == "displaced"), None)
    if displaced is not None:
        warm, steps = displaced.warmup_steps, first.steps
        kept = displaced_steps(steps, warm)
        rest = f"steps {kept.start}..{steps - 1} are displaced" if kept else "none is displaced"
        lines.append(
            f"displaced mode runs steps 0..{warm} synchronously (the default warm-up of "
            f"{steps} steps): {rest}."
        )
    if any(r.median_step_s is None for r in records):
        lines.append(
            "a step time is missing (-) where the two medians differ by timing noise only: "
            "raise --runs or --steps."
        )
    single = _single(records)
    torch = next((r for r in records if r.backend == "torch"), None)
    if single is not None and torch is not None:
        step = _ratio(torch.median_step_s, single.median_step_s)
        lines.append(
            "diffusers (PyTorch) / jaxfusion single: "
            f"{torch.median_image_s / single.median_image_s:.2f} per image, "
            f"{_format(step, 1, '.2f')} per step."
        )
    return "\n".join(lines)


def print_table(records: list[TimingRecord], display: StageDisplay) -> None:
    from rich.table import Table

    first = records[0]
    table = Table(
        title=f"{first.model}, {first.height}x{first.width}, {first.steps} steps, "
        f"{first.dtype}: median wall time"
    )
    for column in ("backend", "mode", "devices", "device", "per image s", "per step ms",
                   "image speed-up", "step speed-up"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in records:
        device = r.platform if r.device_kind == r.platform else f"{r.platform} ({r.device_kind})"
        table.add_row(
            "jaxfusion" if r.backend == "jax" else "diffusers",
            mode_label(r),
            str(r.devices),
            device,
            f"{r.median_image_s:.3f}",
            _format(r.median_step_s, 1e3, ".1f"),
            _format(r.speedup_vs_single, 1, ".2f"),
            _format(r.step_speedup_vs_single, 1, ".2f"),
        )
    display.console.print(table)


def _single(records: list[TimingRecord]) -> TimingRecord | None:
    return next((r for r in records if r.backend == "jax" and r.mode == "single"), None)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def _format(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)

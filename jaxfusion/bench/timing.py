"""`jaxfusion bench time`: median wall time per image and per denoising step of the full
pipeline (prompt encoding, the denoising loop, VAE decoding) for each configuration of
modes x devices, and optionally of the diffusers (PyTorch) pipeline on the same request.

Per image: the median of `--runs` timed calls after one warm-up call (which compiles).

Per step: a marginal figure, free of a call's fixed costs (text encoders, VAE decoder,
dispatch). Each configuration also runs with fewer steps, `b`, and

    step time = (median time at `steps` steps - median time at `b` steps) / (steps - b).

`b` is half of `steps`, raised to displaced mode's synchronous steps (`warmup_steps` + 1)
when `steps` exceeds them: the steps between `b` and `steps` are then displaced steps in
displaced mode (the loop's ordinary steps in the other modes). With fewer steps displaced
mode runs synchronous steps only, and the output says so. The timed calls alternate
between the two step counts, so that a change in the machine's load shifts both medians
alike. A difference at or below zero is timing noise: that step time is left out.

Speed-ups are over jaxfusion on one device (mode single): its median over the row's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxfusion import diffusers_backend
from jaxfusion.display import StageDisplay
from jaxfusion.files import write_text_atomically
from sharding.parallel import ParallelConfig

WARMUP_STEPS = ParallelConfig().warmup_steps


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


def baseline_steps(steps: int, warmup_steps: int = WARMUP_STEPS) -> int:
    """The smaller step count of the per-step difference: half of `steps`, raised to
    displaced mode's synchronous steps (`warmup_steps` + 1) when `steps` exceeds them."""
    synchronous = warmup_steps + 1
    return max(steps // 2, synchronous) if steps > synchronous else steps // 2


def configurations(devices: list[int], modes: list[str]) -> list[ParallelConfig]:
    """Mode single on 1 device, each of `modes` on more; each devices count once."""
    if min(devices) < 1:
        raise ValueError(f"--devices {min(devices)}: give counts of at least 1")
    return [
        ParallelConfig(devices=n, mode=mode)
        for n in dict.fromkeys(devices)
        for mode in (["single"] if n == 1 else modes)
    ]


def run(args: argparse.Namespace, display: StageDisplay) -> int:
    """`jaxfusion bench time`: checks everything asked, then times each configuration;
    prints a table and writes JSON."""
    from jaxfusion import builtin
    from jaxfusion.cli import load, model_path

    if args.runs < 1:
        raise ValueError(f"--runs {args.runs}: time at least 1 run")
    if args.steps < 2:
        raise ValueError(f"--steps {args.steps}: the time per step needs at least 2 steps")
    if args.json and not Path(args.json).parent.is_dir():
        raise FileNotFoundError(
            f"--json {args.json}: folder {Path(args.json).parent} does not exist"
        )
    configs = configurations(args.devices, args.parallel)
    pipe, _ = load(args, display)
    height, width = pipe.size(args.height, args.width)
    guidance = pipe.default_guidance_scale if args.guidance is None else args.guidance
    for parallel in configs:
        pipe.check_parallel(parallel, height, width, guidance > 1.0)
    torch_pipe = None
    if args.torch:
        with display("loading the diffusers (PyTorch) pipeline"):
            torch_pipe = diffusers_backend.load_diffusers_pipeline(
                model_path(args), dtype=args.dtype, scheduler=args.scheduler
            )

    small = baseline_steps(args.steps)
    request = dict(height=height, width=width, guidance_scale=guidance)
    record = functools.partial(
        TimingRecord,
        model=args.model or builtin.NAME,
        height=height,
        width=width,
        steps=args.steps,
        baseline_steps=small,
        dtype=args.dtype,
        runs=args.runs,
        step_method=f"(median at {args.steps} steps - median at {small}) / {args.steps - small}",
    )
    device = jax.devices()[0]
    records = []
    for parallel in configs:
        call = functools.partial(
            pipe, args.prompt, scheduler=args.scheduler, parallel=parallel, **request
        )
        label = f"jaxfusion {parallel.mode}, {parallel.devices} device(s)"
        times = measure(call, args.steps, small, args.runs, label, display)
        records.append(
            record(
                devices=parallel.devices,
                mode=parallel.mode,
                backend="jax",
                platform=device.platform,
                device_kind=device.device_kind,
                **times,
            )
        )
    if torch_pipe is not None:
        latents = pipe.initial_latents(1, height, width, seed=0)
        call = functools.partial(
            diffusers_backend.run_diffusers, torch_pipe, args.prompt, latents=latents, **request
        )
        times = measure(call, args.steps, small, args.runs, "diffusers (PyTorch)", display)
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
    print_table(records, display)
    display.note(note)
    if args.json:
        text = json.dumps(
            {"note": note, "records": [dataclasses.asdict(r) for r in records]}, indent=2
        )
        write_text_atomically(Path(args.json), text + "\n")
        display.note(f"wrote {args.json}")
    return 0


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
    if first.steps <= WARMUP_STEPS + 1 and any(r.mode == "displaced" for r in records):
        lines.append(
            f"displaced mode runs steps 0..{WARMUP_STEPS} synchronously: with {first.steps} "
            "steps it has no displaced step."
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
            r.mode,
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

"""`jaxfusion eval`: how close displaced patch parallelism (with each GroupNorm rule) and the
naive split come to the single-device image, from the same initial noise: PSNR and SSIM per
(prompt, seed) and their means, every image as a PNG, and a grid with difference maps."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxfusion.bench.options import EvalOptions
from jaxfusion.display import StageDisplay
from jaxfusion.files import write_text_atomically
from jaxfusion.images import grid, psnr, save_image, ssim
from sharding.distributed import is_main_process
from sharding.parallel import ParallelConfig

if TYPE_CHECKING:
    from jaxfusion.pipelines import TextToImagePipeline

REFERENCE = "single"
# The difference maps of the grid show |image - single| times this, clipped to [0, 1].
DIFFERENCE_GAIN = 4


def check(pipe: TextToImagePipeline, options: EvalOptions) -> dict[str, ParallelConfig]:
    """Refuses options that some mode cannot run (an abstract pipeline is enough: nothing
    compiles); returns the modes by name."""
    height, width = pipe.size(options.height, options.width)
    guidance = pipe.default_guidance_scale if options.guidance is None else options.guidance
    modes = mode_configs(options)
    for parallel in modes.values():
        pipe.check_parallel(parallel, height, width, guidance > 1.0)
    return modes


def run(
    pipe: TextToImagePipeline, options: EvalOptions, display: StageDisplay | None = None
) -> dict[str, Any]:
    """Generates every (prompt, seed) of `options` with each mode from the same latents, one
    batch (one compiled program) per mode, writes the images, `metrics.json` and `grid.png`
    to `options.out` (if any), prints the mean metrics (process 0 of a multi-process run,
    where every process takes part in each batch), and returns them as `metrics.json` holds
    them (but with an infinite PSNR as inf, not null)."""
    display = display or StageDisplay()
    out, prompts = options.out, list(options.prompts)
    modes = check(pipe, options)
    height, width = pipe.size(options.height, options.width)
    guidance = pipe.default_guidance_scale if options.guidance is None else options.guidance

    # One row of the batch per (prompt, seed), its noise drawn alone: the same in every mode,
    # and whatever else is in the batch.
    pairs = [(i, seed) for i in range(len(prompts)) for seed in options.seeds]
    latents = np.concatenate([pipe.initial_latents(1, height, width, s) for _, s in pairs])
    images = {}
    for name, parallel in modes.items():
        display.note(f"[bold]{name}[/bold]: {len(pairs)} image(s) on {parallel.patches} device(s)")
        images[name] = pipe(
            [prompts[i] for i, _ in pairs],
            height=height,
            width=width,
            num_inference_steps=options.steps,
            guidance_scale=guidance,
            latents=latents,
            scheduler=options.scheduler,
            parallel=parallel,
            stage=display,
        )

    compared = [name for name in modes if name != REFERENCE]
    codecs = {name: f"displaced-{options.group_norm[0]}" for name in modes if "+" in name}
    records = [
        dict(
            prompt_index=i,
            prompt=prompts[i],
            seed=seed,
            files={name: f"images/p{i}-s{seed}-{name}.png" for name in modes},
            metrics={name: compare(images[name][k], images[REFERENCE][k]) for name in compared},
            against_uncompressed={
                name: compare(images[name][k], images[plain][k]) for name, plain in codecs.items()
            },
        )
        for k, (i, seed) in enumerate(pairs)
    ]
    means = {
        name: {
            metric: float(np.mean([r["metrics"][name][metric] for r in records]))
            for metric in ("psnr_db", "ssim")
        }
        for name in compared
    }
    against_uncompressed = {
        name: {
            metric: float(np.mean([r["against_uncompressed"][name][metric] for r in records]))
            for metric in ("psnr_db", "ssim")
        }
        for name in codecs
    }
    metrics = dict(
        config=dict(
            model=options.model or "built-in",
            height=height,
            width=width,
            steps=options.steps,
            guidance_scale=guidance,
            scheduler=options.scheduler or pipe.scheduler_config["_class_name"],
            dtype=np.dtype(pipe.dtype).name,
            prompts=prompts,
            seeds=list(options.seeds),
            modes={name: dataclasses.asdict(parallel) for name, parallel in modes.items()},
        ),
        reference=REFERENCE,
        psnr_note="null: identical to the reference (infinite PSNR)",
        mean=means,
        mean_against_uncompressed=against_uncompressed,
        images=records,
        grid=dict(
            rows=[f"p{i}-s{seed}" for i, seed in pairs],
            columns=[*modes, *(difference_label(name) for name in compared)],
            difference_gain=DIFFERENCE_GAIN,
        ),
    )
    if out is not None:
        files = f"{len(pairs) * len(modes)} images, metrics.json and grid.png"
        with display(f"writing {files} to {out}"):
            write_outputs(out, images, metrics)
    if not is_main_process():
        return metrics
    for name, mean in against_uncompressed.items():
        display.note(f"{name} against {codecs[name]}: {mean['psnr_db']:.2f} dB, {mean['ssim']:.4f}")
    print_table(means, modes, display)
    if out is not None:
        columns = " | ".join(metrics["grid"]["columns"])
        display.note(f"{out / 'grid.png'}: one row per (prompt, seed); columns: {columns}")
    return metrics


def mode_configs(options: EvalOptions) -> dict[str, ParallelConfig]:
    """The reference first: single; displaced-RULE per GroupNorm rule; displaced-RULE+CODEC
    per codec of `options.compress` but none (the first rule), also compared with
    displaced-RULE; with `options.kv_refresh` K > 1 these are displaced-RULE+CODEC+kvK, none
    included; naive (on `options.devices` each)."""
    modes = {REFERENCE: ParallelConfig(devices=1, mode="single")}
    for rule in options.group_norm:
        modes[f"displaced-{rule}"] = ParallelConfig(
            devices=options.devices,
            mode="displaced",
            group_norm=rule,
            warmup_steps=options.warmup_steps,
        ).for_steps(options.steps)
    plain = f"displaced-{options.group_norm[0]}"
    refresh = f"+kv{options.kv_refresh}" if options.kv_refresh > 1 else ""
    for codec in options.compress:
        if codec != "none" or refresh:
            modes[f"{plain}+{codec}{refresh}"] = dataclasses.replace(
                modes[plain], compress=codec, kv_refresh=options.kv_refresh
            )
    modes["naive"] = ParallelConfig(
        devices=options.devices, mode="naive", naive_split=options.naive_split
    )
    return modes


def compare(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The metrics of one image against its reference."""
    return dict(psnr_db=psnr(image, reference), ssim=ssim(image, reference))


def difference_label(name: str) -> str:
    """The grid's name for the difference map of mode `name`."""
    return f"abs({name} - {REFERENCE}) x{DIFFERENCE_GAIN}"


def difference(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|image - reference| per channel times DIFFERENCE_GAIN, clipped to [0, 1]."""
    return np.clip(np.abs(image - reference) * DIFFERENCE_GAIN, 0.0, 1.0)


def write_outputs(out: Path, images: dict[str, np.ndarray], metrics: dict) -> None:
    """Every image (the files `metrics` names), `grid.png` (its rows and columns, as `metrics`
    says) and `metrics.json` into `out`, each file written atomically."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, record in enumerate(metrics["images"]):
        for name, file in record["files"].items():
            save_image(images[name][k], out / file)
    compared = list(metrics["mean"])
    rows = [
        [
            *(images[name][k] for name in images),
            *(difference(images[name][k], images[REFERENCE][k]) for name in compared),
        ]
        for k in range(len(metrics["images"]))
    ]
    save_image(grid(rows), out / "grid.png")
    text = json.dumps(finite_or_null(metrics), indent=2) + "\n"
    write_text_atomically(out / "metrics.json", text)


def finite_or_null(value: Any) -> Any:
    """`value` (nested dicts and lists) with every infinite float replaced by None, which
    JSON can hold."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_null(item) for item in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def print_table(
    means: dict[str, dict[str, float]], modes: dict[str, ParallelConfig], display: StageDisplay
) -> None:
    from rich.table import Table

    table = Table(title=f"mean quality against {REFERENCE} (PSNR: higher is closer, SSIM: 1 equal)")
    for column in ("mode", "devices", "PSNR dB", "SSIM"):
        table.add_column(column, justify="right")
    for name, mean in means.items():
        table.add_row(
            name, str(modes[name].patches), f"{mean['psnr_db']:.2f}", f"{mean['ssim']:.4f}"
        )
    display.console.print(table)

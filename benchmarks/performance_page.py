"""Regenerates docs/performance.md, the results page (never edit it by hand), from the raw
results in docs/results/; `--run` first runs the measurements that write them.

    python benchmarks/performance_page.py --run                 # measure everything, render
    python benchmarks/performance_page.py --run --only eval     # remeasure some parts, render
    python benchmarks/performance_page.py                       # render from what exists

Parts: analysis (bench analyze: the SDXL step's per-device cost, from shapes alone), time
(bench time: the built-in model, and diffusers), eval (PSNR/SSIM on 4 and 8 devices),
few_step (bench time of a 4-step run), sizes (bench analyze at SDXL's training sizes and
4K UHD, eval at a height that does not split into equal slabs), machine (machine.json, also
written whenever another part runs). The few-step warm-up sweep's
docs/results/few_step_warmup.json is written by `python benchmarks/few_step_warmup.py`
(FEW_STEP_WARMUP). The GPU check's
benchmarks/results/gpu_check.json is shown when present (`bash benchmarks/gpu_check.sh
benchmarks/results` on a machine with an NVIDIA GPU writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from jaxfusion.files import write_text_atomically
from jaxfusion.pipelines.stable_diffusion_xl import TRAINING_SIZES
from sharding.split import Split

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("analysis", "time", "eval", "few_step", "sizes", "machine")
EVAL_DEVICES = (4, 8)
# SDXL's training sizes and 4K UHD: heights that split into unequal slabs; compiled on 1-8
# devices at 4K, and at the training sizes on the counts where they split unequally (8, and
# 4 for three of them; on 2 all split equally), whose slabs on 2, 4 and 8 the section gives
# from the split rule (`sharding.split`, no compile).
SDXL_SIZES = ((2160, 3840), *TRAINING_SIZES)
UNEQUAL_ON_4 = {(1216, 832), (832, 1216), (1344, 768)}
SIZES_DEVICES = ("1 2 4 8", *["4 8" if size in UNEQUAL_ON_4 else "8" for size in TRAINING_SIZES])
SPLIT_DEVICE_COUNTS = (2, 4, 8)
UNEVEN_EVAL = (248, 256)  # the built-in model: 62 latent rows, unequal slabs on 4 and 8
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_CHECK = "bash benchmarks/gpu_check.sh benchmarks/results"
FEW_STEP_WARMUP = "python benchmarks/few_step_warmup.py --json docs/results/few_step_warmup.json"
CODEC_TRAFFIC = "python benchmarks/codec_traffic.py --sizes 2048 3840 --devices 8"
CODEC_EVAL = (
    "eval --height 256 --width 256 --steps 25 --devices {n} --gn corrected --compress none fp8 "
    "int8 residual-int4 residual-int2 residual-1bit --out DIR && cp DIR/metrics.json "
    "docs/results/codecs_eval_builtin_256_{n}dev.json"
)
# The denoising loop compiled for real accelerators (bench analyze --target), per target and
# C: 8 x H100 at every size with its one-device rows (the speed-up); TPU v5e-8 on 8 chips
# (each SDXL compile takes 15-40 minutes and up to 10 GB here: run one at a time).
TARGET_RUNS = {
    (target, cfg): (
        f"bench analyze --model sdxl --height {sizes} {devices} --dtype bfloat16 "
        f"--target {target} --json docs/results/targets/sdxl-{target}-c{cfg}.json "
        "--schedule docs/results/targets"
    )
    for target, cfg, sizes, devices in (
        ("h100-8", 1, "1024 2048 3840", "--devices 1 8"),
        ("h100-8", 2, "1024 2048 3840", "--devices 8 --cfg-parallel"),
        ("v5e-8", 1, "1024 2048 3840", "--devices 8"),
        ("v5e-8", 2, "1024 2048 3840", "--devices 8 --cfg-parallel"),
    )
}
# DistriFusion's figures (../shared/DESIGN.md section 5), all SDXL with 50-step DDIM on A100s.
PAPER_ELEMENTS_8 = {1024: 0.42, 2048: 1.48, 3840: 5.38}  # Table 2: patch parallel, G per step
PAPER_PSNR = {(4, "displaced-corrected"): 23.0, (8, "displaced-corrected"): 22.0, (8, "naive"): 7.7}
PAPER_LATENCY = """resolution | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs
1024x1024 | 5.02 s | 3.35 s (1.5x) | 2.26 s (2.2x) | 1.77 s (2.8x)
2048x2048 | 23.7 s | 13.3 s (1.8x) | 7.60 s (3.1x) | 4.81 s (4.9x)
3840x3840 | 140 s | 76.6 s (1.8x) | 41.3 s (3.4x) | 22.9 s (6.1x)"""


def shown(path: Path) -> str:
    """`path` relative to the repository root when inside it (the commands run from there)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def commands(results: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    """Per part: (the arguments of `jaxfusion`, the outputs they write) for each command."""
    a, png, t = (results / name for name in ("analysis.json", "analysis.png", "time.json"))
    few = results / "few_step_time.json"

    def q(path: Path) -> str:
        return shlex.quote(shown(path))

    return {
        "analysis": [
            (
                "bench analyze --model sdxl --height 1024 2048 3840 --devices 1 2 4 8 "
                f"--dtype bfloat16 --json {q(a)} --plot {q(png)}",
                [a, png],
            )
        ],
        "time": [
            (
                "bench time --height 128 --width 128 --devices 1 2 4 --steps 10 --runs 3 "
                f"--torch --json {q(t)}",
                [t],
            )
        ],
        "eval": [
            (
                f"eval --height 256 --width 256 --devices {n} --steps 25 "
                f"--out {q(results / f'eval-{n}')}",
                [results / f"eval-{n}"],
            )
            for n in EVAL_DEVICES
        ],
        "few_step": [
            (
                "bench time --height 128 --width 128 --devices 1 2 4 --parallel sync displaced "
                f"--steps 4 --scheduler euler_a --guidance 0 --runs 5 --json {q(few)}",
                [few],
            )
        ],
        "sizes": [
            (
                f"bench analyze --model sdxl --height {h} --width {w} --devices {devices} "
                f"--dtype bfloat16 --json {q(results / 'sizes' / f'sdxl-{h}x{w}.json')}",
                [results / "sizes" / f"sdxl-{h}x{w}.json"],
            )
            for (h, w), devices in zip(SDXL_SIZES, SIZES_DEVICES, strict=True)
        ]
        + [
            (
                f"eval --height {UNEVEN_EVAL[0]} --width {UNEVEN_EVAL[1]} --devices {n} "
                f"--steps 25 --out {q(results / f'eval-uneven-{n}')}",
                [results / f"eval-uneven-{n}"],
            )
            for n in EVAL_DEVICES
        ],
    }


def command_text(arguments: str) -> str:
    """The command line as the page shows it."""
    return f"jaxfusion {arguments}"


def run_parts(parts: list[str], results: Path, missing_only: bool = False) -> list[str]:
    """Runs the commands of `parts` from the repository root, each printed first, after
    removing its earlier outputs (the commands refuse to overwrite), then writes
    machine.json; returns the commands that failed. With `missing_only`, only the commands
    some of whose outputs do not exist (to finish a part that was stopped)."""
    results.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).with_name("jaxfusion")
    failed, finished = [], {}
    for part, runs in commands(results).items():
        if part not in parts:
            continue
        for arguments, outputs in runs:
            if missing_only and all(output.exists() for output in outputs):
                continue
            for output in outputs:
                if output.is_dir():
                    shutil.rmtree(output)
                else:
                    output.unlink(missing_ok=True)
                output.parent.mkdir(parents=True, exist_ok=True)
            print(f"$ {command_text(arguments)}", flush=True)
            if subprocess.run([executable, *shlex.split(arguments)], cwd=ROOT).returncode:
                failed.append(command_text(arguments))
        if not any(command_text(a) in failed for a, _ in runs):
            finished[part] = utc_now()
    write_machine(results / "machine.json", finished)
    return failed


def utc_now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_machine(path: Path, finished: dict[str, str]) -> None:
    """machine.json: this machine, the software, the commit, and when each part last ran
    successfully (`finished`, merged over the earlier file's)."""
    earlier, _ = load_json(path)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    git = ["git", "rev-parse", "--short", "HEAD"]
    try:
        commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True)
        changed = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = bool(subprocess.run(changed, cwd=ROOT, capture_output=True, text=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        commit = dirty = None
    machine = dict(
        date=utc_now(),
        platform=platform.platform(),
        processor=names[0] if names else platform.processor() or None,
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        **{name: version(name) for name in ("jax", "jaxlib", "torch")},
        commit=commit.stdout.strip() if commit else None,
        uncommitted_changes=dirty,
        parts={**((earlier or {}).get("parts") or {}), **finished},
    )
    text = json.dumps(machine, indent=2) + "\n"
    write_text_atomically(path, text)


def version(package: str) -> str | None:
    """An installed package's version, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_json(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None), or (None, why there is none)."""
    if not path.is_file():
        return None, f"`{shown(path)}` does not exist yet"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as error:
        return None, f"`{shown(path)}` could not be read ({error})"


def table(header: str, rows: list[str]) -> str:
    """A Markdown table from "a | b" strings, the columns right-aligned."""
    columns = header.count("|") + 1
    return "\n".join([f"| {header} |", "|" + "---:|" * columns, *(f"| {r} |" for r in rows)])


def num(value: float | None, spec: str, scale: float = 1.0) -> str:
    """`value * scale` formatted, or an em dash for None."""
    return "—" if value is None else format(value * scale, spec)


def code(lines: list[str]) -> str:
    """A fenced code block."""
    return "\n".join(["```", *lines, "```"])


def produced_by(runs: list[tuple[str, list[Path]]], machine: dict, part: str) -> list[str]:
    """The commands that produced a section, and when (from machine.json)."""
    when = (machine.get("parts") or {}).get(part)
    lines = [command_text(arguments) for arguments, _ in runs]
    return [f"Produced{f' on {when}' if when else ''} by:", code(lines)]


def missing(problem: str, lines: list[str], part: str | None = None) -> list[str]:
    """The body of a section whose input is missing: what to run to produce it."""
    rerun = f" (or `python benchmarks/performance_page.py --run --only {part}`)" if part else ""
    return [f"_No results: {problem}._ To produce them, run{rerun}:", code(lines)]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Where the page and its inputs are, and machine.json's contents ({} without one)."""

    results: Path
    page: Path
    gpu_check: Path
    machine: dict


def link(target: Path, page: Path) -> str:
    """`target` relative to the page's folder, for a Markdown link."""
    return Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()


def analysis_section(inputs: Inputs) -> list[str]:
    """The per-device cost of one SDXL step, received elements beside the paper's Table 2."""
    results, page, machine = inputs.results, inputs.page, inputs.machine
    blocks: list[str] = []
    runs = commands(results)["analysis"]
    records, problem = load_json(results / "analysis.json")
    if problem:
        return blocks + missing(problem, [command_text(a) for a, _ in runs], "analysis")
    rows = []
    for r in records:
        giga = ITEMSIZE.get(r["dtype"], 4) * 1e9  # bytes per G elements
        ours, ref = r["comm_bytes_per_device_step"], r["comm_bytes_reference_per_device_step"]
        paper = None
        if (r["model"], r["devices"], r["cfg"], r["height"]) == ("sdxl", 8, 1, r["width"]):
            paper = PAPER_ELEMENTS_8.get(r["height"])
        rows.append(
            f"{r['height']}x{r['width']} | {r['devices']} (C={r['cfg']}) | {r['mode']} | "
            f"{num(r['flops_per_device_step'], '.2f', 1e-12)} | "
            f"{num(r['flops_per_device_step'] / r['flops_single_step'], '.3f')} | "
            f"{num(ours, ',.1f', 1e-6)} | {num(ref, ',.1f', 1e-6)} | "
            f"{num(ours / ref if ref else None, '.3f')} | {num(ours / giga, '.3f')} | "
            f"{num(ref / giga, '.3f')} | {num(paper, '.2f')} | "
            f"{num(r.get('memory_bytes_generation_per_device'), '.2f', 1e-9)} | "
            f"{num(r.get('weights_bytes_per_device'), '.2f', 1e-9)} | "
            f"{num(r.get('temp_bytes_generation_per_device'), '.2f', 1e-9)} | "
            f"{num(r['stale_bytes_per_device'], '.2f', 1e-9)} | "
            f"{num(r['memory_bytes_per_device'] or None, '.2f', 1e-9)}"
        )
    first = records[0] if records else {}
    blocks += produced_by(runs, machine, "analysis")
    blocks.append(
        f"Model {first.get('model')}, {first.get('dtype')}, the CFG batch of 2 on every device "
        "(C=1), compiled from shapes alone for simulated devices. Received: the bytes one "
        "device receives per step, ours from the traced program (halos to the neighbours "
        "only, the latent stays sharded) and the reference PyTorch scheme's for the same step "
        "(all-gathers); also in G elements (bytes over the dtype's size), the unit of the "
        "paper's Table 2, whose patch-parallel figures on 8 A100s stand beside (**the "
        "paper's numbers, not ours**). TFLOPs: the step with `xla` attention (cost analysis "
        "counts a loop's body once). Run: the memory of the whole generation per device, "
        "what a device needs (text encoders, warm-up and displaced loops, VAE decode split "
        "by rows), = weights (every network, replicated) + run temporaries (the stale "
        "buffers among them: the buffers a displaced step keeps from the step before, as of "
        "that run; the compressed exchange's section below traces today's) + the request "
        "and the image slab. Step alone: one step compiled as a program of its own "
        "(arguments, outputs and temporaries, with the attention kernel `auto` picks: "
        "chunked for long sequences on this CPU); not part of run, and it can exceed it. "
        f"{first.get('attention', 'xla')} attention; — where not measured."
    )
    header = (
        "size | devices | mode | TFLOPs/device | ÷ single | received MB | reference MB | "
        "ours ÷ ref | ours G elem | ref G elem | paper G elem (8 GPUs) | run GB | "
        "weights GB | run temp GB | stale GB | step alone GB"
    )
    blocks.append(table(header, rows))
    if (results / "analysis.png").is_file():
        blocks.append(f"![FLOPs and traffic per device]({link(results / 'analysis.png', page)})")
    return blocks


MEMORY_TABLE = "python benchmarks/memory_table.py"


def memory_section(inputs: Inputs) -> list[str]:
    """Temporaries of the SDXL UNet step and VAE decode on one device, per attention kernel."""
    path = inputs.results / "memory_table.json"
    data, problem = load_json(path)
    if problem:
        return missing(problem, [MEMORY_TABLE])
    blocks = ["Produced by:", code([data.get("command", MEMORY_TABLE)])]
    blocks.append(
        f"{data['dtype']}, compiled from shapes for this CPU: `memory_analysis()` "
        "temporaries on one device. `xla` stores the float32 attention logits, as every "
        "attention did before the attention kernels; `auto` is the default now. The issue's "
        "figures (measured before, with xla) stand beside."
    )
    rows = [
        f"{r['model']} | {r['size']} | {r['attention']} | {num(r['temp_bytes'], '.1f', 1e-9)} | "
        f"{num(r.get('issue_temp_gb'), '.1f')}"
        for r in data["records"]
    ]
    blocks.append(table("program | size | attention | temporaries GB | issue's GB", rows))
    return blocks


def time_section(inputs: Inputs) -> list[str]:
    """Median times per image and per step, with the paper's A100 latencies beside."""
    results, machine = inputs.results, inputs.machine
    blocks: list[str] = []
    runs = commands(results)["time"]
    data, problem = load_json(results / "time.json")
    if problem:
        blocks += missing(problem, [command_text(a) for a, _ in runs], "time")
    else:
        records = data["records"]
        if any(r["platform"] == "cpu" for r in records):
            blocks.append(
                "> **Measured on CPU: these are not speed-ups.** The simulated devices share "
                "one host's cores, so the multi-device rows show the overhead of patch "
                "parallelism. The paper's table below is what a GPU run should show."
            )
        first = records[0]
        blocks += produced_by(runs, machine, "time")
        blocks.append(
            f"Model {first['model']}, {first['height']}x{first['width']}, {first['steps']} "
            f"steps, {first['dtype']}, median of {first['runs']} timed runs. From the JSON:"
        )
        blocks += timing_table(data)
        single = next((r for r in records if r["backend"] == "jax" and r["mode"] == "single"), None)
        torch = next((r for r in records if r["backend"] == "torch"), None)
        if single and torch:
            step = None
            if single["median_step_s"] and torch["median_step_s"]:
                step = torch["median_step_s"] / single["median_step_s"]
            blocks.append(
                "diffusers (PyTorch) ÷ jaxfusion single (torch/jax time): "
                f"{torch['median_image_s'] / single['median_image_s']:.2f} per image, "
                f"{num(step, '.2f')} per step."
            )
    blocks.append(
        "**The paper's numbers, not ours** (DistriFusion: SDXL, 50-step DDIM, one image, A100s "
        "with NVLink, CUDA graphs, no CFG split; seconds per image, speed-up over 1 GPU):"
    )
    lines = PAPER_LATENCY.splitlines()
    return [*blocks, table(lines[0], lines[1:])]


def timing_table(data: dict) -> list[str]:
    """A `bench time` JSON's note (less the diffusers ratio) and its table."""
    note = data.get("note", "").splitlines()
    note = [line for line in note if not line.startswith("diffusers (PyTorch)")]
    rows = [
        f"{'jaxfusion' if r['backend'] == 'jax' else 'diffusers (PyTorch)'} | {r['mode']} | "
        f"{r['devices']} | {device(r['platform'], r['device_kind'])} | "
        f"{num(r['median_image_s'], '.3f')} | {num(r['median_step_s'], '.1f', 1e3)} | "
        f"{num(r['speedup_vs_single'], '.2f')} | {num(r['step_speedup_vs_single'], '.2f')}"
        for r in data["records"]
    ]
    header = "backend | mode | devices | device | per image s | per step ms | image speed-up"
    return ["\n".join("> " + line for line in note), table(header + " | step speed-up", rows)]


def few_step_section(inputs: Inputs) -> list[str]:
    """A 4-step run's times per mode, and the warm-up sweep the default warm-up rests on."""
    results, machine = inputs.results, inputs.machine
    blocks = [
        "Few-step models (SDXL-Turbo/Lightning, LCM-LoRA) run 1-8 steps, where the warm-up "
        "of displaced mode is a large share of the run (the reference implementation got "
        "slower on 2 GPUs than on 1 for this reason, its issue #27). Unless `--warmup-steps` "
        "says otherwise, displaced mode runs steps 0..W synchronously with W = min(4, max(1, "
        "steps // 4)) (`sharding.parallel.default_warmup_steps`): 4 from 16 steps on (50-step "
        "runs as in the paper), 2 at 8-11 steps, 1 below 8. So a 4-step run has 2 "
        "synchronous and 2 displaced steps, and any run of 3 steps or more has displaced "
        "steps; W = 0 (only step 0 synchronous) is never the default: the sweep below "
        "measures what it costs."
    ]
    runs = commands(results)["few_step"]
    data, problem = load_json(results / "few_step_time.json")
    if problem:
        blocks += missing(problem, [command_text(a) for a, _ in runs], "few_step")
    else:
        first = data["records"][0]
        blocks += produced_by(runs, machine, "few_step")
        blocks.append(
            f"Model {first['model']}, {first['height']}x{first['width']}, {first['steps']} steps "
            "of Euler ancestral without guidance (the SDXL-Turbo recipe; the built-in model is "
            f"not distilled, which changes no time), {first['dtype']}, median of "
            f"{first['runs']} timed runs. On CPU the simulated devices share the cores: the "
            "rows show the overhead of patch parallelism, not a speed-up. From the JSON:"
        )
        blocks += timing_table(data)
    sweep, problem = load_json(results / "few_step_warmup.json")
    if problem:
        return blocks + missing(problem, [FEW_STEP_WARMUP])
    blocks += ["Produced by:", code([sweep.get("command", FEW_STEP_WARMUP)])]
    blocks.append(
        f"Each row: `{sweep['eval_command']}` (the built-in model's own scheduler, Euler, "
        "with guidance 5), the mean over its images of displaced mode (corrected GroupNorm) "
        "against single; naive (no exchange) beside as the floor. Default: the warm-up "
        f"the rule gives for that step count. Run {sweep['date']}."
    )
    rows = [
        f"{r['steps']} | {r['warmup_steps']}{' (default)' if r['default'] else ''} | "
        f"{r['warmup_steps'] + 1} + {r['displaced_steps']} | {num(r['psnr_db'], '.2f')} | "
        f"{num(r['ssim'], '.4f')} | {num(r['naive_psnr_db'], '.2f')}"
        for r in sweep["records"]
    ]
    header = "steps | W | synchronous + displaced steps | PSNR dB | SSIM | naive PSNR dB"
    return [*blocks, table(header, rows)]


def codec_section(inputs: Inputs) -> list[str]:
    """Each codec's traffic and stale memory (SDXL, traced) and its quality (built-in eval)."""
    results = inputs.results
    traffic, problem = load_json(results / "codec_traffic.json")
    if problem:
        return missing(problem, [CODEC_TRAFFIC])
    blocks = [
        "What displaced steps exchange and keep, per codec (`--compress`). Traffic and stale "
        "memory per device per step from the traced SDXL step (no compile; the codecs' "
        "packed payloads as sent), against the reference PyTorch scheme and against "
        "`none`. Projected step times are a model, not a measurement: the step's FLOPs as "
        "`bench analyze` measured them (docs/results/analysis.json) at "
        f"{traffic['records'][0].get('projected_step_model', {}).get('device_tflops')} TFLOP/s, "
        "plus the bytes over the link, without overlap. Produced by:",
        code([traffic["command"]]),
    ]
    links = list(
        traffic["records"][0].get("projected_step_model", {}).get("step_s_by_link_gbs", {})
    )
    rows = []
    for r in traffic["records"]:
        projected = r.get("projected_step_model", {}).get("step_s_by_link_gbs", {})
        rows.append(
            f"{r['size']} | {r['devices']} | {r['compress']} | "
            f"{num(r['comm_bytes_per_device_step'], '.3f', 1e-9)} | "
            f"{num(r['of_reference'], '.3f')} | "
            f"{num(r['of_none'], '.3f')} | {num(r['stale_bytes_per_device'], '.2f', 1e-9)} | "
            f"{num(r['stale_of_none'], '.3f')} | "
            + " | ".join(num(projected.get(gbs), ".2f") for gbs in links)
        )
    header = (
        "size | devices | codec | GB/step | of reference | of none | stale GB | stale of none | "
        + " | ".join(f"step s at {gbs} GB/s" for gbs in links)
    )
    blocks.append(table(header, rows))
    for n in EVAL_DEVICES:
        metrics, problem = load_json(results / f"codecs_eval_builtin_256_{n}dev.json")
        if problem:
            blocks += missing(problem, [command_text(CODEC_EVAL.format(n=n))])
            continue
        blocks += [
            f"Quality on {n} devices, the built-in model at 256x256, 25 steps, "
            f"{len(metrics['images'])} images (4 prompts x 2 seeds): the mean PSNR/SSIM "
            "against single, and against uncompressed displaced (the codec's own cost). "
            "Produced by:",
            code([command_text(CODEC_EVAL.format(n=n))]),
        ]
        mean, against = metrics["mean"], metrics["mean_against_uncompressed"]
        base = mean["displaced-corrected"]["psnr_db"]
        rows = []
        for mode, value in mean.items():
            if not mode.startswith("displaced"):
                continue
            codec = mode.partition("+")[2] or "none"
            other = against.get(mode, {})
            rows.append(
                f"{codec} | {num(value['psnr_db'], '.2f')} | {num(value['ssim'], '.4f')} | "
                f"{num(value['psnr_db'] - base, '+.2f')} | {num(other.get('psnr_db'), '.2f')}"
            )
        header = "codec | PSNR dB vs single | SSIM vs single | change dB | PSNR dB vs none"
        blocks.append(table(header, rows))
    return blocks


def targets_section(inputs: Inputs) -> list[str]:
    """The 50-step loop compiled for each real target by its own compiler: memory per chip,
    the displaced loop's hidden exchange and the projected step (a model, not a measurement)."""
    blocks = [
        "The 50-step denoising loop of SDXL (bfloat16) compiled on a CPU-only machine for "
        "real accelerators by their own compilers (deviceless ahead-of-time compilation: "
        "nothing ran on a device), read from the compiled schedule. Hidden: the share of the "
        "displaced step's collective bytes with at least a tenth of the step's compute "
        "scheduled between their start and done, and enough of it for their transfer. Times "
        "are the model of `jaxfusion/bench/overlap.py` (the chip's peak throughput, one "
        "direction of its interconnect), not measurements; speed-up: over the same target's "
        "one-device step. FLOPs are the matmuls and convolutions the schedule reader finds "
        "(`jaxfusion/bench/schedule.py`): on GPU the cuDNN attention kernels count 0 (their "
        "custom calls are not read); on TPU attention's batched matmuls are read too (XLA:TPU "
        "writes them as convolutions with dilated batch windows)."
    ]
    header = (
        "size | devices | step | memory GiB | of HBM GiB | TFLOP/step | exchange MB | hidden | "
        "compute ms | exposed ms | step ms | speed-up"
    )
    for target in dict.fromkeys(target for target, _ in TARGET_RUNS):
        runs = [(cfg, TARGET_RUNS[target, cfg]) for t, cfg in TARGET_RUNS if t == target]
        rows, problems = [], []
        for cfg, _ in runs:
            path = inputs.results / "targets" / f"sdxl-{target}-c{cfg}.json"
            records, problem = load_json(path)
            if problem:
                problems.append(problem)
                continue
            for r in records:
                rows.append(
                    f"{r['height']}x{r['width']} | {r['devices']} (C={r['cfg']}) | {r['loop']} | "
                    f"{num(r['memory_bytes_per_chip'], '.2f', 2**-30)} | "
                    f"{num(r['hbm_bytes'], '.2f', 2**-30)} | "
                    f"{num(r['step_flops_per_device'], '.2f', 1e-12)} | "
                    f"{num(r['received_bytes_per_step'], ',.1f', 1e-6)} | "
                    f"{num(r['hidden_share'] if r['received_bytes_per_step'] else None, '.1%')} | "
                    f"{num(r['compute_s'], '.1f', 1e3)} | "
                    f"{num(r['exposed_s'], '.2f', 1e3)} | {num(r['step_s'], '.1f', 1e3)} | "
                    + ("—" if r["speedup"] is None else f"{r['speedup']:.2f}x")
                )
        blocks.append(f"### {target}")
        lines = [f"JAX_PLATFORMS=cpu {command_text(command)}" for _, command in runs]
        blocks += ["Produced by:", code(lines)]
        if rows:
            blocks.append(table(header, rows))
        blocks += [f"_Missing: {problem}._" for problem in problems]
    return blocks


def device(name: str, kind: str) -> str:
    """The device column: "cpu", or "cuda (NVIDIA H100 ...)"."""
    return name if kind == name else f"{name} ({kind})"


def eval_section(inputs: Inputs) -> list[str]:
    """Mean PSNR/SSIM per mode against single on 4 and 8 devices, beside the paper's PSNR."""
    results, page, machine = inputs.results, inputs.page, inputs.machine
    blocks = [
        "The paper's PSNR (**their numbers, not ours**) is for SDXL at 1024x1024 with 50 steps "
        "against the 1-GPU image: 23.0 dB on 4 GPUs and 22.0 dB on 8 (DistriFusion, corrected "
        "GroupNorm), naive patches on 8 GPUs 7.7 dB. Ours are for the built-in model at "
        "256x256 with 25 steps: compare the trends, not the values.",
    ]
    for n, run in zip(EVAL_DEVICES, commands(results)["eval"], strict=True):
        blocks.append(f"### {n} devices")
        folder = run[1][0]
        data, problem = load_json(folder / "metrics.json")
        if problem:
            blocks += missing(problem, [command_text(run[0])], "eval")
            continue
        blocks += produced_by([run], machine, "eval")
        paper = {name: PAPER_PSNR.get((n, name)) for name in data["mean"]}
        blocks += eval_table(data, "paper PSNR dB (SDXL 1024, 50 steps)", paper, ".1f")
        if (folder / "grid.png").is_file():
            columns = ", ".join(data.get("grid", {}).get("columns", []))
            grid = link(folder / "grid.png", page)
            blocks.append(f"[Grid]({grid}), one row per prompt and seed; columns: {columns}")
            blocks.append(f"![{n}-device grid]({grid})")
    return blocks


def slabs(counts: list[int]) -> str:
    """Each patch's rows, runs of equal ones as "rows x patches": "20, 16 x 6, 19"."""
    runs: list[list[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count} x {n}" if n > 1 else str(count) for count, n in runs)


def sizes_section(inputs: Inputs) -> list[str]:
    """SDXL's training sizes and 4K UHD on 1-8 devices: slabs, padding and its cost; the
    built-in model's quality at a height of unequal slabs."""
    results, machine = inputs.results, inputs.machine
    runs = commands(results)["sizes"]
    analyses, evals = runs[: len(SDXL_SIZES)], runs[len(SDXL_SIZES) :]
    blocks = [
        "Heights that do not split into P equal slabs at every UNet level run on slabs of "
        "unequal real rows in equal device arrays (see [the design](design.md#heights-that-"
        "do-not-split-evenly)): every device computes its array's rows, the padding too. "
        "Rows: each patch's real latent rows (SDXL: boundaries at 4 latent rows, 32 "
        "pixels); array: the rows each device computes; padding: their share that is "
        "padding. x P ÷ single: the FLOPs of all devices over the one-device step's (the "
        "padding's and the halos' cost; 1.000 is none). Received, stale and run as in the "
        "per-device cost above. SDXL, bfloat16, C=1, compiled from shapes for simulated "
        "devices.",
    ]
    split_rows = []
    for height, width in SDXL_SIZES:
        cells = []
        for devices in SPLIT_DEVICE_COUNTS:
            split = Split.of(height // 8, devices, 4)
            padding = 1 - split.size / (devices * split.slab)
            cells.append(f"{slabs(list(split.counts))} in {split.slab} ({padding:.1%})")
        split_rows.append(f"{height}x{width} | " + " | ".join(cells))
    blocks.append(
        "Each patch's latent rows, in device arrays of how many rows (the padding's share), "
        "from the split rule (`sharding.split.Split.of`, SDXL's 8 pixels per latent row and "
        "boundaries at 4 latent rows; no compile):"
    )
    header = " | ".join(f"{n} devices" for n in SPLIT_DEVICE_COUNTS)
    blocks.append(table(f"size | {header}", split_rows))
    rows, present = [], []
    for run in analyses:
        records, problem = load_json(run[1][0])
        if problem:
            continue
        present.append(run)
        for r in records:
            counts = r.get("latent_rows_per_patch") or []
            array = r.get("latent_rows_per_device")
            padding = 1 - sum(counts) / (len(counts) * array) if counts and array else None
            rows.append(
                f"{r['height']}x{r['width']} | {r['devices']} | {slabs(counts)} | "
                f"{num(array, '.0f')} | {num(padding, '.1%')} | "
                f"{num(r['flops_per_device_step'], '.2f', 1e-12)} | "
                f"{num(r['flops_per_device_step'] * r['devices'] / r['flops_single_step'], '.3f')}"
                f" | {num(r['comm_bytes_per_device_step'], ',.1f', 1e-6)} | "
                f"{num(r['stale_bytes_per_device'], '.2f', 1e-9)} | "
                f"{num(r.get('memory_bytes_generation_per_device'), '.2f', 1e-9)}"
            )
    if not present:
        blocks += missing("no size analysis yet", [command_text(a) for a, _ in analyses], "sizes")
    else:
        blocks += produced_by(present, machine, "sizes")
        header = (
            "size | devices | rows | array | padding | TFLOPs/device | x P ÷ single | "
            "received MB | stale GB | run GB"
        )
        blocks.append(table(header, rows))
    height, width = UNEVEN_EVAL
    blocks.append(f"### Quality at {height}x{width} (`eval`)")
    for n, run in zip(EVAL_DEVICES, evals, strict=True):
        data, problem = load_json(run[1][0] / "metrics.json")
        if problem:
            blocks += missing(problem, [command_text(run[0])], "sizes")
            continue
        even, _ = load_json(results / f"eval-{n}" / "metrics.json")
        blocks += produced_by([run], machine, "sizes")
        blocks.append(f"{n} devices; beside, the same at 256x256 (equal slabs, above).")
        even_psnr = {name: m["psnr_db"] for name, m in (even or {}).get("mean", {}).items()}
        blocks += eval_table(data, "PSNR dB at 256x256", even_psnr, ".2f")
    return blocks


def eval_table(data: dict, column: str, beside: dict[str, float | None], spec: str) -> list[str]:
    """An eval's configuration and its mean PSNR/SSIM per mode, with `beside` (per mode) in
    a last `column`."""
    config = data["config"]
    rows = [
        f"{name} | {num(m['psnr_db'], '.2f')} | {num(m['ssim'], '.4f')} | "
        f"{num(beside.get(name), spec)}"
        for name, m in data["mean"].items()
    ]
    return [
        f"Model {config['model']}, {config['height']}x{config['width']}, {config['steps']} "
        f"steps, {config['dtype']}, {len(config['prompts'])} prompt(s) x seeds "
        f"{', '.join(map(str, config['seeds']))}; mean over the images (PSNR —: identical).",
        table(f"mode | PSNR dB | SSIM | {column}", rows),
    ]


def gpu_section(inputs: Inputs) -> list[str]:
    """The GPU check: the SDXL UNet step in JAX and PyTorch, and projected P-device steps."""
    path = inputs.gpu_check
    blocks: list[str] = []
    data, problem = load_json(path)
    if problem:
        return blocks + missing(f"no GPU run is recorded yet ({problem})", [GPU_CHECK])
    blocks += ["Produced by:", code([GPU_CHECK])]
    blocks.append(
        f"{data['device']}, {data['date']}, jax {data['jax']}, {data['unet']} UNet with random "
        f"weights, {data['dtype']}, batch {data['batch']}. Projected: the measured per-device "
        f"compute plus the received bytes at {data['link_gbs']:g} GB/s, assuming no overlap: "
        "**projected, not measured on P devices**."
    )
    rows = [
        f"{row['kind']} | {row['size']} | {row['devices']} | {num(row['step_s'], '.1f', 1e3)} | "
        f"{num(row['compile_s'], '.1f')} | {num(row.get('received_bytes'), ',.1f', 1e-6)} | "
        f"{num(row.get('projected_step_s'), '.1f', 1e3)} | "
        f"{num(row.get('projected_speedup'), '.2f')}"
        for row in data["rows"]
    ]
    header = "what | size | P | step ms | first call s | received MB | projected ms"
    blocks.append(table(header + " | projected speed-up", rows))
    jax = {}  # the first single-device JAX row per size (the first kernel of --attention)
    for row in data["rows"]:
        if row["kind"].startswith("jax") and row["devices"] == 1:
            jax.setdefault(row["size"], row["step_s"])
    ratios = [
        f"{row['kind']} ÷ jax at {row['size']}: {row['step_s'] / jax[row['size']]:.2f}"
        for row in data["rows"]
        if row["kind"].startswith("torch") and row["size"] in jax
    ]
    if ratios:
        blocks.append("Step time, PyTorch over JAX (one device): " + "; ".join(ratios) + ".")
    errors = data.get("errors", [])
    return blocks + (["\n".join(f"- error: {error}" for error in errors)] if errors else [])


def render(results: Path, page: Path, gpu_check: Path) -> str:
    """The whole page, from whatever results exist."""
    machine, _ = load_json(results / "machine.json")
    machine = machine or {}
    inputs = Inputs(results, page, gpu_check, machine)
    blocks = [
        "# Performance",
        "<!-- Generated by `python benchmarks/performance_page.py --run`: do not edit. -->",
        "_This page is generated by `python benchmarks/performance_page.py --run` from the raw "
        f"results in `{shown(results)}/` (without `--run` it re-renders them). Do not edit it "
        "by hand._",
    ]
    if machine:
        m = {key: machine.get(key) for key in ("jax", "jaxlib", "torch", "commit", "date")}
        blocks.append(
            f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, "
            f"{machine.get('platform')}; Python {machine.get('python')}, jax {m['jax']}, "
            f"jaxlib {m['jaxlib']}, torch {m['torch']}; commit {m['commit']}"
            f"{' with uncommitted changes' if machine.get('uncommitted_changes') else ''}; "
            f"last run {m['date']}."
        )
    else:
        blocks.append("Machine: not recorded (`--run` writes machine.json).")
    sections = [
        ("Per-device cost of one SDXL denoising step (`bench analyze`)", analysis_section),
        ("Memory of the UNet step and the VAE decode per attention kernel", memory_section),
        ("Timing (`bench time`)", time_section),
        ("Quality against the single-device image (`eval`)", eval_section),
        ("Few-step runs (`bench time`, warm-up sweep)", few_step_section),
        ("Sizes that do not split evenly (`bench analyze`, `eval`)", sizes_section),
        ("Compressed exchange (`--compress`)", codec_section),
        ("The exchange on the real compilers (`bench analyze --target`)", targets_section),
        ("GPU check (`benchmarks/gpu_check.py`)", gpu_section),
    ]
    for title, body in sections:
        blocks.append(f"## {title}")
        try:
            blocks += body(inputs)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as error:
            blocks.append(
                f"_Not rendered: its input has an unexpected layout ({type(error).__name__}: "
                f"{error}). Rerun the command that writes it._"
            )
    return "\n\n".join(blocks) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="measure first (slow), then render")
    parser.add_argument(
        "--missing",
        action="store_true",
        help="with --run: only the commands whose outputs are missing",
    )
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts --run measures"
    )
    results, page = ROOT / "docs" / "results", ROOT / "docs" / "performance.md"
    gpu_check = ROOT / "benchmarks" / "results" / "gpu_check.json"
    parser.add_argument("--results", type=Path, default=results, help="raw results folder")
    parser.add_argument("--page", type=Path, default=page, help="the Markdown page to write")
    parser.add_argument("--gpu-check", type=Path, default=gpu_check, help="gpu_check.py's JSON")
    args = parser.parse_args()
    failed = run_parts(args.only, args.results, args.missing) if args.run else []
    text = render(args.results, args.page, args.gpu_check)
    args.page.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.page, text)
    print(f"wrote {shown(args.page)}")
    for command in failed:
        print(f"failed: {command}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

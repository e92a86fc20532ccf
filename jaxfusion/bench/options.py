"""What each measurement is asked to do (`bench analyze`, `bench time`, `profile`, `eval`), as
plain values checked when they are made: before a model is loaded or anything compiles.

Without JAX, so that the command line takes its defaults from here. The measurements take
these with the pipeline they measure:

    from jaxfusion.bench import options, timing
    records = timing.run(pipe, options.TimingOptions(devices=(1, 2), steps=10))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jaxfusion.files import check_new_folder
from sharding.names import GROUP_NORM_RULES

if TYPE_CHECKING:
    from jaxfusion.models.names import AttentionBackend
    from jaxfusion.schedulers.config import Kind
    from sharding.names import Compression, GroupNormRule, Mode, NaiveSplit
    from sharding.parallel import ParallelConfig

DEFAULT_PROMPT = "a red circle at the top left and a blue square at the bottom right"
# The prompts `eval` generates unless it is given others.
PROMPTS = (
    "a red circle at the top left",
    "a blue square at the bottom right and a yellow triangle at the top",
    "a green triangle in the center",
    "a purple circle at the bottom left on a white background",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """The request of every measured pipeline call.

    height, width: pixels; None: the model's native size.
    steps: denoising steps.
    guidance: the classifier-free guidance scale; None: the pipeline's default (as diffusers).
    scheduler: "euler", "ddim", "dpmpp", "euler_a" or "lcm"; None: the model folder's own.
    """

    height: int | None = None
    width: int | None = None
    steps: int
    guidance: float | None = None
    scheduler: Kind | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimingOptions(Generation):
    """`bench time`: every mode of `modes` on every count of `devices` (1 runs single), a
    warm-up call then `runs` timed calls of `steps` and of fewer steps each; displaced mode
    once per codec of `compress`, each exchanging K/V every `kv_refresh`-th displaced step;
    `torch_model`: also time diffusers (PyTorch) on this pipeline folder; `json`: write the
    records there; `model`: the model's name in them (None: the built-in model)."""

    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    steps: int = 10
    devices: Sequence[int] = (1, 2, 4)
    modes: Sequence[Mode] = ("sync", "displaced", "naive")
    compress: Sequence[Compression] = ("none",)
    kv_refresh: int = 1
    runs: int = 3
    torch_model: str | Path | None = None
    json: str | Path | None = None

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"--runs {self.runs}: time at least 1 run")
        if self.steps < 2:
            raise ValueError(f"--steps {self.steps}: the time per step needs at least 2 steps")
        _check_folder_of(self.json, "--json")
        if min(self.devices) < 1:
            raise ValueError(f"--devices {min(self.devices)}: give counts of at least 1")
        if (set(self.compress) != {"none"} or self.kv_refresh != 1) and (
            "displaced" not in self.modes
        ):
            raise ValueError(
                "--compress and --kv-refresh change displaced steps: add --parallel displaced"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileOptions(Generation):
    """`profile`: one generation of `prompt` under `parallel`, traced; the trace and the
    reports go to `out`, a new or empty folder (made a `Path`); None: the calls run untraced
    and nothing is written (the processes but process 0 of a multi-process run)."""

    out: Path | None
    parallel: ParallelConfig
    prompt: str = DEFAULT_PROMPT
    steps: int = 4

    def __post_init__(self) -> None:
        _check_out(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions(Generation):
    """`eval`: every prompt of `prompts` with every seed of `seeds`, under single, displaced
    on `devices` patch devices with each GroupNorm rule of `group_norm` (steps
    0..`warmup_steps` synchronous; None: `ParallelConfig`'s default for `steps`), and naive
    (`naive_split`), and displaced with each codec of `compress` (the first rule, K/V
    exchanged every `kv_refresh`-th displaced step; each also compared with its uncompressed
    run, "none" with K/V every step); the images and metrics go to `out`, a new or empty
    folder (made a `Path`; None: nothing is written, as on the processes but process 0 of a
    multi-process run); `model`: the model's name in the metrics (None: the built-in
    model)."""

    out: Path | None
    model: str | None = None
    prompts: Sequence[str] = PROMPTS
    seeds: Sequence[int] = (0, 1)
    devices: int = 4
    group_norm: Sequence[GroupNormRule] = GROUP_NORM_RULES
    warmup_steps: int | None = None
    naive_split: NaiveSplit = "row"
    compress: Sequence[Compression] = ()
    kv_refresh: int = 1
    steps: int = 25

    def __post_init__(self) -> None:
        _check_out(self)
        if not self.prompts:
            raise ValueError("eval needs at least one prompt")
        if self.kv_refresh > 1 and not self.compress:
            raise ValueError(
                f"--kv-refresh {self.kv_refresh} applies to the codec runs: name them with "
                "--compress (none: uncompressed)"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {' '.join(map(str, self.seeds))}: a seed is repeated")
        if self.devices < 2:
            raise ValueError(f"--devices {self.devices}: eval compares 2 or more patch devices")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnalyzeOptions:
    """`bench analyze`, from shapes alone: `model` ("sd15", "sd21", "sdxl", "flux-dev",
    "flux-schnell", or a model folder) at each height of `heights` (width: `width`, or the
    height) on each count of `devices` (1 runs single, more run `mode`), CFG halves on
    separate devices with `cfg_parallel` (models with classifier-free guidance: not
    FLUX.1), split into `data` groups (D: the data mesh axis; each group's devices run one
    image, so the per-device figures are one group's); `hosts`: also count what
    crosses hosts with the devices spread over that many (`sharding.analysis.host_links`,
    data groups exchanging nothing); each codec of `compress` (multi-device displaced
    runs), K/V exchanged every `kv_refresh`-th displaced step; a projected step time per
    link speed of `link_gbs` (GB/s), computing at `device_tflops` (a model, not a
    measurement: `jaxfusion.bench.analyze.projected_step_seconds`); `json`: write the
    records there; `plot`: a .png of them.

    `target`: instead, compile each configuration's 50-step denoising loop for that
    accelerator (`jaxfusion.bench.targets`: "v5e-8", "h100-8", ...) with its own compiler
    and report memory per chip, the overlap of the displaced loop's exchange and the
    projected step (`jaxfusion.bench.overlap`); `schedule`: a folder (made if absent) for a
    picture of each loop body's schedule; `xla_options`: (name, value) pairs of XLA options
    compiled with, after jaxfusion's own (`sharding.compiler_options`), to try the
    compiler's scheduler settings."""

    model: str = "sdxl"
    heights: Sequence[int] = (1024, 2048)
    width: int | None = None
    devices: Sequence[int] = (1, 2, 4, 8)
    mode: Mode = "displaced"
    group_norm: GroupNormRule = "corrected"
    cfg_parallel: bool = False
    data: int = 1
    hosts: int = 1
    compress: Sequence[Compression] = ("none",)
    kv_refresh: int = 1
    link_gbs: Sequence[float] = (25.0, 3.0, 0.5)  # PCIe 4 x16, a slow PCIe / host link, 500 MB/s
    device_tflops: float = 400.0  # dense bfloat16 at ~40% of an H100's 989 TFLOP/s
    dtype: str = "bfloat16"
    attention: AttentionBackend = "auto"
    json: str | Path | None = None
    plot: str | Path | None = None
    target: str | None = None
    schedule: str | Path | None = None
    xla_options: tuple[tuple[str, bool | int | float | str], ...] = ()

    def __post_init__(self) -> None:
        if self.schedule is not None and self.target is None:
            raise ValueError("--schedule pictures a target's schedule: add --target NAME")
        if self.xla_options and self.target is None:
            raise ValueError("--xla-option sets the target compiler's options: add --target NAME")
        if self.target is not None and (self.plot is not None or self.hosts > 1):
            raise ValueError("--plot and --hosts describe the CPU compile: drop them with --target")
        if self.plot is not None and Path(self.plot).suffix.lower() != ".png":
            raise ValueError(f"--plot {self.plot}: the file must end in .png")
        _check_folder_of(self.plot, "--plot")
        _check_folder_of(self.json, "--json")
        if self.data < 1:
            raise ValueError(f"--data-parallel {self.data}: use 1 or more groups")


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one per line)")
    return prompts


def _check_out(options: ProfileOptions | EvalOptions) -> None:
    """`options.out` made a `Path` and checked as a folder to fill (or left None)."""
    if options.out is not None:
        object.__setattr__(options, "out", check_new_folder(options.out))


def _check_folder_of(path: str | Path | None, option: str) -> None:
    if path is not None and not Path(path).parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {Path(path).parent} does not exist")

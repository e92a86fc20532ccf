"""`jaxfusion profile`: one generation's compiled program (prompt encoding, the denoising
scans, VAE decoding) run under `jax.profiler.trace` after a warm-up run, with its optimized
HLO and a report of its collectives read from that HLO (`schedule.read_schedule`): what each
kind of denoising step exchanges (the collectives of each while loop's body run once per
step), and, where the platform makes collectives asynchronous, whether compute is scheduled
between each one's start and its done (work the transfer can hide behind)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxfusion.bench.options import ProfileOptions
from jaxfusion.bench.schedule import Collective, Schedule, read_schedule, traffic_by_kind
from jaxfusion.display import StageDisplay
from jaxfusion.files import write_text_atomically
from sharding.parallel import ParallelConfig

if TYPE_CHECKING:
    from jaxfusion.pipelines import TextToImagePipeline

PERFETTO = "https://ui.perfetto.dev"
# Instructions that do no work a transfer could overlap with: the rest (fusions, convolutions,
# custom calls to cuBLAS/cuDNN, dots, loops, ...) is compute.
BOOKKEEPING = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy", "copy-start",
    "copy-done", "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id",
}  # fmt: skip
COMMUNICATION = re.compile(
    r"^(?:all-gather|all-reduce|all-to-all|collective-permute|collective-broadcast|"
    r"reduce-scatter|ragged-all-to-all|send|recv|async)"
)


@dataclasses.dataclass(frozen=True)
class LoopCollectives:
    """The collectives of one part of the program, per device: outside every loop (`loop`
    None: run once), or in the body of the while instruction `loop` (run once per iteration;
    an iteration of a denoising scan is one step). trip_count: its iterations, where they
    can be read (`Loop.trip_count`; 1 outside the loops). Every branch of a conditional
    counts, as if all ran."""

    loop: str | None
    trip_count: int | None
    collectives: list[Collective]


def loop_collectives(schedule: Schedule) -> list[LoopCollectives]:
    """The collectives of a compiled module by the innermost while loop whose body holds them
    (`Schedule.enclosing_loops`): the part outside every loop first, then one entry per while
    loop (with or without collectives) in the order of `Schedule.loops` (the entry's first, in
    program order)."""
    trips = {None: 1, **{loop.name: loop.trip_count for loop in schedule.loops}}
    found: dict[str | None, list[Collective]] = {loop: [] for loop in trips}
    for collective in schedule.collectives:
        found[schedule.enclosing_loops[collective.computation]].append(collective)
    return [LoopCollectives(loop, trips[loop], c) for loop, c in found.items()]


@dataclasses.dataclass(frozen=True)
class AsyncCollective:
    """An asynchronous collective of a scheduled HLO module: its kind (`op`), its start and
    done instructions in `computation` (run by while instruction `loop`, or None outside every
    loop) and the compute instructions scheduled between them."""

    computation: str
    loop: str | None
    op: str
    start: str
    done: str
    compute_between: int

    @property
    def overlapped(self) -> bool:
        """At least one compute instruction runs while the transfer is in flight."""
        return self.compute_between > 0


def async_collectives(schedule: Schedule) -> list[AsyncCollective]:
    """The asynchronous collectives of a compiled module (`Collective.asynchronous`: `-start`
    / `-done` pairs, `async-start` / `async-done` wrappers, TPU async collective fusions), in
    the order of `Schedule.collectives`, with the compute instructions scheduled between start
    and done (not parameters, constants, tuples, bitcasts, copies or communication; a TPU
    collective's continuation fusions count). Synchronous collectives (CPU) are left out."""
    found = []
    for c in schedule.collectives:
        if c.asynchronous:
            between = schedule.computations[c.computation].instructions[c.start + 1 : c.done]
            compute = sum(_is_compute(i.opcode) for i in between)
            loop = schedule.enclosing_loops[c.computation]
            start, done = c.instructions[0], c.instructions[-1]
            found.append(AsyncCollective(c.computation, loop, c.kind, start, done, compute))
    return found


def _is_compute(opcode: str) -> bool:
    return opcode not in BOOKKEEPING and COMMUNICATION.match(opcode) is None


@dataclasses.dataclass(frozen=True)
class ProgramPart:
    """A part of the program for the report: what it runs (`label`), the denoising steps it
    holds (`steps`), its while loop (None: outside the loops), how many times its
    collectives run (`iterations`), and its collectives per iteration."""

    label: str
    steps: list[int]
    loop: str | None
    iterations: int | None
    collectives: list[Collective]

    def by_op(self) -> dict[str, dict[str, int]]:
        """{kind: {"count", "received_bytes"}} per iteration, per device."""
        return traffic_by_kind(self.collectives)


def scans(parallel: ParallelConfig, steps: int) -> list[tuple[str, range]]:
    """The scans of the denoising loop, in program order, as `ParallelConfig.schedule` gives
    them: (the label of their steps, their steps)."""
    return [(f"{kind} steps", indices) for kind, indices in parallel.schedule(steps)]


def steady_kind(parallel: ParallelConfig) -> str:
    """The kind of step the loop settles into: displaced ones in displaced mode (after the
    warm-up), else the mode's own."""
    return "displaced" if parallel.mode == "displaced" else parallel.mode


def steady_steps(parallel: ParallelConfig, steps: int) -> range:
    """The steps of the steady kind in a loop of `steps` steps (none: an empty range)."""
    return dict(parallel.schedule(steps)).get(steady_kind(parallel), range(0))


def program_parts(
    loops: list[LoopCollectives], parallel: ParallelConfig, steps: int
) -> list[ProgramPart]:
    """`loop_collectives` labelled with the scans they run. XLA inlines a scan of one step,
    so the while loops are matched to the scans of two steps or more, in order, when their
    trip counts agree; otherwise they are reported as loops only. (A displaced step's
    exchanges only feed the next step: XLA drops those of the last step when it is inlined.)"""
    outside, *loops = loops
    expected = [(label, r) for label, r in scans(parallel, steps) if len(r) > 1]
    matched = [loop.trip_count for loop in loops] == [len(r) for _, r in expected]
    parts, covered = [], set()
    for index, loop in enumerate(loops):
        label, r = expected[index] if matched else (f"while loop {loop.loop}", range(0))
        parts.append(ProgramPart(label, list(r), loop.loop, loop.trip_count, loop.collectives))
        covered |= set(r)
    rest = [s for s in range(steps) if s not in covered]
    if not matched:
        label = "outside the loops (once)"
    elif rest:
        label = f"outside the loops (once): steps {_span(rest)}, the final gather"
    else:
        label = "outside the loops (once): the final gather"
    return [ProgramPart(label, rest if matched else [], None, 1, outside.collectives), *parts]


def steady_state(parts: list[ProgramPart], parallel: ParallelConfig) -> ProgramPart | None:
    """The part running the steps of the steady kind (the displaced steps in displaced mode)
    as a loop, or None (no such loop: no step or one of that kind, or loops XLA reshaped)."""
    label = f"{steady_kind(parallel)} steps"
    return next((p for p in parts if p.label == label and p.loop is not None), None)


def _span(steps: list[int]) -> str:
    if len(steps) > 1 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}..{steps[-1]}"
    return ", ".join(map(str, steps))


def check(pipe: TextToImagePipeline, options: ProfileOptions) -> None:
    """Refuses options the profiled generation cannot run (an abstract pipeline is enough:
    nothing compiles)."""
    pipe.prepare(**pipeline_call(options))


def pipeline_call(options: ProfileOptions) -> dict[str, Any]:
    """The arguments of the profiled pipeline call."""
    return dict(
        prompt=options.prompt,
        height=options.height,
        width=options.width,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        scheduler=options.scheduler,
        parallel=options.parallel,
    )


def run(
    pipe: TextToImagePipeline, options: ProfileOptions, display: StageDisplay | None = None
) -> dict[str, Any]:
    """`jaxfusion profile` on `pipe`: compiles and warms up, traces a run, writes the trace,
    the optimized HLO and the collectives report (`collectives.json`) to `options.out`,
    prints the report, and returns what `collectives.json` holds. With `options.out` None
    (the processes but process 0 of a multi-process run) the same calls run, untraced,
    and nothing is written or printed."""
    display = display or StageDisplay()
    out, parallel, steps = options.out, options.parallel, options.steps
    call = pipeline_call(options)
    compiled = pipe.compile(*pipe.prepare(**call), display)  # refuses what `check` refuses
    with display("warm-up run"):
        pipe(**call)
    if out is None:
        with display(f"the traced run, untraced here ({steps} steps)"):
            pipe(**call)
    else:
        out.mkdir(parents=True, exist_ok=True)
        trace = jax.profiler.trace(out / "trace", create_perfetto_trace=True)
        with display(f"traced run ({steps} steps)"), trace:
            pipe(**call)
    hlo = compiled.as_text()
    schedule = read_schedule(hlo)
    parts = program_parts(loop_collectives(schedule), parallel, steps)
    steady = steady_state(parts, parallel)
    pairs = async_collectives(schedule)
    platform = jax.devices()[0].platform
    report = dict(
        platform=platform,
        devices=parallel.devices,
        mode=parallel.mode,
        steps=steps,
        warmup_steps=parallel.warmup(steps),
        dtype=np.dtype(pipe.dtype).name,
        parts=[
            dict(
                label=p.label,
                steps=p.steps,
                loop=p.loop,
                iterations=p.iterations,
                per_iteration=p.by_op(),
            )
            for p in parts
        ],
        steady_state=None if steady is None else dict(label=steady.label, per_step=steady.by_op()),
        async_collectives=[dict(dataclasses.asdict(p), overlapped=p.overlapped) for p in pairs],
    )
    if out is None:
        return report
    write_text_atomically(out / "program.hlo.txt", hlo)
    write_text_atomically(out / "collectives.json", json.dumps(report, indent=2) + "\n")
    print_collectives(parts, display)
    display.note(describe_steady_state(steady, parallel, steps))
    print_overlap(parts, pairs, platform, display)
    print_files(out, display)
    return report


def print_collectives(parts: list[ProgramPart], display: StageDisplay) -> None:
    from rich.table import Table

    table = Table(title="collectives of the optimized HLO, per device")
    for column in ("part of the program", "steps", "runs", "collective", "count / run",
                   "received MB / run"):  # fmt: skip
        table.add_column(column, justify="right")
    for part in parts:
        runs = "?" if part.iterations is None else str(part.iterations)
        for op, entry in sorted(part.by_op().items()):
            table.add_row(
                part.label,
                _span(part.steps),
                runs,
                op,
                str(entry["count"]),
                f"{entry['received_bytes'] / 1e6:,.4f}",
            )
    display.console.print(table)


def describe_steady_state(steady: ProgramPart | None, parallel: ParallelConfig, steps: int) -> str:
    """A line on the steady-state step: its collectives and traffic, or why there is none."""
    if steady is not None:
        received = sum(c.received_bytes for c in steady.collectives)
        return (
            f"steady state ({steady.label} {_span(steady.steps)}): "
            f"{len(steady.collectives)} collectives, {received / 1e6:,.4f} MB received per "
            "device per step"
        )
    label, steady_run = f"{steady_kind(parallel)} steps", steady_steps(parallel, steps)
    if len(steady_run) > 1:
        return f"no steady-state figure: the program's loops do not match the {label}"
    needed = next(n for n in itertools.count(steps + 1) if len(steady_steps(parallel, n)) > 1)
    return (
        f"no steady-state loop: this run's {label}: {_span(list(steady_run)) or 'none'}; a "
        f"loop needs two or more (XLA inlines a scan of one step): use --steps {needed} or more"
    )


def print_overlap(
    parts: list[ProgramPart], pairs: list[AsyncCollective], platform: str, display: StageDisplay
) -> None:
    from rich.table import Table

    if not any(part.collectives for part in parts):
        display.note("no collectives: the program runs on one device")
        return
    if not pairs:
        display.note(
            f"collectives synchronous on this platform ({platform}): no overlap to analyse"
        )
        return
    table = Table(title="async collectives: compute scheduled between start and done")
    for column in ("part of the program", "collective", "overlapped", "back to back"):
        table.add_column(column, justify="right")
    labels = {part.loop: part.label for part in parts}
    groups: dict[tuple[str, str], list[AsyncCollective]] = {}
    for pair in pairs:
        groups.setdefault((labels.get(pair.loop, str(pair.loop)), pair.op), []).append(pair)
    for (label, op), group in groups.items():
        overlapped = sum(pair.overlapped for pair in group)
        table.add_row(label, op, str(overlapped), str(len(group) - overlapped))
    display.console.print(table)


def print_files(out: Path, display: StageDisplay) -> None:
    traces = sorted((out / "trace").rglob("perfetto_trace.json.gz"))
    trace = traces[0] if traces else out / "trace"
    display.note(
        f"wrote {out}: program.hlo.txt (the optimized HLO), collectives.json, trace/\n"
        f"open the trace at {PERFETTO} ('Open trace file': {trace}), or with TensorBoard's "
        f"profile plugin: tensorboard --logdir {out / 'trace'}"
    )

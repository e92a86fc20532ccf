"""What compute each collective can hide behind, read from XLA's *scheduled* HLO text.

`read_schedule(compiled.as_text())` reads a compiled module (`HloModule ...,
is_scheduled=true`: each computation's instructions are printed in the order they run) for any
backend, including one compiled ahead of time for a TPU slice or a GPU node that this machine
does not have (`jax.experimental.topologies`, DESIGN.md section 12). It is the project's one
reader of compiled HLO's collectives: `bench analyze` counts a step's traffic with it, and
`jaxfusion profile` each loop's (`Schedule.enclosing_loops`). The model, plainly:

- **Time is compute.** An instruction's FLOPs are those of its matrix products only: `dot`
  (2 x result elements x contracted lhs elements), `convolution` (2 x result elements x kernel
  window elements x input features per group, read from `dim_labels`; TPU writes matmuls as
  convolutions too), cuBLAS gemm custom calls (contracting dimensions from the
  `gemm_backend_config`) and cuDNN forward convolution custom calls. Elementwise ops,
  reductions, copies and data movement count 0: they are cheap beside the matmuls and
  convolutions of a diffusion model, and these are what a collective can hide behind. A fusion,
  call or `async-start` counts the FLOPs of the computation it calls; a `while` its body's
  times its trip count (once where the trip count cannot be read); a `conditional` its
  costliest branch.
- **A collective is in flight from its start to its done.** Each asynchronous collective is
  paired with its done in the computation where both are scheduled: XLA's `all-gather-start` /
  `-done` (likewise `collective-permute`, `all-reduce`, `all-to-all`, `reduce-scatter`),
  `async-start` / `async-update` / `async-done` wrapping a collective, and TPU's async collective
  fusions (a fusion calling an `AsyncCollectiveStart` custom call, zero or more *continuation*
  fusions that carry the collective's buffers along while computing, `while` loops that carry
  them through their iterations (as an attention kernel's loop over key chunks), a fusion
  calling `AsyncCollectiveDone`). Its `window_flops` are the FLOPs of every instruction scheduled
  strictly between start and done (continuation fusions included: their compute runs while the
  collective is in flight). A synchronous collective (every collective of a CPU compile) has
  start == done and window 0.
- **Traffic is what one device receives**, in the real dtype, summed over a combined
  (tuple-shaped) collective's arrays, for a group of n devices: all-gather the result less the
  own part, (n - 1) / n of the result; collective-permute the result; all-reduce 2 (n - 1) / n
  of it (ring); all-to-all (n - 1) / n; reduce-scatter (n - 1) x the result (the other devices'
  parts of the own shard).

Not read (counted as 0 FLOPs or left out): cuDNN backward-convolution custom calls, other
custom calls (attention kernels, Pallas/Triton kernels), `batch_group_count` of convolutions
(FLOPs as if 1), and point-to-point `send`/`recv` pairs (not reported as collectives). The trip
count of a `while` comes from the backend config's `known_trip_count` (XLA:GPU writes it) or,
failing that, from the counted-loop pattern XLA:TPU leaves (the condition compares a tuple
element with a constant, the body adds a constant to it, the loop starts it from a constant);
otherwise it is None and the body counts once."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from jaxfusion.files import write_atomically

COLLECTIVE_KINDS = (
    "all-gather",
    "collective-permute",
    "all-reduce",
    "all-to-all",
    "reduce-scatter",
)
ASYNC_COLLECTIVE_START = "AsyncCollectiveStart"
ASYNC_COLLECTIVE_DONE = "AsyncCollectiveDone"
KIND_COLOURS = {
    "all-gather": "tab:blue",
    "collective-permute": "tab:orange",
    "all-reduce": "tab:green",
    "all-to-all": "tab:red",
    "reduce-scatter": "tab:purple",
}


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an instruction's result: its element type (`bf16`, `f32`, ...) and shape."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.elements * _dtype_bits(self.dtype) / 8)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction. `arrays` is its result (a tuple result flattened, in order);
    `called` the computations it names (`calls=`, `to_apply=`, `body=`, `condition=`,
    `branch_computations=`); `attributes` the raw text of each `key=value` after its operands;
    `literal` a constant's value; `flops` its matmul/convolution FLOPs, those of the
    computations it calls included (see the module's docstring)."""

    name: str
    opcode: str
    arrays: tuple[Array, ...]
    operands: tuple[str, ...]
    called: tuple[str, ...]
    attributes: Mapping[str, str]
    literal: str | None = None
    flops: int = 0


@dataclasses.dataclass(frozen=True)
class Computation:
    """A computation's instructions in schedule order, and the name of its root."""

    name: str
    instructions: tuple[Instruction, ...]
    root: str

    @functools.cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {instruction.name: instruction for instruction in self.instructions}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective as scheduled: its kind, the computation it is scheduled in, the positions
    of its start and its done there (equal for a synchronous one), the instructions that make it
    (start, TPU continuation fusions, done), the arrays it delivers, the devices in its group,
    the bytes one device receives, and the FLOPs scheduled strictly between start and done."""

    kind: str
    computation: str
    start: int
    done: int
    instructions: tuple[str, ...]
    arrays: tuple[Array, ...]
    group_size: int
    received_bytes: int
    window_flops: int

    @property
    def asynchronous(self) -> bool:
        return self.done > self.start


@dataclasses.dataclass(frozen=True)
class Loop:
    """A `while` instruction: the computation and position it is scheduled at, its body and
    condition computations, and its trip count (None where it cannot be read)."""

    name: str
    computation: str
    position: int
    body: str
    condition: str
    trip_count: int | None


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A scheduled HLO module: its computations, the entry's name, the collectives of every
    computation that is scheduled (the entry, and the bodies, conditions, branches and callees
    reached from it; not fusions' computations), and their `while` loops. `enclosing_loops`
    gives each scheduled computation the name of the innermost `while` whose body or condition
    runs it, directly or through calls and conditionals (None: the entry and what it runs
    outside every loop); one reached from several places, that of the first reached."""

    module: str
    entry: str
    computations: Mapping[str, Computation]
    collectives: tuple[Collective, ...]
    loops: tuple[Loop, ...]
    enclosing_loops: Mapping[str, str | None]

    def flops(self, computation: str | None = None) -> int:
        """The FLOPs of one run of a computation (the entry by default): those of the
        computations it calls included, a `while` body's times its trip count."""
        return sum(i.flops for i in self.computations[computation or self.entry].instructions)

    def cumulative_flops(self, computation: str) -> tuple[int, ...]:
        """The FLOPs scheduled before each position of a computation, and (last) in all."""
        totals = [0]
        for instruction in self.computations[computation].instructions:
            totals.append(totals[-1] + instruction.flops)
        return tuple(totals)

    def collectives_in(self, computation: str) -> tuple[Collective, ...]:
        """The collectives scheduled in one computation, by start position."""
        return tuple(c for c in self.collectives if c.computation == computation)

    def entry_loops(self) -> tuple[Loop, ...]:
        """The `while` loops of the entry computation in program order: their bodies hold a
        scanned denoising loop, the part whose overlap matters."""
        return tuple(loop for loop in self.loops if loop.computation == self.entry)


def read_schedule(text: str) -> Schedule:
    """Reads the text of a compiled module (`compiled.as_text()`); raises ValueError for one
    that is not scheduled (the text of a lowered, not compiled, program)."""
    header = text.split("\n", 1)[0]
    if not header.startswith("HloModule") or "is_scheduled=true" not in header:
        raise ValueError("not a scheduled HLO module: pass the text of a compiled program")
    module = header.split()[1].rstrip(",")
    devices = _header_int(header, "num_partitions") * _header_int(header, "replica_count")
    parsed, entry = _parse_computations(text)
    computations = _with_flops(parsed)
    scheduled = _scheduled_computations(computations, entry)
    loops = tuple(
        Loop(
            name=instruction.name,
            computation=name,
            position=position,
            body=instruction.attributes["body"].lstrip("%"),
            condition=instruction.attributes["condition"].lstrip("%"),
            trip_count=_trip_count(instruction, computations[name], computations),
        )
        for name in scheduled
        for position, instruction in enumerate(computations[name].instructions)
        if instruction.opcode == "while"
    )
    collectives: list[Collective] = []
    in_flight: dict[str, set[int]] = {}  # loop bodies: parameter elements carrying a collective
    for name in scheduled:  # outer computations before the loops they run
        found, carried = _collectives(
            computations[name], computations, devices, in_flight.get(name, set())
        )
        collectives.extend(found)
        in_flight.update(carried)
    return Schedule(module, entry, computations, tuple(collectives), loops, scheduled)


def traffic_by_kind(collectives: Iterable[Collective]) -> dict[str, dict[str, int]]:
    """`{kind: {"count": ..., "received_bytes": ...}}`: how many collectives of each kind, and
    the bytes one device receives through them, kinds in order of first appearance."""
    found: dict[str, dict[str, int]] = {}
    for collective in collectives:
        entry = found.setdefault(collective.kind, {"count": 0, "received_bytes": 0})
        entry["count"] += 1
        entry["received_bytes"] += collective.received_bytes
    return found


def plot_schedule(schedule: Schedule, computation: str, path: str | Path, title: str) -> None:
    """A PNG of one computation's schedule: along x the FLOPs scheduled so far (compute as
    time), one bar per collective from its start to its done, coloured by kind and labelled
    with the megabytes one device receives; a tick where no compute is scheduled while it is
    in flight (a synchronous collective, or an exposed one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    collectives = schedule.collectives_in(computation)
    cumulative = schedule.cumulative_flops(computation)
    scale, unit = (1e12, "TFLOP") if cumulative[-1] >= 1e12 else (1e9, "GFLOP")
    total = max(cumulative[-1] / scale, 1e-9)
    height = 2.2 + 0.3 * max(len(collectives), 1)
    figure, axes = plt.subplots(figsize=(10, height), layout="constrained")
    for row, collective in enumerate(collectives):
        colour = KIND_COLOURS[collective.kind]
        left = cumulative[collective.start + 1] / scale
        right = cumulative[collective.done] / scale
        if right > left:
            axes.barh(row, right - left, left=left, height=0.6, color=colour)
        else:  # nothing computed while it is in flight
            axes.plot([left], [row], "|", color=colour, markersize=14, markeredgewidth=2)
        label = f"{collective.received_bytes / 1e6:,.1f} MB"
        axes.text(right + 0.01 * total, row, label, va="center")
    kinds = [kind for kind in KIND_COLOURS if any(c.kind == kind for c in collectives)]
    figure.legend(
        handles=[Patch(color=KIND_COLOURS[kind], label=kind) for kind in kinds],
        loc="outside lower center",
        ncol=max(len(kinds), 1),
    )
    axes.set_yticks(range(len(collectives)), [c.instructions[0] for c in collectives])
    axes.set_ylim(len(collectives) - 0.5, -0.5)
    axes.set_xlim(0, 1.15 * total)
    axes.set_xlabel(f"{unit} of matmuls and convolutions scheduled so far in {computation}")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


# Parsing -------------------------------------------------------------------------------------

_COMPUTATION_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")
_CALLED_ATTRIBUTES = (
    "calls",
    "to_apply",
    "body",
    "condition",
    "branch_computations",
    "true_computation",
    "false_computation",
)
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _parse_computations(text: str) -> tuple[dict[str, Computation], str]:
    computations: dict[str, Computation] = {}
    entry = ""
    current: str | None = None
    instructions: list[Instruction] = []
    root = ""
    for line in text.splitlines():
        if current is None:
            header = _COMPUTATION_HEADER.match(line)
            if header:
                current, instructions, root = header.group(2), [], ""
                if header.group(1):
                    entry = current
        elif line.strip() == "}":
            computations[current] = Computation(current, tuple(instructions), root)
            current = None
        else:
            match = _INSTRUCTION.match(line)
            if match:
                instructions.append(_parse_instruction(match.group(2), match.group(3)))
                if match.group(1):
                    root = match.group(2)
    if not entry:
        raise ValueError("no ENTRY computation in the module's text")
    return computations, entry


def _parse_instruction(name: str, text: str) -> Instruction:
    """`text`: what follows `name =`: the result type, the opcode, its operands in
    parentheses, then `, key=value` attributes."""
    type_end = _balanced_end(text, 0) if text.startswith("(") else text.index(" ")
    opcode_match = re.match(r"\s*([\w\-]+)\(", text[type_end:])
    if opcode_match is None:
        raise ValueError(f"cannot read the HLO instruction {name} = {text[:200]}")
    open_paren = type_end + opcode_match.end() - 1
    close_paren = _balanced_end(text, open_paren)
    arguments = text[open_paren + 1 : close_paren - 1]
    attributes = {}
    for item in _split_top_level(text[close_paren:]):
        key, _, value = item.partition("=")
        attributes[key.strip()] = value.strip()
    opcode = opcode_match.group(1)
    return Instruction(
        name=name,
        opcode=opcode,
        arrays=tuple(
            Array(dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(text[:type_end])
        ),
        operands=tuple(re.findall(r"%([^\s,()]+)", arguments)),
        called=tuple(
            called
            for key in _CALLED_ATTRIBUTES
            if key in attributes
            for called in re.findall(r"[^\s,{}%]+", attributes[key])
        ),
        attributes=attributes,
        literal=arguments if opcode == "constant" else None,
    )


def _unquoted(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The characters of `text` from `start` that lie outside double-quoted strings (JSON
    backend configs and metadata hold brackets and commas of their own), with their indices."""
    quoted = escaped = False
    for i in range(start, len(text)):
        char = text[i]
        if escaped:
            escaped = False
        elif quoted:
            escaped = char == "\\"
            quoted = char != '"'
        elif char == '"':
            quoted = True
        else:
            yield i, char


def _balanced_end(text: str, start: int) -> int:
    """The index just past the bracket that closes the one at `start`."""
    depth = 0
    for i, char in _unquoted(text, start):
        if char in _CLOSING:
            depth += 1
        elif char in _CLOSING.values():
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in {text[start : start + 200]}")


def _split_top_level(text: str) -> Iterator[str]:
    """The non-empty comma-separated items of `text`, splitting outside brackets only."""
    depth, begin = 0, 0
    for i, char in _unquoted(text):
        if char in _CLOSING:
            depth += 1
        elif char in _CLOSING.values():
            depth -= 1
        elif char == "," and depth == 0:
            if text[begin:i].strip():
                yield text[begin:i]
            begin = i + 1
    if text[begin:].strip():
        yield text[begin:]


def _header_int(header: str, key: str) -> int:
    match = re.search(rf"\b{key}=(\d+)", header)
    return int(match.group(1)) if match else 1


def _dtype_bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    match = re.match(r"[a-z]+([0-9]+)", dtype)
    return int(match.group(1)) if match else 0  # token[] and the like carry no data


def _backend_config(instruction: Instruction) -> dict:
    try:
        config = json.loads(instruction.attributes.get("backend_config", "{}"))
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


# FLOPs ---------------------------------------------------------------------------------------


def _with_flops(computations: dict[str, Computation]) -> dict[str, Computation]:
    """The computations with each instruction's FLOPs filled in, callees first."""
    done: dict[str, Computation] = {}

    def total(name: str) -> int:
        return sum(instruction.flops for instruction in fill(name).instructions)

    def fill(name: str) -> Computation:
        if name not in done:
            computation = computations[name]
            instructions = tuple(
                dataclasses.replace(instruction, flops=flops(instruction, computation))
                for instruction in computation.instructions
            )
            done[name] = dataclasses.replace(computation, instructions=instructions)
        return done[name]

    def flops(instruction: Instruction, computation: Computation) -> int:
        attributes = instruction.attributes
        if instruction.opcode == "while":
            trip_count = _trip_count(instruction, computation, computations)
            return total(attributes["body"].lstrip("%")) * (trip_count or 1)
        if instruction.opcode == "conditional":
            return max(total(name) for name in instruction.called)
        if instruction.opcode in ("fusion", "call", "async-start"):
            return sum(total(name) for name in instruction.called)
        return _matmul_flops(instruction, computation)

    for name in computations:
        fill(name)
    return done


def _matmul_flops(instruction: Instruction, computation: Computation) -> int:
    """The FLOPs of a dot, a convolution, or a cuBLAS/cuDNN custom call; 0 for anything else."""

    def operand(index: int) -> Array:
        return computation.by_name[instruction.operands[index]].arrays[0]

    target = instruction.attributes.get("custom_call_target", "").strip('"')
    if instruction.opcode == "dot":
        contracting = _integers(instruction.attributes.get("lhs_contracting_dims", ""))
        contracted = math.prod(operand(0).dims[d] for d in contracting)
        return 2 * instruction.arrays[0].elements * contracted
    if instruction.opcode == "convolution" or (
        instruction.opcode == "custom-call"
        and target.startswith("__cudnn$conv")
        and "Forward" in target
    ):
        return _convolution_flops(instruction, operand(1))
    if instruction.opcode == "custom-call" and target.startswith("__cublas$"):
        numbers = _backend_config(instruction).get("gemm_backend_config", {})
        contracting = numbers.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions")
        if contracting is None:
            return 0  # no dimension numbers to read: counted as no compute
        contracted = math.prod(operand(0).dims[int(d)] for d in contracting)
        return 2 * instruction.arrays[0].elements * contracted
    return 0


def _convolution_flops(instruction: Instruction, kernel: Array) -> int:
    """2 x result elements x kernel taps x input features per group: the kernel's `i`
    dimension of `dim_labels` (the input features divided by `feature_group_count`). The taps
    of a spatial dimension are the kernel's size there, divided by the input's dilation
    (`lhs_dilate`), rounded up: a dilated input's holes are zeros, not work. XLA:TPU writes
    batched matmuls (attention's) as such convolutions, each batch dimension a window as large
    as its dilation: one tap."""
    kernel_labels = instruction.attributes["dim_labels"].split("->")[0].split("_")[1]
    dilation = re.search(r"lhs_dilate=([\dx]+)", instruction.attributes.get("window", ""))
    lhs_dilate = [int(d) for d in dilation.group(1).split("x")] if dilation else []
    taps = math.prod(
        -(-size // (lhs_dilate[int(label)] if lhs_dilate else 1))
        for label, size in zip(kernel_labels, kernel.dims, strict=True)
        if label.isdigit()
    )
    features = kernel.dims[kernel_labels.index("i")]
    return 2 * instruction.arrays[0].elements * taps * features


def _integers(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"-?\d+", text)]


# Loops ---------------------------------------------------------------------------------------


def _trip_count(
    loop: Instruction, caller: Computation, computations: Mapping[str, Computation]
) -> int | None:
    """`known_trip_count` from the backend config, else the counted-loop pattern: the
    condition's root compares tuple element k with a constant (LT or LE, either side), the body
    adds a constant step to element k, and the loop's initial tuple has a constant there."""
    known = _backend_config(loop).get("known_trip_count", {}).get("n")
    if known is not None:
        return int(known)
    condition = computations[loop.attributes["condition"].lstrip("%")]
    compare = condition.by_name[condition.root]
    if compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    counter, limit = (condition.by_name[name] for name in compare.operands)
    direction = compare.attributes.get("direction")
    if counter.opcode == "constant":
        counter, limit = limit, counter
        direction = {"GT": "LT", "GE": "LE"}.get(direction or "")
    if direction not in ("LT", "LE") or counter.opcode != "get-tuple-element":
        return None
    index = int(counter.attributes["index"])
    body = computations[loop.attributes["body"].lstrip("%")]
    step = _counter_step(body, index)
    start = _constant(caller, _tuple_element(caller, loop.operands[0], index))
    end = _constant(condition, limit.name)
    if step is None or start is None or end is None or step <= 0:
        return None
    count = (end - start + (step - 1 if direction == "LT" else step)) // step
    return max(count, 0)


def _counter_step(body: Computation, index: int) -> int | None:
    """The constant that the body adds to tuple element `index`, or None."""
    update_name = _tuple_element(body, body.root, index)
    update = body.by_name.get(update_name or "")
    if update is None or update.opcode != "add":
        return None
    counter = [body.by_name[name] for name in update.operands]
    steps = [_constant(body, i.name) for i in counter if i.opcode != "get-tuple-element"]
    reads_counter = any(
        i.opcode == "get-tuple-element" and int(i.attributes["index"]) == index for i in counter
    )
    return steps[0] if reads_counter and len(steps) == 1 else None


def _tuple_element(computation: Computation, tuple_name: str, index: int) -> str | None:
    instruction = computation.by_name.get(tuple_name)
    if instruction is None or instruction.opcode != "tuple":
        return None
    return instruction.operands[index]


def _constant(computation: Computation, name: str | None) -> int | None:
    """The integer value of `name`, following copies to a scalar constant, or None."""
    instruction = computation.by_name.get(name or "")
    while instruction is not None and instruction.opcode == "copy":
        instruction = computation.by_name.get(instruction.operands[0])
    if instruction is None or instruction.literal is None:
        return None
    try:
        return int(instruction.literal)
    except ValueError:
        return None


def _scheduled_computations(
    computations: Mapping[str, Computation], entry: str
) -> dict[str, str | None]:
    """The entry, then every computation reached from it through a `while`, `conditional` or
    `call` (those run as their own schedules; fusions and reducers do not), breadth first, each
    with the name of the innermost `while` that runs it (None: outside every loop)."""
    found: dict[str, str | None] = {}
    pending: list[tuple[str, str | None]] = [(entry, None)]
    while pending:
        name, loop = pending.pop(0)
        if name in found:
            continue
        found[name] = loop
        for instruction in computations[name].instructions:
            if instruction.opcode in ("while", "conditional", "call"):
                inner = instruction.name if instruction.opcode == "while" else loop
                pending.extend((called, inner) for called in instruction.called)
    return found


# Collectives ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Started:
    """An asynchronous collective whose done is not yet scheduled: its start's position, the
    instructions so far, and the collective instruction(s) that say its kind, group and (for
    wrappers and TPU fusions) what it delivers."""

    position: int
    names: tuple[str, ...]
    operations: tuple[Instruction, ...]


_OUTER = ""  # the chain of a collective started outside this computation (a loop body)


def _collectives(
    computation: Computation,
    computations: Mapping[str, Computation],
    devices: int,
    in_flight_parameters: set[int],
) -> tuple[list[Collective], dict[str, set[int]]]:
    """The collectives of one scheduled computation, each start paired with its done; and for
    each loop it runs while a TPU async collective is in flight, the loop body's parameter
    elements that carry that collective's buffers. `in_flight_parameters`: this computation's
    own such elements (a loop body: its continuation fusions are not collectives of its own)."""
    found: list[Collective] = []
    started: dict[str, _Started] = {}  # by the name that its next instruction refers to
    carriers: dict[str, str] = {}  # TPU: values carrying an async collective fusion's buffers
    carried_in: dict[str, dict[int, str]] = {}  # tuples and loops: element -> its chain
    loops_carrying: dict[str, set[int]] = {}

    def record(begun: _Started, position: int, name: str, arrays: tuple[Array, ...]) -> None:
        window = computation.instructions[begun.position + 1 : position]
        names = begun.names if begun.position == position else (*begun.names, name)
        kind = begun.operations[0].opcode.removesuffix("-start")
        group_size = _group_size(begun.operations[0], devices)
        received = sum(_received_bytes(kind, array.nbytes, group_size) for array in arrays)
        found.append(
            Collective(
                kind=kind,
                computation=computation.name,
                start=begun.position,
                done=position,
                instructions=names,
                arrays=arrays,
                group_size=group_size,
                received_bytes=received,
                window_flops=sum(instruction.flops for instruction in window),
            )
        )

    for position, instruction in enumerate(computation.instructions):
        opcode, name = instruction.opcode, instruction.name
        first_operand = instruction.operands[0] if instruction.operands else ""
        if opcode in COLLECTIVE_KINDS:
            record(_Started(position, (name,), (instruction,)), position, name, instruction.arrays)
        elif opcode.removesuffix("-start") in COLLECTIVE_KINDS:
            started[name] = _Started(position, (name,), (instruction,))
        elif opcode.removesuffix("-done") in COLLECTIVE_KINDS and first_operand in started:
            record(started.pop(first_operand), position, name, instruction.arrays)
        elif opcode == "async-start" and (wrapped := _inner_collectives(instruction, computations)):
            started[name] = _Started(position, (name,), wrapped)
        elif opcode == "async-update" and first_operand in started:
            begun = started.pop(first_operand)
            started[name] = dataclasses.replace(begun, names=(*begun.names, name))
        elif opcode == "async-done" and first_operand in started:
            record(started.pop(first_operand), position, name, instruction.arrays)
        elif opcode == "get-tuple-element" and first_operand in carriers:
            carriers[name] = carriers[first_operand]
        elif opcode == "get-tuple-element" and first_operand in carried_in:
            chain = carried_in[first_operand].get(int(instruction.attributes["index"]))
            if chain is not None:
                carriers[name] = chain
        elif opcode == "parameter" and in_flight_parameters:
            carried_in[name] = dict.fromkeys(in_flight_parameters, _OUTER)
        elif opcode == "tuple" and any(o in carriers for o in instruction.operands):
            operands = enumerate(instruction.operands)
            carried_in[name] = {i: carriers[o] for i, o in operands if o in carriers}
        elif opcode == "while" and first_operand in carried_in:
            carried_in[name] = carried_in[first_operand]  # the loop hands its buffers back
            body = instruction.attributes["body"].lstrip("%")
            loops_carrying[body] = set(carried_in[name])
        elif opcode == "fusion" and (inner := _inner_collectives(instruction, computations)):
            targets = _custom_call_targets(instruction, computations)
            chain = _chain_of(instruction, inner, carriers, started)
            delivered = tuple(array for operation in inner for array in operation.arrays)
            if ASYNC_COLLECTIVE_START in targets:
                started[name] = _Started(position, (name,), inner)
                carriers[name] = name
            elif chain == _OUTER:  # continues a collective of the computation running the loop
                carriers[name] = chain
            elif chain is not None and ASYNC_COLLECTIVE_DONE in targets:
                record(started.pop(chain), position, name, delivered)
            elif chain is not None:
                begun = started[chain]
                started[chain] = dataclasses.replace(begun, names=(*begun.names, name))
                carriers[name] = chain
            else:  # a collective fused into an ordinary, synchronous fusion
                record(_Started(position, (name,), inner), position, name, delivered)
    return sorted(found, key=lambda c: (c.start, c.done)), loops_carrying


def _received_bytes(kind: str, result_bytes: int, n: int) -> int:
    """The bytes one device of a group of `n` receives to make a result of `result_bytes`."""
    if kind == "collective-permute":
        return result_bytes
    if kind == "all-reduce":
        return 2 * result_bytes * (n - 1) // n
    if kind == "reduce-scatter":
        return result_bytes * (n - 1)
    return result_bytes * (n - 1) // n  # all-gather, all-to-all


def _group_size(operation: Instruction, devices: int) -> int:
    """The devices of one replica group (`{{0,1,..},..}` or iota `[groups,size]<=[..]`), those a
    collective-permute names, or all the module's devices where the groups are left empty."""
    attributes = operation.attributes
    if "source_target_pairs" in attributes:
        return len(set(_integers(attributes["source_target_pairs"])))
    groups = attributes.get("replica_groups", "")
    iota = re.match(r"\[(\d+),(\d+)\]<=", groups)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"\{([\d,]+)\}", groups)
    return len(listed.group(1).split(",")) if listed else devices


def _called_instructions(
    instruction: Instruction, computations: Mapping[str, Computation]
) -> Iterator[Instruction]:
    """The instructions of the computations a fusion or wrapper calls, nested fusions too."""
    for name in instruction.called:
        for inner in computations[name].instructions:
            yield inner
            if inner.opcode == "fusion":
                yield from _called_instructions(inner, computations)


def _inner_collectives(
    instruction: Instruction, computations: Mapping[str, Computation]
) -> tuple[Instruction, ...]:
    """The synchronous collective instructions of the computations a fusion or wrapper calls."""
    return tuple(
        inner
        for inner in _called_instructions(instruction, computations)
        if inner.opcode in COLLECTIVE_KINDS
    )


def _custom_call_targets(
    instruction: Instruction, computations: Mapping[str, Computation]
) -> set[str]:
    return {
        inner.attributes.get("custom_call_target", "").strip('"')
        for inner in _called_instructions(instruction, computations)
        if inner.opcode == "custom-call"
    }


def _chain_of(
    fusion: Instruction,
    inner: tuple[Instruction, ...],
    carriers: Mapping[str, str],
    started: Mapping[str, _Started],
) -> str | None:
    """The TPU async collective (its start's name) that a fusion continues or ends: one whose
    buffers reach it through an operand, and whose collective the fusion's computation holds
    too (same opcode and channel); `_OUTER` where the buffers come from the loop body's
    parameter, carrying a collective started outside the loop."""
    signatures = {_signature(operation) for operation in inner}
    for operand in fusion.operands:
        chain = carriers.get(operand)
        if chain == _OUTER:
            return chain
        if chain in started and {_signature(o) for o in started[chain].operations} <= signatures:
            return chain
    return None


def _signature(operation: Instruction) -> tuple[str, str, str]:
    attributes = operation.attributes
    return (
        operation.opcode,
        attributes.get("channel_id", ""),
        attributes.get("replica_groups", attributes.get("source_target_pairs", "")),
    )

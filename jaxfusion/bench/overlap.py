"""Whether a compiled denoising loop hides its exchange, read from the schedule a real
accelerator's compiler made (`jaxfusion.bench.schedule`), and what that projects for a step.

The model, per device, for the body of the displaced loop (one displaced step):

- compute time: the step's matmul and convolution FLOPs at the chip's peak throughput
  (`Target.peak_tflops`): a lower bound, the same for every configuration it compares;
- each collective's transfer time: the bytes one device receives over `Target.link_gbs`;
- a collective is *hidden* when the compute scheduled between its start and its done is at
  least `MIN_WINDOW` (a tenth) of the step's compute and takes at least its transfer time;
  one matmul beside an all-gather is not overlap;
- exposed time: each collective's transfer time less its window's compute time (never below
  0), summed, and never less than the step's whole transfer time less its compute time (one
  link carries all of them);
- projected step: compute time + exposed time. Speed-up: the single-device step's compute
  time over that.
"""

from __future__ import annotations

import dataclasses

from jaxfusion.bench.schedule import Collective, Schedule
from jaxfusion.bench.targets import Target

MIN_WINDOW = 0.1


@dataclasses.dataclass(frozen=True)
class CollectiveWindow:
    """One collective of the loop body: kind, bytes received per device, the FLOPs between
    its start and done and their share of the step, its transfer and window times (s)."""

    kind: str
    received_bytes: int
    window_flops: int
    window_share: float
    transfer_s: float
    window_s: float

    @property
    def hidden(self) -> bool:
        return self.window_share >= MIN_WINDOW and self.window_s >= self.transfer_s


@dataclasses.dataclass(frozen=True)
class LoopOverlap:
    """The displaced loop body of one compiled program on `target` (see the module's model)."""

    target: str
    step_flops: int
    trip_count: int | None
    collectives: tuple[CollectiveWindow, ...]
    compute_s: float
    exposed_s: float

    @property
    def received_bytes(self) -> int:
        return sum(c.received_bytes for c in self.collectives)

    @property
    def hidden_bytes(self) -> int:
        return sum(c.received_bytes for c in self.collectives if c.hidden)

    @property
    def hidden_share(self) -> float:
        """The share of the body's collective bytes that are hidden (1 with none)."""
        return self.hidden_bytes / self.received_bytes if self.received_bytes else 1.0

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s


def displaced_loop(schedule: Schedule, steps: int) -> str:
    """The body of the loop that runs the `steps` displaced steps: the entry's (or a called
    computation's) while loop with that trip count and the most FLOPs."""
    loops = [loop for loop in schedule.entry_loops() if loop.trip_count == steps]
    if not loops:
        counts = [loop.trip_count for loop in schedule.entry_loops()]
        raise ValueError(f"no loop of {steps} steps in the program (its loops: {counts})")
    return max(loops, key=lambda loop: schedule.flops(loop.body)).body


def loop_overlap(schedule: Schedule, body: str, target: Target) -> LoopOverlap:
    """The overlap of the collectives scheduled in the loop body `body` on `target`."""
    step_flops = schedule.flops(body)
    flops_per_s = target.peak_tflops * 1e12
    link = target.link_gbs * 1e9

    def window(c: Collective) -> CollectiveWindow:
        return CollectiveWindow(
            c.kind,
            c.received_bytes,
            c.window_flops,
            c.window_flops / step_flops if step_flops else 0.0,
            c.received_bytes / link,
            c.window_flops / flops_per_s,
        )

    windows = tuple(window(c) for c in schedule.collectives_in(body))
    compute_s = step_flops / flops_per_s
    transfer_s = sum(w.transfer_s for w in windows)
    exposed = sum(max(0.0, w.transfer_s - w.window_s) for w in windows)
    trip = next((loop.trip_count for loop in schedule.entry_loops() if loop.body == body), None)
    return LoopOverlap(
        target.name,
        step_flops,
        trip,
        windows,
        compute_s,
        max(exposed, transfer_s - compute_s),
    )

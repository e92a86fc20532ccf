"""The diagrams of docs/design.md: row slabs and conv halos, self-attention's K/V, and the
step schedule of displaced mode (its warm-up taken from `ParallelConfig.schedule`, the rule
the loops run).

    python docs/scripts/design_figures.py          # writes docs/images/{slabs,kv,schedule}.png

Drawings, not measurements: they show which rows and tokens each device reads from whom,
and when.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

OUT = Path(__file__).parents[1] / "images"
COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1"]
P = 4


def slabs(path: Path) -> None:
    """A feature map of 16 rows over 4 devices, and device 1's input to a 3x3 conv: its 4
    rows plus one halo row from each neighbour (zeros at the image's top and bottom)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2))
    rows, width = 16, 16
    for i in range(P):
        left.add_patch(Rectangle((0, i * 4), width, 4, color=COLOURS[i], alpha=0.75))
        left.text(width + 0.5, i * 4 + 2, f"device {i}\nrows {i * 4}-{i * 4 + 3}", va="center",
                  fontsize=9)  # fmt: skip
    for r in range(rows + 1):
        left.plot([0, width], [r, r], color="white", lw=0.4)
    left.set(xlim=(0, width + 6), ylim=(rows, 0), title="one feature map of height h = 16")
    left.axis("off")

    # Device 1's conv input: halo row 3 (device 0), own rows 4-7, halo row 8 (device 2).
    parts = [(3, 0, "halo: device 0's last row"), *[(r, 1, None) for r in range(4, 8)],
             (8, 2, "halo: device 2's first row")]  # fmt: skip
    for k, (row, owner, label) in enumerate(parts):
        alpha = 0.35 if label else 0.75
        right.add_patch(Rectangle((0, k), width, 1, color=COLOURS[owner], alpha=alpha))
        right.text(width / 2, k + 0.5, f"row {row}", ha="center", va="center", fontsize=8)
        if label:
            right.text(width + 0.5, k + 0.5, label, va="center", fontsize=9)
    right.text(width + 0.5, 3.5, "own rows, fresh", va="center", fontsize=9)
    right.set(xlim=(0, width + 11), ylim=(len(parts) + 1.5, -1.5),
              title="device 1's input to a 3x3 conv")  # fmt: skip
    right.text(0, len(parts) + 1.0,
               "sync step: halos of this step (ppermute to the two neighbours)\n"
               "displaced step: halos of the step before; this step's travel meanwhile",
               fontsize=8.5, va="center")  # fmt: skip
    right.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def kv(path: Path) -> None:
    """Self-attention on device 1 in a displaced step: queries from its own tokens; keys and
    values of its own tokens fresh, every other device's from the step before."""
    figure, ax = plt.subplots(figsize=(9, 3.4))
    for i in range(P):
        fresh = i == 1
        ax.add_patch(
            Rectangle((i * 2.2, 1.2), 2, 0.8, color=COLOURS[i], alpha=0.8 if fresh else 0.3)
        )
        ax.text(i * 2.2 + 1, 1.6, f"K,V of device {i}\n" + ("this step" if fresh else "step t-1"),
                ha="center", va="center", fontsize=8.5)  # fmt: skip
    ax.add_patch(Rectangle((2.2, -0.6), 2, 0.8, color=COLOURS[1], alpha=0.8))
    ax.text(3.2, -0.2, "Q: device 1's own tokens", ha="center", va="center", fontsize=8.5)
    ax.plot([0, 8.6], [1.1, 1.1], color="0.3", lw=1)
    ax.add_patch(FancyArrowPatch((3.2, 0.2), (4.3, 1.1), arrowstyle="->", mutation_scale=12))
    ax.text(9.0, 1.6,
            "attention over every token of the image:\n"
            "softmax(Q K^T / sqrt(d)) V, K and V of all devices\n\n"
            "sync: all_gather of this step's K,V, waited for\n"
            "displaced: this step's own K,V travel beside\n"
            "compute, and the next step reads them",
            va="center", fontsize=8.5)  # fmt: skip
    ax.set(xlim=(-0.2, 14.5), ylim=(-1, 2.4))
    ax.axis("off")
    ax.set_title("self-attention on device 1 in a displaced step", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def schedule(path: Path, steps: int = 8) -> None:
    """The steps of one displaced run on 4 devices, as `ParallelConfig.schedule` orders them:
    warm-up steps exchange and wait; displaced steps compute while the exchange travels, and
    the next step reads it."""
    from sharding.parallel import ParallelConfig

    scans = ParallelConfig(devices=P, mode="displaced").schedule(steps)
    figure, ax = plt.subplots(figsize=(10, 2.8))
    x = 0.0
    for kind, indices in scans:
        for step in indices:
            if kind == "warm-up":
                ax.add_patch(Rectangle((x, 1), 0.7, 0.5, color="#4e79a7"))
                ax.add_patch(Rectangle((x + 0.7, 1), 0.35, 0.5, color="#e15759"))
                ax.text(x + 0.52, 1.75, f"step {step}", ha="center", fontsize=8)
                x += 1.2
            else:
                ax.add_patch(Rectangle((x, 1), 0.7, 0.5, color="#4e79a7"))
                ax.text(x + 0.35, 1.75, f"step {step}", ha="center", fontsize=8)
                if step + 1 < steps:  # what this step produces travels into the next
                    ax.add_patch(Rectangle((x + 0.4, 0.4), 0.75, 0.3, color="#e15759", alpha=0.6))
                    ax.add_patch(FancyArrowPatch((x + 1.15, 0.55), (x + 1.25, 0.98),
                                                 arrowstyle="->", mutation_scale=8))  # fmt: skip
                x += 0.95
    warm = len(scans[0][1])
    ax.text(0, 2.25, f"warm-up: steps 0-{warm - 1}, synchronous (exact, and they fill the stale "
            "buffers)", fontsize=8.5)  # fmt: skip
    ax.text(warm * 1.2, 0.05, "displaced: what a step produces travels (red) beside compute "
            "(blue); the next step reads it", fontsize=8.5)  # fmt: skip
    ax.set(xlim=(-0.2, x + 0.2), ylim=(-0.1, 2.5))
    ax.axis("off")
    ax.set_title(f"{steps} steps on {P} devices, displaced mode's default warm-up", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    slabs(OUT / "slabs.png")
    kv(OUT / "kv.png")
    schedule(OUT / "schedule.png")
    for name in ("slabs", "kv", "schedule"):
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()

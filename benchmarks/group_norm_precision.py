"""GroupNorm's precision for inputs with a large mean: the variance it normalizes with and
its output, float32 against float64 numpy (the oracles of tests/test_group_norm.py), on one
device and on row patches (synchronous: every patch's moments combined).

    python benchmarks/group_norm_precision.py [--ratios 1 10 100 1000 10000] [--devices 1 4]
        [--json docs/results/group_norm_precision.json]

Input: (2, 16, 8, 16) float32, 4 groups, |mean| / std = ratio (mean `ratio`, std 1).
Reported per ratio and device count: the largest relative error of the variance over
(sample, group), and the relative L2 error of the output.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 10, 100, 1000, 10000])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", max(args.devices))
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from machine_info import machine
    from test_group_norm import EPSILON, GROUPS, group_norm_float64, true_variance, used_variance

    from jaxfusion.files import write_text_atomically
    from sharding import GroupNorm, ParallelConfig
    from sharding.rows import map_rows

    norm = GroupNorm(GROUPS, 16, epsilon=EPSILON, rngs=nnx.Rngs(0))
    noise = np.random.default_rng(0).standard_normal((2, 16, 8, 16))
    rows = []
    for ratio in args.ratios:
        x = (ratio + noise).astype(np.float32)
        expected = group_norm_float64(x)
        for devices in args.devices:
            parallel = ParallelConfig(devices, mode="single" if devices == 1 else "sync")
            y = np.asarray(map_rows(norm, lambda model, x: model(x), jnp.asarray(x), parallel))
            row = {
                "mean_over_std": ratio,
                "devices": devices,
                "variance_relative_error": float(
                    np.abs(used_variance(x, y) / true_variance(x) - 1).max()
                ),
                "output_relative_l2": float(
                    np.linalg.norm(y - expected) / np.linalg.norm(expected)
                ),
            }
            rows.append(row)
            print(
                f"|mean|/std {ratio:>7g}, {devices} device(s): variance error "
                f"{row['variance_relative_error']:.2e}, "
                f"output error {row['output_relative_l2']:.2e}"
            )
    if args.json:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        record = {
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "machine": machine(),
            "rows": rows,
        }
        write_text_atomically(args.json, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Traffic and stale memory per device of one displaced SDXL step for each codec of
`ParallelConfig.compress`, from the traced program alone (no devices, no weights, no
compile): the bytes each device receives per step (the codecs' packed payloads as they are),
against the reference PyTorch scheme's (`jaxfusion.bench.analyze.reference_bytes`) and
against `none`; and the projected step time on slow links (`projected_step_seconds`: a model,
not a measurement), its compute from the FLOPs `bench analyze` measured for the same row
(docs/results/analysis.json). Writes docs/results/codec_traffic.json.

    python benchmarks/codec_traffic.py [--sizes 2048 3840] [--devices 8]
"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp

from jaxfusion.bench.analyze import (
    abstract_inputs,
    load_config,
    projected_step_seconds,
    reference_bytes,
)
from jaxfusion.files import write_text_atomically
from sharding import ParallelConfig
from sharding.analysis import trace_step
from sharding.names import COMPRESSIONS

ROOT = Path(__file__).resolve().parents[1]
LINK_GBS = (25.0, 3.0, 0.5)  # PCIe 4 x16, a slow interconnect, CompactFusion's 500 MB/s
DEVICE_TFLOPS = 400.0  # as `bench analyze --device-tflops`'s default


def measured_flops(size: int, devices: int) -> float | None:
    """The step's FLOPs per device that `bench analyze` measured for SDXL at `size`."""
    path = ROOT / "docs/results/analysis.json"
    for record in json.loads(path.read_text()):
        if (record["height"], record["devices"], record["mode"]) == (size, devices, "displaced"):
            return record["flops_per_device_step"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 3840])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/codec_traffic.json")
    args = parser.parse_args()
    config = load_config("sdxl")
    records = []
    for size in args.sizes:
        unet, sampling, latents = abstract_inputs(config, size // 8, size // 8, jnp.bfloat16)
        flops = measured_flops(size, args.devices)
        none = reference = None
        for codec in COMPRESSIONS:
            parallel = ParallelConfig(devices=args.devices, mode="displaced", compress=codec)
            traced = trace_step(unet, sampling, latents, parallel, "displaced")
            received = sum(c.received_bytes for c in traced.collectives())
            stale = traced.stale_bytes_per_device()
            if codec == "none":
                none = dict(received=received, stale=stale)
                reference = reference_bytes(traced, config, latents)
            record = dict(
                model="sdxl",
                size=size,
                devices=args.devices,
                dtype="bfloat16",
                compress=codec,
                comm_bytes_per_device_step=received,
                comm_bytes_reference_per_device_step=reference,
                of_reference=received / reference,
                of_none=received / none["received"],
                stale_bytes_per_device=stale,
                stale_of_none=stale / none["stale"],
            )
            if flops is not None:
                record["projected_step_model"] = projected_step_seconds(
                    flops, received, LINK_GBS, DEVICE_TFLOPS
                )
            records.append(record)
            print(
                f"{size} {codec:>14}: {received / 1e9:.3f} GB/step ({record['of_reference']:.3f}"
                f" of reference, {record['of_none']:.3f} of none), stale "
                f"{stale / 1e9:.2f} GB ({record['stale_of_none']:.2f} of none)",
                flush=True,
            )
    data = {
        "command": "python benchmarks/codec_traffic.py --sizes "
        + " ".join(map(str, args.sizes))
        + f" --devices {args.devices}",
        "note": "traced program, no compile; projected_step_model is a model, not a "
        f"measurement (FLOPs from docs/results/analysis.json at {DEVICE_TFLOPS} TFLOP/s)",
        "records": records,
    }
    write_text_atomically(args.out, json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

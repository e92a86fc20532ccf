"""Peak host RAM of `jaxfusion.models.load_unet` on a synthetic SDXL-base-sized checkpoint.

Writes a diffusers UNet folder with the real SDXL base configuration and random weights
(2.57 G parameters; float16 by default, 5.1 GB on disk, streamed to disk one tensor at a
time), then loads it with `jaxfusion.models.load_unet` in a fresh process and reports that
process's peak resident memory against the checkpoint's size.

    python benchmarks/convert_memory.py [--dtype float16|float32] [--dir DIR] [--keep]
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LOAD = """
import sys, time
from jaxfusion.models import load_unet
start = time.perf_counter()
unet = load_unet(sys.argv[1], dtype=sys.argv[2])
print(time.perf_counter() - start)
"""


def write_synthetic_checkpoint(folder: Path, dtype: str) -> int:
    """Writes config.json and diffusion_pytorch_model.safetensors; returns the weights' bytes."""
    import jax.numpy as jnp
    from flax import nnx

    from convert.state_dict import diffusers_key, to_diffusers_shape
    from jaxfusion import UNet2DConditionModel, UNetConfig
    from jaxfusion.models.configs import UNET_CONFIGS

    config = UNET_CONFIGS["sdxl"]
    abstract = UNet2DConditionModel.abstract(UNetConfig.from_diffusers(config), dtype=jnp.float32)
    shapes = {
        diffusers_key(path): to_diffusers_shape(path[-1], var.get_value().shape)
        for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    itemsize = np.dtype(dtype).itemsize
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        header[key] = {
            "dtype": {"float16": "F16", "float32": "F32"}[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    noise = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for shape in shapes.values():
            count = int(np.prod(shape))
            for start in range(0, count, noise.size):
                file.write(noise[: min(noise.size, count - start)].tobytes())
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    args = parser.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="jaxfusion-sdxl-"))
    try:
        print(f"writing a synthetic SDXL UNet checkpoint ({args.dtype}) to {folder} ...")
        weights = write_synthetic_checkpoint(folder, args.dtype)
        print(f"  {weights / 1e9:.2f} GB of weights; loading it in a fresh process ...")
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", LOAD, str(folder), args.dtype],
            check=True,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        result = {
            "checkpoint_bytes": weights,
            "dtype": args.dtype,
            "peak_rss_bytes": peak,
            "peak_over_checkpoint": peak / weights,
            "load_seconds": float(done.stdout.split()[-1]),
            "process_seconds": wall,
        }
        print(
            f"checkpoint {weights / 1e9:.2f} GB | peak RSS of the loading process "
            f"{peak / 1e9:.2f} GB = {peak / weights:.2f}x the checkpoint | load_unet "
            f"{result['load_seconds']:.1f} s (process {wall:.1f} s)"
        )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

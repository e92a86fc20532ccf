"""Which collectives of one displaced SDXL step cross the host boundary on 2 hosts x 8
devices, and their bytes per step (`sharding.analysis.host_links`, from the traced program:
no devices or weights). Writes docs/results/multihost_links.json.

    python benchmarks/multihost_links.py [--size 3840] [--hosts 2]
"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp

from jaxfusion.bench.analyze import abstract_inputs, data_group, load_config
from jaxfusion.files import write_text_atomically
from sharding import ParallelConfig
from sharding.analysis import host_links, trace_step

LAYOUTS = [dict(data=1, cfg=2), dict(data=2, cfg=1), dict(data=2, cfg=2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=3840)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--out", default="docs/results/multihost_links.json")
    args = parser.parse_args()
    config = load_config("sdxl")
    unet, sampling, latents = abstract_inputs(config, args.size // 8, args.size // 8, jnp.bfloat16)
    records = []
    for layout in LAYOUTS:
        parallel = ParallelConfig(devices=args.devices, mode="displaced", **layout)
        parallel.check_size(args.size, args.size, 8 * 2 ** (config.num_levels - 1))
        # one prompt per data group; the groups run the same step and exchange nothing
        traced = trace_step(unet, sampling, latents, data_group(parallel), "displaced")
        links = host_links(traced, args.hosts, parallel.data)
        record = dict(
            model="sdxl",
            size=args.size,
            hosts=args.hosts,
            devices=args.devices,
            data=parallel.data,
            cfg=parallel.cfg,
            patch=parallel.patches,
            prompts=parallel.data,
            links=links,
            cross_host_bytes_per_step=sum(v["cross_host"] for v in links.values()),
            within_host_bytes_per_step=sum(v["within_host"] for v in links.values()),
        )
        records.append(record)
        print(
            f"D={parallel.data} C={parallel.cfg} P={parallel.patches}: cross-host "
            f"{record['cross_host_bytes_per_step'] / 1e6:,.1f} MB/step, within hosts "
            f"{record['within_host_bytes_per_step'] / 1e6:,.1f} MB/step; "
            + ", ".join(f"{k} {v['cross_host'] / 1e6:,.1f}" for k, v in links.items())
        )
    write_text_atomically(Path(args.out), json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()

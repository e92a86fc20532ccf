"""Temporaries of the SDXL UNet forward and VAE decode on one device, per attention kernel,
compiled from shapes alone (no weights) for this machine's CPU, in bfloat16.

    python benchmarks/memory_table.py [--sizes 1024 2048 3840] [--attention xla auto chunked]
        [--json docs/results/memory_table.json]

UNet: one denoising step with the CFG batch of 2, as `jaxfusion bench analyze`'s single step
(`abstract_inputs`; one call of the UNet on a (2, H/8, W/8, 4) latent and the sampler's
update). VAE: `AutoencoderKL.decode` of one (1, H/8, W/8, 4) latent. Each with every
attention kernel of `--attention` set on the abstract model (`set_attention`) before
`nnx.split`; "xla" stores the float32 logits (the behaviour before the attention kernels).
Reported: `memory_analysis().temp_size_in_bytes` (and arguments, outputs), how long lowering
and compiling took and the peak resident memory of this process while compiling. The JSON is
rewritten after every compile, so that an interrupted run keeps what it measured.
"""

import argparse
import datetime
import json
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import psutil
from flax import nnx
from machine_info import machine

from jaxfusion.bench.analyze import downscale_factor, single_step
from jaxfusion.files import write_text_atomically
from jaxfusion.models import AutoencoderKL, UNetConfig, VAEConfig
from jaxfusion.models.configs import UNET_CONFIGS, VAE_CONFIGS
from jaxfusion.models.names import ATTENTION_BACKENDS
from jaxfusion.models.scaled_dot_product import set_attention

# The issue's figures (GB of temporaries, xla attention): UNet step and VAE decode.
ISSUE_GB = {
    "unet": {1024: 3.3, 2048: 27.2, 3840: 306},
    "vae": {1024: 3.2, 2048: 17.5, 3840: 213},
}
SLOW_COMPILE_SECONDS = 300


class PeakRSS:
    """The peak resident memory of this process while the block runs (polled every 0.1 s)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def unet_step(size: int, attention: str):
    """The lowered single-device step (CFG batch 2) of the SDXL UNet for size x size."""
    config = UNetConfig.from_diffusers(UNET_CONFIGS["sdxl"])
    return single_step(
        config, size, size, jnp.bfloat16, attention, downscale=downscale_factor("sdxl")
    )


def vae_decode(size: int, attention: str):
    """The lowered SDXL VAE decode of one (1, size/8, size/8, 4) latent."""
    vae = AutoencoderKL.abstract(VAEConfig.from_diffusers(VAE_CONFIGS["sdxl"]), dtype=jnp.bfloat16)
    set_attention(vae, attention)
    graphdef, weights = nnx.split(vae)
    latents = jax.ShapeDtypeStruct((1, size // 8, size // 8, 4), jnp.bfloat16)

    def decode(weights, latents):
        return nnx.merge(graphdef, weights).decode(latents)

    return jax.jit(decode).lower(weights, latents)


def measure(model: str, size: int, attention: str) -> dict:
    lower = {"unet": unet_step, "vae": vae_decode}[model]
    with PeakRSS() as rss:
        start = time.perf_counter()
        lowered = lower(size, attention)
        lowered_at = time.perf_counter()
        memory = lowered.compile().memory_analysis()
        compiled_at = time.perf_counter()
    jax.clear_caches()
    return dict(
        model=model,
        size=size,
        attention=attention,
        temp_bytes=memory.temp_size_in_bytes,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        lower_seconds=round(lowered_at - start, 1),
        compile_seconds=round(compiled_at - lowered_at, 1),
        peak_rss_bytes_while_compiling=rss.peak,
        issue_temp_gb=ISSUE_GB[model].get(size) if attention == "xla" else None,
    )


def print_table(records: list[dict]) -> None:
    print(f"\n{'model':5} {'size':>5} {'attention':>9} {'temp GB':>9} {'issue GB':>9} "
          f"{'compile s':>10} {'peak RSS GB':>12}")  # fmt: skip
    for r in records:
        issue = "" if r["issue_temp_gb"] is None else f"{r['issue_temp_gb']:.1f}"
        print(
            f"{r['model']:5} {r['size']:>5} {r['attention']:>9} {r['temp_bytes'] / 1e9:>9.2f} "
            f"{issue:>9} {r['lower_seconds'] + r['compile_seconds']:>10.1f} "
            f"{r['peak_rss_bytes_while_compiling'] / 1e9:>12.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3840])
    parser.add_argument(
        "--attention", nargs="+", choices=ATTENTION_BACKENDS, default=["xla", "auto", "chunked"]
    )
    parser.add_argument("--models", nargs="+", choices=["unet", "vae"], default=["unet", "vae"])
    parser.add_argument("--json", type=Path, default=Path("docs/results/memory_table.json"))
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")

    result = dict(
        benchmark="memory_table",
        command="python benchmarks/memory_table.py",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
        dtype="bfloat16",
        note="temp_bytes: memory_analysis().temp_size_in_bytes of the program compiled for "
        "this CPU from shapes; unet: one denoising step, CFG batch 2; vae: decode of one image",
        records=[],
    )
    for size in args.sizes:
        for model in args.models:
            for attention in args.attention:
                print(f"{model} {size}x{size} attention={attention}: compiling ...", flush=True)
                record = measure(model, size, attention)
                result["records"].append(record)
                seconds = record["lower_seconds"] + record["compile_seconds"]
                print(
                    f"  temporaries {record['temp_bytes'] / 1e9:.2f} GB, lowered and compiled "
                    f"in {seconds:.0f} s, peak RSS "
                    f"{record['peak_rss_bytes_while_compiling'] / 1e9:.2f} GB",
                    flush=True,
                )
                if seconds > SLOW_COMPILE_SECONDS:
                    print(f"  slow: over {SLOW_COMPILE_SECONDS} s", flush=True)
                write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")
    print_table(result["records"])
    print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()

"""Speed of the attention kernels side by side in one run: the kernels alone at the SDXL
UNet's self-attention lengths, and the whole built-in pipeline with each `attention=` choice.

    python benchmarks/attention_speed.py [--lengths 1024 4096 16384] [--sizes 64 256]
        [--runs 5] [--json docs/results/attention_speed.json]

Kernels: q, k, v of (2, T, 10, 64) float32 (batch 2 for classifier-free guidance, SDXL's
640-channel level), each kernel jit-compiled, one warm-up call, then `--runs` rounds that
call every kernel once in turn (median seconds per call). "auto" is timed too, with the
kernel it picks for these shapes. xla is skipped where its float32 logits (B x heads x T x
T) would take more than `--max-xla-logits-gb`. Also the largest difference of each output
from xla's.

Pipeline: `jaxfusion.load_pipeline(builtin_model_path())` on one device, called with
height = width = each of `--sizes`, `--steps` steps and attention "auto", "xla" and
"chunked": a warm-up call (compilation) per choice, then `--runs` rounds, each calling every
choice once (median seconds per call). Also which kernel "auto" picked for each attention
call of the pipeline. The point: auto must not make small sizes slower than xla.
"""

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine_info import machine

import jaxfusion
from jaxfusion.builtin import builtin_model_path
from jaxfusion.files import write_text_atomically
from jaxfusion.models import scaled_dot_product as sdp

BATCH, HEADS, HEAD_DIM = 2, 10, 64
PROMPT = "a red circle at the top left"
BACKENDS = ("auto", "xla", "chunked")


def interleaved_medians(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, dict]:
    """One warm-up call of each, then `runs` rounds calling each once in turn: per name the
    warm-up seconds, every timed call's seconds and their median."""
    results = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        results[name] = {"warmup_seconds": time.perf_counter() - start, "seconds": []}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            results[name]["seconds"].append(time.perf_counter() - start)
    for entry in results.values():
        entry["median_seconds"] = statistics.median(entry["seconds"])
    return results


class AutoChoices:
    """Records what `auto` resolves to while tracing: {(q shape, k shape): kernel}."""

    def __init__(self):
        self.choices: dict[str, str] = {}
        self._resolve = sdp.resolve_backend

    def __enter__(self):
        def resolve(backend, q, k):
            kernel = self._resolve(backend, q, k)
            if backend == "auto":
                self.choices[f"q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype}"] = kernel
            return kernel

        sdp.resolve_backend = resolve
        return self

    def __exit__(self, *exc):
        sdp.resolve_backend = self._resolve


def kernels(lengths: list[int], runs: int, max_xla_logits: float) -> list[dict]:
    records = []
    for length in lengths:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        keys = jax.random.split(jax.random.key(length), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
        logits_bytes = BATCH * HEADS * length * length * 4
        auto_kernel = sdp.resolve_backend("auto", q, k)
        backends = {
            "auto": jax.jit(lambda q, k, v: sdp.attention(q, k, v, backend="auto")),
            "xla": jax.jit(sdp.xla_attention),
            "chunked": jax.jit(sdp.chunked_attention),
        }
        skipped = {}
        if logits_bytes > max_xla_logits:
            skipped["xla"] = f"its float32 logits would take {logits_bytes / 1e9:.1f} GB"
            del backends["xla"]
            if auto_kernel == "xla":
                skipped["auto"] = "auto picks xla here"
                del backends["auto"]
        print(
            f"kernels at T={length} (logits {logits_bytes / 1e9:.2f} GB, auto -> {auto_kernel})"
            + "".join(f"; {name} skipped: {why}" for name, why in skipped.items()),
            flush=True,
        )
        calls = {
            name: (lambda f=f, q=q, k=k, v=v: f(q, k, v).block_until_ready())
            for name, f in backends.items()
        }
        timed = interleaved_medians(calls, runs)
        reference = backends.get("xla")
        outputs = {name: np.asarray(f(q, k, v)) for name, f in backends.items()}
        for name, entry in timed.items():
            if reference is not None:
                entry["max_abs_difference_from_xla"] = float(
                    np.abs(outputs[name] - outputs["xla"]).max()
                )
            print(f"  {name:8} median {entry['median_seconds'] * 1e3:9.1f} ms", flush=True)
        records.append(
            dict(
                tokens=length,
                shape=list(shape),
                dtype="float32",
                xla_logits_bytes=logits_bytes,
                auto_picks=auto_kernel,
                skipped=skipped,
                backends=timed,
            )
        )
    return records


def pipeline(sizes: list[int], steps: int, runs: int) -> list[dict]:
    pipe = jaxfusion.load_pipeline(builtin_model_path())
    records = []
    for size in sizes:
        print(f"pipeline {size}x{size}, {steps} steps: compiling and timing ...", flush=True)

        def call(attention, size=size):
            return pipe(
                PROMPT, height=size, width=size, num_inference_steps=steps, attention=attention
            )

        with AutoChoices() as auto:
            call("auto")  # traced and compiled here, so that the choices are seen
        timed = interleaved_medians({b: (lambda b=b: call(b)) for b in BACKENDS}, runs)
        images = {b: call(b) for b in BACKENDS}
        for name, entry in timed.items():
            entry["max_abs_difference_from_xla"] = float(np.abs(images[name] - images["xla"]).max())
            print(f"  {name:8} median {entry['median_seconds']:7.3f} s per image", flush=True)
        records.append(
            dict(
                height=size,
                width=size,
                steps=steps,
                auto_picks=auto.choices,
                backends=timed,
                auto_over_xla=timed["auto"]["median_seconds"] / timed["xla"]["median_seconds"],
            )
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--max-xla-logits-gb", type=float, default=4.0)
    parser.add_argument("--json", type=Path, default=Path("docs/results/attention_speed.json"))
    args = parser.parse_args()

    result = dict(
        benchmark="attention_speed",
        command="python benchmarks/attention_speed.py",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
        xla_logits_bytes_auto_limit=sdp.XLA_LOGITS_BYTES,
        chunks=dict(query=sdp.QUERY_CHUNK, key=sdp.KEY_CHUNK),
        runs=args.runs,
    )
    result["kernels"] = kernels(args.lengths, args.runs, args.max_xla_logits_gb * 1e9)
    write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")
    result["pipeline"] = pipeline(args.sizes, args.steps, args.runs)
    write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")

    print(f"\n{'kernels, T':>12} {'auto ms':>10} {'xla ms':>10} {'chunked ms':>11}  auto picks")
    for r in result["kernels"]:
        ms = {b: r["backends"][b]["median_seconds"] * 1e3 for b in r["backends"]}
        cells = [f"{ms[b]:.1f}" if b in ms else "skipped" for b in BACKENDS]
        print(f"{r['tokens']:>12} {cells[0]:>10} {cells[1]:>10} {cells[2]:>11}  {r['auto_picks']}")
    print(f"\n{'pipeline':>12} {'auto s':>10} {'xla s':>10} {'chunked s':>11}  auto / xla")
    for r in result["pipeline"]:
        s = [r["backends"][b]["median_seconds"] for b in BACKENDS]
        size = f"{r['height']}x{r['width']}"
        print(f"{size:>12} {s[0]:>10.3f} {s[1]:>10.3f} {s[2]:>11.3f}  {r['auto_over_xla']:.3f}")
    print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()

"""How long a new user waits for `jaxfusion --help` and for the refusal of a bad request on
an SDXL-sized checkpoint.

    python benchmarks/first_refusal.py --label after [--checkout PATH] [--folder DIR]
        [--json docs/results/first_refusal.json]

The checkpoint is synthetic: the SDXL base architecture (UNet, VAE, both text encoders, as
`jaxfusion.models.configs` gives them) with random float16 weights, 6.9 GB of safetensors,
written once into --folder (kept for the next run) by this checkout's `save_pretrained`.
Timed, each as a fresh `python -m jaxfusion.cli` process of the --checkout on PYTHONPATH
(default: this one), wall seconds (the checkpoint was just written or read, so it is
likely in the page cache: reading it from a disk takes longer): `--help`; `generate
--help`; `generate --height 1000` on the checkpoint (1000 is not a multiple of SDXL's
32: refused), until the process ends.
Every run replaces its own label's record in the JSON and keeps the others.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "first_refusal.json"
HERE = Path(__file__).resolve().parents[1]
WORDS = ("a", "red", "circle")


def write_checkpoint(folder: Path) -> None:
    """The synthetic SDXL pipeline folder (random float16 weights, a tiny tokenizer)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxfusion.models import AutoencoderKL, UNet2DConditionModel
    from jaxfusion.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from jaxfusion.models.configs import TEXT_ENCODER_CONFIGS, UNET_CONFIGS, VAE_CONFIGS
    from jaxfusion.models.unet_2d_condition import UNetConfig
    from jaxfusion.models.vae import VAEConfig
    from jaxfusion.pipelines import SDXLPipeline
    from jaxfusion.pipelines.stable_diffusion import Models
    from jaxfusion.tokenizer import load_tokenizer, write_tokenizer

    rngs = nnx.Rngs(0)
    dtype = jnp.float16
    texts = [CLIPTextConfig.from_transformers(c) for c in TEXT_ENCODER_CONFIGS["sdxl"]]
    models = Models(
        UNet2DConditionModel(
            UNetConfig.from_diffusers(UNET_CONFIGS["sdxl"]), dtype=dtype, rngs=rngs
        ),
        AutoencoderKL(VAEConfig.from_diffusers(VAE_CONFIGS["sdxl"]), dtype=dtype, rngs=rngs),
        [
            cls(config, dtype=dtype, rngs=rngs)
            for cls, config in zip((CLIPTextModel, CLIPTextModelWithProjection), texts, strict=True)
        ],
    )
    tokenizers = []
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_tokenizer(folder.parent / f"{folder.name}-{name}", WORDS, pad_token=pad)
        tokenizers.append(load_tokenizer(folder.parent / f"{folder.name}-{name}"))
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    SDXLPipeline(models, tokenizers, scheduler).save_pretrained(folder)


def timed(argv: list[str], checkout: Path, expect: int, message: str = "") -> float:
    """Wall seconds of `python -m jaxfusion.cli ARGV` from `checkout`, which must exit with
    `expect` and print `message`. It runs in an empty folder: `-m` would put the current
    folder's jaxfusion first."""
    env = dict(os.environ, PYTHONPATH=str(checkout), JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as empty:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "jaxfusion.cli", *argv],
            env=env,
            cwd=empty,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    if result.returncode != expect or message not in result.stderr:
        raise SystemExit(f"{argv} exited with {result.returncode}:\n{result.stderr[-2000:]}")
    return round(seconds, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkout", type=Path, default=HERE)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/jaxfusion-sdxl-synthetic"))
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.folder / "model_index.json").is_file():
        print(f"writing the synthetic SDXL checkpoint to {args.folder} ...", flush=True)
        write_checkpoint(args.folder)
    size = sum(f.stat().st_size for f in args.folder.rglob("*.safetensors"))
    commit = subprocess.run(
        ["git", "-C", str(args.checkout), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    refusal = ["generate", "--model", str(args.folder), "--prompt", "a red circle"]
    record = {
        "label": args.label,
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint_bytes": size,
        "help_seconds": timed(["--help"], args.checkout, 0),
        "generate_help_seconds": timed(["generate", "--help"], args.checkout, 0),
        "bad_size_refusal_seconds": timed(
            [*refusal, "--height", "1000", "--out", "/tmp/first-refusal.png"],
            args.checkout,
            2,
            "height=1000 is not a positive multiple of 32",
        ),
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(record, indent=2))
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    records = [r for r in results.get("records", []) if r["label"] != args.label]
    results = {
        "benchmark": "first_refusal",
        "command": "python benchmarks/first_refusal.py --label LABEL [--checkout PATH]",
        "machine": machine(),
        "records": [*records, record],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

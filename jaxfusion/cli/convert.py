"""`jaxfusion convert`: a pipeline folder (diffusers or Flax, LoRAs fused) written as a Flax
checkpoint folder, or back."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from jaxfusion.cli.options import DTYPES, add_loading_options, load_loras

if TYPE_CHECKING:
    from jaxfusion.display import StageDisplay


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `jaxfusion convert` to `commands`."""
    convert = commands.add_parser(
        "convert", help="diffusers pipeline folder -> Flax checkpoint folder, or back"
    )
    convert.add_argument("source", help="pipeline folder (diffusers or Flax) or hub id")
    convert.add_argument("destination", help="new folder to write")
    convert.add_argument(
        "--to-diffusers", action="store_true", help="write safetensors (diffusers) weights"
    )
    convert.add_argument("--dtype", choices=DTYPES, default="float32")
    convert.add_argument("--overwrite", action="store_true", help="replace the destination")
    add_loading_options(convert)
    convert.set_defaults(command=run_convert)


def run_convert(args: argparse.Namespace, display: StageDisplay) -> int:
    from jaxfusion.pipelines import load_pipeline

    destination = Path(args.destination)
    if destination.exists() and not args.overwrite:
        raise FileExistsError(f"{destination} exists: pass --overwrite to replace it")
    loading = dict(dtype=args.dtype, variant=args.variant, allow_pickle=args.allow_pickle)
    # A broken folder or LoRA fails here, before any weight is read.
    load_loras(load_pipeline(args.source, abstract=True, **loading), args.lora)
    pipe = load_pipeline(args.source, stage=display, **loading)
    load_loras(pipe, args.lora)
    kind = "diffusers (safetensors)" if args.to_diffusers else "Flax (orbax)"
    with display(f"writing {kind} folder {args.destination}"):
        pipe.save_pretrained(args.destination, flax=not args.to_diffusers, overwrite=args.overwrite)
    return 0

"""The options several commands share, each group beside what reads it: the model and its
loading (`load`), the request (`generation_kwargs`, `image_kwargs`, `request_options`), patch
parallelism (`parallel_config`), and their value types."""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxfusion.bench.options import read_prompts
from jaxfusion.models.names import ATTENTION_BACKENDS
from jaxfusion.schedulers.config import KINDS
from sharding.names import COMPRESSIONS, GROUP_NORM_RULES, MODES, NAIVE_SPLITS

if TYPE_CHECKING:
    from jaxfusion.compilation_cache import CacheHits
    from jaxfusion.display import StageDisplay
    from jaxfusion.pipelines import TextToImagePipeline
    from sharding.parallel import ParallelConfig

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_STEPS = 50
# The rule of sharding.parallel.default_warmup_steps.
WARMUP_HELP = (
    "displaced: steps 0..K run synchronously (default: min(4, max(1, steps // 4)), so 4 from "
    "16 steps, 1 for 4 steps)"
)
GUIDANCE_HELP = (
    "classifier-free guidance scale, 0 or more: 1 or less turns guidance off, as diffusers "
    "(default as diffusers: 5.0 SDXL, 7.5 SD)"
)
COMPRESS_HELP = "the codec of what displaced steps exchange and keep (K/V and conv halos)"
KV_REFRESH_HELP = "displaced steps exchange self-attention K/V only every K-th step"


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help='weight-file variant, e.g. "fp16"')
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_option,
        metavar="PATH[:SCALE]",
        help="fuse a LoRA (safetensors file, folder or hub id; diffusers/PEFT or kohya "
        "format) into the weights, times SCALE (default 1); repeatable",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (.bin, .ckpt); they run code when loaded",
    )


def add_attention_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="attention kernel: auto (xla for short sequences, else cudnn on NVIDIA GPUs in "
        "bfloat16/float16, else chunked), xla, chunked (exact, memory-bounded), cudnn",
    )


def loading_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `load_pipeline` options of the loading arguments."""
    return dict(
        dtype=args.dtype,
        variant=args.variant,
        allow_pickle=args.allow_pickle,
        attention=args.attention,
    )


def model_path(args: argparse.Namespace) -> str | Path:
    """The pipeline folder (or hub id) --model names; without it, the built-in model's."""
    if args.model is not None:
        return args.model
    from jaxfusion import builtin

    return builtin.builtin_model_path()


def load(
    args: argparse.Namespace,
    display: StageDisplay,
    check: Callable[[TextToImagePipeline], object] | None = None,
) -> tuple[TextToImagePipeline, CacheHits]:
    """(the pipeline --model names, the counter of programs served by the disk cache), with
    JAX's persistent compilation cache turned on. `check` runs first on the pipeline with
    shapes for weights (configs, tokenizers and the weight files' names read, nothing
    else), so that a request it refuses is refused before any weight is read."""
    from jaxfusion import builtin
    from jaxfusion.compilation_cache import enable_compilation_cache
    from jaxfusion.pipelines import load_pipeline

    if args.model is None:
        display.note(f"model: {builtin.DESCRIPTION}")
    loading = loading_options(args)
    if check is not None:
        abstract = load_pipeline(model_path(args), abstract=True, **loading)
        load_loras(abstract, args.lora)
        check(abstract)
    cache_hits = enable_compilation_cache()
    pipe = load_pipeline(model_path(args), stage=display, **loading)
    if args.lora:
        with display(f"fusing {len(args.lora)} LoRA(s)"):
            load_loras(pipe, args.lora)
    return pipe, cache_hits


def load_loras(pipe: TextToImagePipeline, loras: Sequence[tuple[str, float]]) -> None:
    for path, scale in loras:
        pipe.load_lora(path, scale)


def lora_option(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (PATH, SCALE); a ':' of an existing path is part of it."""
    path, colon, scale = text.rpartition(":")
    if not colon or Path(text).exists():
        return text, 1.0
    value = float_option(
        scale,
        f"{text!r}: no such file or folder, and {scale!r} after its last ':' is not a "
        f"number: use PATH or PATH:SCALE, e.g. {path}:0.8",
    )
    return path, value


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="diffusers pipeline folder or hub id (default: the built-in model)"
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt", action="append", help="a prompt; several for a batch (one image each)"
    )
    prompts.add_argument("--prompts", help="a text file of prompts, one per line")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=guidance_option, help=GUIDANCE_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=KINDS, help="default: the model folder's own")
    parser.add_argument(
        "--latents",
        help="initial noise .npy, as the diffusers pipeline takes it: NCHW (batch, channels, "
        "height/f, width/f); Flux: packed (batch, tokens, 4 x channels)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    add_attention_option(parser)
    add_loading_options(parser)
    add_parallel_options(parser)


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call of `generate` and `compare`."""
    import numpy as np

    latents = None
    prompts = args.prompt or prompts_file(args.prompts)
    if args.latents is not None:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(
                f"--latents {args.latents} is not a .npy array file (numpy.save): {error}"
            ) from None
        if not isinstance(latents, np.ndarray):
            raise ValueError(f"--latents {args.latents} is an archive: save one array (numpy.save)")
        if latents.ndim not in (3, 4):
            raise ValueError(
                f"--latents {args.latents} has shape {latents.shape}; expected what the "
                "model's diffusers pipeline takes as latents: NCHW (batch, channels, "
                "height/f, width/f), or Flux's packed (batch, tokens, 4 x channels)"
            )
        if len(prompts) == 1:
            prompts = prompts * latents.shape[0]
    return dict(
        prompt=prompts,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        latents=latents,
        scheduler=args.scheduler,
        parallel=parallel_config(args),
    )


def prompts_file(path: str) -> list[str]:
    """The prompts of --prompts FILE (`read_prompts`), a file that cannot be read refused
    in the option's words."""
    try:
        return read_prompts(path)
    except OSError as error:
        raise OSError(
            f"--prompts {path}: {error.strerror or error}: name a text file, one prompt a line"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not a UTF-8 text file, one prompt a line") from None


def guidance_option(text: str) -> float:
    """--guidance: 0 or more."""
    value = float_option(text, f"{text!r} is not a number")
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text} is negative: use 0 to 1 to turn classifier-free guidance off (as "
            "diffusers runs any value up to 1), or above 1 to guide (default 5.0 SDXL, 7.5 SD)"
        )
    return value


def add_image_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image-to-image and the SDXL refiner")
    group.add_argument(
        "--image", help="start from this image (resized to --height and --width if both given)"
    )
    group.add_argument(
        "--strength",
        type=strength_option,
        help="with --image: how much to change it, in (0, 1] (default as diffusers: 0.8 SD, "
        "0.3 SDXL)",
    )
    group.add_argument(
        "--refiner", help="an SDXL refiner folder or hub id: it denoises the last steps"
    )
    group.add_argument(
        "--high-noise-frac",
        type=float,
        help="with --refiner: the fraction of the steps the base denoises (default 0.8)",
    )


def image_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The image-to-image arguments of the pipeline call of `generate` and `compare`: --image
    read (and resized to --height x --width where both are given), --strength."""
    if args.image is None:
        return dict(strength=args.strength)  # the pipeline refuses a strength without image
    from jaxfusion.images import read_image

    size = None if None in (args.height, args.width) else (args.height, args.width)
    return dict(image=read_image(args.image, size), strength=args.strength)


def strength_option(text: str) -> float:
    """--strength: in (0, 1]."""
    value = float_option(text, f"{text!r} is not a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text} is not in (0, 1]: the fraction of the steps that change the image "
            "(0.3: a light touch, 1: all of them, as from noise)"
        )
    return value


def float_option(text: str, refusal: str) -> float:
    """A finite number, or argparse's refusal of the option (`refusal`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(refusal) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: use a finite number")
    return value


def add_measurement_options(
    parser: argparse.ArgumentParser, steps: int, prompt: str | None = None
) -> None:
    """The model and request of `bench time`, `profile` and `eval`: the --steps default, and
    the --prompt default (None: no --prompt, as eval takes --prompts)."""
    parser.add_argument(
        "--model", help="diffusers pipeline folder or hub id (default: the built-in model)"
    )
    if prompt is not None:
        parser.add_argument("--prompt", default=prompt)
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=guidance_option, help=GUIDANCE_HELP)
    parser.add_argument("--scheduler", choices=KINDS, help="default: the folder's own")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    add_attention_option(parser)
    add_loading_options(parser)


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `jaxfusion.bench.options.Generation` fields of a measurement's arguments."""
    return dict(
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
    )


def filling(out: Path | None) -> AbstractContextManager:
    """The --out folder a command fills file by file (None: this process writes none):
    removed, or emptied if it was there, if the command is stopped."""
    from jaxfusion import files

    return contextlib.nullcontext() if out is None else files.filling(out)


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("patch parallelism")
    group.add_argument(
        "--devices", type=int, default=1, help="devices for one image (CPU: simulated)"
    )
    group.add_argument(
        "--parallel", choices=MODES, help="default: displaced with several devices, else single"
    )
    group.add_argument("--warmup-steps", type=int, default=None, help=WARMUP_HELP)
    group.add_argument(
        "--gn", choices=GROUP_NORM_RULES, default="corrected", help="GroupNorm in displaced steps"
    )
    group.add_argument(
        "--cfg-parallel",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="put the two guidance halves on different devices (C = 2)",
    )
    group.add_argument("--naive-split", choices=NAIVE_SPLITS, default="row")
    group.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="D",
        help="split the prompts over D device groups, --devices / D devices each",
    )
    group.add_argument("--compress", choices=COMPRESSIONS, default="none", help=COMPRESS_HELP)
    group.add_argument("--kv-refresh", type=int, default=1, metavar="K", help=KV_REFRESH_HELP)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The `ParallelConfig` of the patch-parallelism options."""
    from sharding.parallel import ParallelConfig

    if args.cfg_parallel and args.guidance is not None and args.guidance <= 1:
        raise ValueError(
            f"--cfg-parallel puts the two halves of classifier-free guidance on different "
            f"devices, but guidance is off (--guidance {args.guidance:g} is 1 or less): pass "
            "--no-cfg-parallel (or leave --cfg-parallel out), or a guidance above 1"
        )
    return ParallelConfig(
        devices=args.devices,
        cfg=2 if args.cfg_parallel else 1,
        mode=args.parallel,
        warmup_steps=args.warmup_steps,
        group_norm=args.gn,
        naive_split=args.naive_split,
        data=getattr(args, "data_parallel", 1),
        compress=args.compress,
        kv_refresh=args.kv_refresh,
    )


def add_codec_options(parser: argparse.ArgumentParser, default: list[str], help: str) -> None:
    """--compress NAME [NAME ...] and --kv-refresh K of the measurements (one K for all)."""
    parser.add_argument(
        "--compress", choices=COMPRESSIONS, nargs="+", default=default, metavar="CODEC", help=help
    )
    parser.add_argument("--kv-refresh", type=int, default=1, metavar="K", help=KV_REFRESH_HELP)

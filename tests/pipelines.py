"""Tiny random diffusers pipelines (SDXL, SD 1.x and Flux.1 shaped) written with
`save_pretrained`, and helpers to compare generated images: both backends of a folder
(`Backends`), the prompts and parity bound of the tests that compare them, and
image-to-image's starting image and noise.
A 4-step 32x32 generation takes well under a second."""

from __future__ import annotations

import contextlib
import shutil
import string
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from diffusers_models import SD15_LIKE, SD_NOISE_SCHEDULE, SDXL_LIGHT, SDXL_LIKE, randomize

import jaxfusion
from jaxfusion.diffusers_backend import given_image_noise, load_diffusers_pipeline
from jaxfusion.tokenizer import write_tokenizer

# Prompt words: each one token of the tiny tokenizers (other words are spelled letter by letter).
_WORDS = "a red blue green circle square triangle at the top bottom left right and photo of cat"
WORDS = tuple(_WORDS.split())
# Images are SIZE x SIZE pixels; the VAE downscales by 2, so latents are 16 x 16, which the
# UNets (3 and 4 levels) divide by 4 and 8.
SIZE = 32
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=SIZE,
)
LATENT_SIZE = SIZE // 2 ** (len(VAE["block_out_channels"]) - 1)
PROMPT = "a photo of a red cat at the top left"
NEGATIVE = "blue square"
# jaxfusion against diffusers, float32 on both sides: 126-138 dB on these models (float32
# rounding alone; a wrong constant or a missing term costs tens of dB). The README's claim.
MIN_PSNR = 120.0
# The token ids of `write_tokenizer`: 0 start of text, 1 end of text, 2 "!".
TEXT = dict(
    intermediate_size=37,
    num_hidden_layers=2,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# The noise schedule of SD 1.x and SDXL; the extra keys are those of SDXL's published
# scheduler_config.json (read when another scheduler class is built from it).
SCHEDULE = dict(
    SD_NOISE_SCHEDULE,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


def _tokenizer(pad_token: str) -> transformers.CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(folder, WORDS, pad_token=pad_token)
        return transformers.CLIPTokenizer.from_pretrained(folder)


def _text_encoder(model_class, tokenizer, seed: int, **config):
    config = transformers.CLIPTextConfig(**dict(TEXT, vocab_size=len(tokenizer), **config))
    torch.manual_seed(seed)
    return randomize(model_class(config), seed=seed)


def _vae(scaling_factor: float, force_upcast: bool, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(10)
    vae = AutoencoderKL(
        **dict(VAE, **config), scaling_factor=scaling_factor, force_upcast=force_upcast
    )
    return randomize(vae, seed=10)


def _unet(config: dict, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**config), seed=seed)


# The UNet of each SDXL kind. "sdxl" is the one of the PSNR figures against diffusers (the
# README's); "sdxl-light" the same pipeline with SDXL_LIGHT's UNet, for the tests that compare
# jaxfusion with itself (parallel layouts against one device, files against files): their
# programs compile in about half the time.
SDXL_UNETS = {"sdxl": SDXL_LIKE, "sdxl-light": SDXL_LIGHT}


def build_random_pipeline(kind: str):
    """A diffusers StableDiffusionXLPipeline ("sdxl", "sdxl-light") or StableDiffusionPipeline
    ("sd") of tiny random models, the same for every call."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if kind in SDXL_UNETS:
        tokenizer = _tokenizer("<|endoftext|>")
        tokenizer_2 = _tokenizer("!")
        text_encoder = _text_encoder(
            transformers.CLIPTextModel,
            tokenizer,
            seed=1,
            hidden_size=16,
            num_attention_heads=2,
            hidden_act="quick_gelu",
        )
        text_encoder_2 = _text_encoder(
            transformers.CLIPTextModelWithProjection,
            tokenizer_2,
            seed=2,
            hidden_size=32,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="gelu",
            pad_token_id=2,
        )
        unet = _unet(
            dict(
                SDXL_UNETS[kind],
                cross_attention_dim=16 + 32,
                projection_class_embeddings_input_dim=32 + 6 * SDXL_LIKE["addition_time_embed_dim"],
            ),
            seed=3,
        )
        scheduler = EulerDiscreteScheduler.from_config(
            dict(
                SCHEDULE,
                timestep_spacing="leading",
                interpolation_type="linear",
                prediction_type="epsilon",
                use_karras_sigmas=False,
            )
        )
        return StableDiffusionXLPipeline(
            vae=_vae(scaling_factor=0.13025, force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    if kind == "sd":
        tokenizer = _tokenizer("<|endoftext|>")
        text_encoder = _text_encoder(
            transformers.CLIPTextModel,
            tokenizer,
            seed=1,
            hidden_size=SD15_LIKE["cross_attention_dim"],
            num_attention_heads=4,
            hidden_act="quick_gelu",
        )
        # SD 1.x ships a PNDM config (no timestep_spacing: each class's default applies).
        return StableDiffusionPipeline(
            vae=_vae(scaling_factor=0.18215, force_upcast=False),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_unet(SD15_LIKE, seed=3),
            scheduler=DDIMScheduler.from_config(SCHEDULE),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind in FLUX_KINDS:
        return _flux_pipeline(kind)
    raise ValueError(f"kind={kind!r}: use 'sdxl', 'sdxl-light', 'sd', 'flux-dev' or 'flux-schnell'")


# Flux.1 shaped: a transformer of 1 double- and 2 single-stream blocks on 4 latent channels
# (16 packed), CLIP's pooled 16 features, T5's 32; FLUX.1 [dev]'s scheduler config (dynamic
# shift) and guidance embedding, or [schnell]'s (static shift 1, no guidance embedding).
FLUX_TRANSFORMER = dict(
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    in_channels=16,
    axes_dims_rope=(2, 2, 4),
)
FLUX_KINDS = {
    "flux-dev": (
        dict(guidance_embeds=True),
        dict(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    ),
    "flux-schnell": (dict(guidance_embeds=False), dict(shift=1.0, use_dynamic_shifting=False)),
}
T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)


def _flux_pipeline(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer_config, schedule = FLUX_KINDS[kind]
    tokenizer = _tokenizer("<|endoftext|>")
    with tempfile.TemporaryDirectory() as folder:
        write_t5_tokenizer(folder, WORDS)
        tokenizer_2 = transformers.T5TokenizerFast.from_pretrained(folder)
    text_encoder = _text_encoder(
        transformers.CLIPTextModel,
        tokenizer,
        seed=1,
        hidden_size=FLUX_TRANSFORMER["pooled_projection_dim"],
        num_attention_heads=2,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(2)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer_2), **T5))
    torch.manual_seed(3)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER, **transformer_config)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**schedule),
        vae=_vae(
            scaling_factor=0.3611,
            force_upcast=True,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=randomize(t5, seed=2),
        tokenizer_2=tokenizer_2,
        transformer=randomize(transformer, seed=3),
    )


def write_t5_tokenizer(folder, words, model_max_length: int = 16) -> dict[str, int]:
    """A tiny T5 tokenizer as Flux's tokenizer_2 is made (a Unigram model with `<pad>` 0,
    `</s>` 1, `<unk>` 2, SentencePiece's word boundary "▁", one piece per word of `words`
    and per letter, `</s>` appended), written with `save_pretrained`; returns its
    vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    letters = string.ascii_lowercase
    pieces = ["<pad>", "</s>", "<unk>", "▁", *("▁" + w for w in words), *letters]
    scores = [0.0, 0.0, 0.0, -2.0] + [-1.0 - i / 100 for i in range(len(words))]
    scores += [-5.0] * len(letters)
    backend = Tokenizer(models.Unigram(list(zip(pieces, scores, strict=True)), unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(folder)
    return {piece: i for i, piece in enumerate(pieces)}


def save_random_pipeline(folder: str | Path, kind: str) -> Path:
    """Writes `build_random_pipeline(kind)` to `folder` (safetensors) and returns the folder.

    The tokenizer subfolders hold vocab.json, merges.txt and tokenizer_config.json, as the
    SD and SDXL repositories on the hub do (transformers >= 5 would save tokenizer.json only).
    """
    folder = Path(folder)
    pipe = build_random_pipeline(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if isinstance(tokenizer, transformers.CLIPTokenizer):
            shutil.rmtree(folder / name)
            write_tokenizer(folder / name, WORDS, pad_token=tokenizer.pad_token)
    return folder


def initial_latents(batch: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """(batch, channels, height, width) float32 standard normal noise: diffusers' `latents`."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, channels, height, width)).astype(np.float32)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects one entry per XLA compilation inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


JAX_CLASSES = {"sdxl": jaxfusion.SDXLPipeline, "sd": jaxfusion.SDPipeline}


class Backends:
    """Each random pipeline folder written once, and loaded once per backend (diffusers once
    per scheduler)."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._folders, self._jax, self._torch = {}, {}, {}

    def folder(self, kind: str):
        if kind not in self._folders:
            self._folders[kind] = save_random_pipeline(self._tmp.mktemp(kind), kind)
        return self._folders[kind]

    def jax(self, kind: str):
        if kind not in self._jax:
            self._jax[kind] = JAX_CLASSES[kind].from_pretrained(self.folder(kind), dtype="float32")
        return self._jax[kind]

    def torch(self, kind: str, scheduler: str | None):
        key = kind, scheduler
        if key not in self._torch:
            self._torch[key] = load_diffusers_pipeline(
                self.folder(kind), dtype="float32", scheduler=scheduler, device="cpu"
            )
        return self._torch[key]


def starting_image(seed: int = 0, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """(1, height, width, 3) float32 in [0, 1]: a smooth gradient with some noise."""
    rng = np.random.default_rng(seed)
    rows, columns = np.meshgrid(
        np.linspace(0, 1, height, dtype=np.float32),
        np.linspace(0, 1, width, dtype=np.float32),
        indexing="ij",
    )
    image = np.stack([rows * columns, columns, 1 - rows], axis=-1)
    image = image + 0.1 * rng.standard_normal((height, width, 3))
    return np.clip(image, 0, 1).astype(np.float32)[None]


def image_file(folder: Path) -> Path:
    """`starting_image` as a 40x48 PNG file (height x width): the command resizes it."""
    from PIL import Image

    path = folder / "start.png"
    pixels = np.round(starting_image()[0] * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((48, 40), Image.Resampling.BICUBIC).save(path)
    return path


def added_noise(seed: int = 1, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """(1, 4, h, w) float32 NCHW: the unit noise added to the latents of a height x width
    image."""
    rng = np.random.default_rng(seed)
    factor = SIZE // LATENT_SIZE
    return rng.standard_normal((1, 4, height // factor, width // factor)).astype(np.float32)


def run_img2img(pipe, prompt, noise: np.ndarray | None, **options) -> np.ndarray:
    """A diffusers img2img pipeline's output (images (B, H, W, 3), or latents (B, C, h, w)
    with output_type="latent") for `options`, adding `noise` (`given_image_noise`)."""
    options = {"output_type": "np", **options}
    with torch.inference_mode(), given_image_noise(pipe, noise):
        result = pipe(prompt, **options).images
    return np.asarray(result, np.float32)

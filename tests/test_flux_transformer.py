"""Flux.1's transformer (`jaxfusion.models.transformer_flux`) against diffusers'
FluxTransformer2DModel, loaded from the folder diffusers' `save_pretrained` writes, and run by
the patch-parallel loops.

The diffusers side is the oracle end to end: FluxPipeline's own staticmethods pack the NCHW
latent into 2x2 tokens (`_pack_latents`), make the image ids (`_prepare_latent_image_ids`)
and unpack the output (`_unpack_latents`); the timestep is passed as the pipeline passes it
(t cast to the latents' dtype, / 1000) and the guidance scale as float32. Our `predict`
takes NHWC latents and the sampler's timestep t and does all of that itself.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers_models import SD_NOISE_SCHEDULE, randomize, relative_l2
from flax import nnx
from flux_models import FLUX_CONFIG
from jaxprs import kv_messages
from safetensors.numpy import load_file, save_file

from convert.state_dict import WeightMismatch
from jaxfusion import schedulers
from jaxfusion.models.pretrained import load_flux_transformer, save_flux_transformer
from jaxfusion.models.transformer_flux import FluxConfig
from sharding import ParallelConfig
from sharding.loops import Sampling, denoise

CONFIG = FLUX_CONFIG
CHANNELS, TEXT_TOKENS = 4, 5
HEIGHT, WIDTH = 8, 12  # a 4 x 6 token grid: rows and columns not interchangeable
TIMESTEP, GUIDANCE = 751.3, 3.5
VAE_SCALE = 8  # what FluxPipeline._unpack_latents divides the pixel size by
# float32 against diffusers' float32 on CPU: measured 1.5e-6 (no guidance embedding) and
# 2.3e-6 ([dev]-like, with it): float32 rounding of reordered sums and of the rotary angles
# (diffusers computes them in float64).
FLOAT32_TOLERANCE = 1e-5
# bfloat16 against diffusers' bfloat16: measured 5.2e-3 (dev-like; 4.8e-3 without the
# guidance embedding): the two round at different places (our matrix products and norms
# round once, after float32 arithmetic). Both are 8.2e-2 from the float32 output, most of it
# the bfloat16 timestep and guidance (t / 1000 * 1000 = 752, not 751.3; 3504, not 3500),
# which both round alike (1.6e-2 without the guidance embedding).
BFLOAT16_TOLERANCE = 2e-2
ROUNDING = 1e-5  # sync on P devices vs one device, float32: reordered sums only
DISPLACED_MARGIN = 1e-3  # displaced vs single must differ by more than this


def inputs(seed: int = 0, batch: int = 2, height: int = HEIGHT) -> dict[str, np.ndarray]:
    """Random NHWC latents (B, h, WIDTH, 4), prompt embeddings (B, T, 12), pooled (B, 10),
    guidance scales (B,), float32."""
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((batch, height, WIDTH, CHANNELS)),
        "prompt_embeds": rng.standard_normal((batch, TEXT_TOKENS, CONFIG["joint_attention_dim"])),
        "pooled_prompt_embeds": rng.standard_normal((batch, CONFIG["pooled_projection_dim"])),
        "guidance": np.full((batch,), GUIDANCE),
    }


def conditioning(data: dict, guidance: bool) -> dict[str, jax.Array]:
    names = ["prompt_embeds", "pooled_prompt_embeds"] + (["guidance"] if guidance else [])
    return {name: jnp.asarray(data[name], jnp.float32) for name in names}


def diffusers_predict(model, data: dict, guidance: bool, dtype=torch.float32) -> np.ndarray:
    """diffusers' prediction, NHWC float32, for `data` as FluxPipeline feeds its transformer."""
    b, h, w, c = data["latents"].shape
    nchw = torch.from_numpy(data["latents"]).permute(0, 3, 1, 2).to(dtype)
    latents = FluxPipeline._pack_latents(nchw, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", dtype)
    txt_ids = torch.zeros(TEXT_TOKENS, 3, dtype=dtype)
    timestep = torch.full((b,), TIMESTEP, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        out = model(
            hidden_states=latents,
            encoder_hidden_states=torch.from_numpy(data["prompt_embeds"]).to(dtype),
            pooled_projections=torch.from_numpy(data["pooled_prompt_embeds"]).to(dtype),
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.from_numpy(data["guidance"]).float() if guidance else None,
        ).sample
    out = FluxPipeline._unpack_latents(out, h * VAE_SCALE, w * VAE_SCALE, VAE_SCALE)
    return out.permute(0, 2, 3, 1).float().numpy()


def jax_predict(model, data: dict, guidance: bool) -> np.ndarray:
    latents = jnp.asarray(data["latents"], jnp.float32)
    out = model.predict(latents, jnp.float32(TIMESTEP), conditioning(data, guidance))
    return np.asarray(out.astype(jnp.float32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder `transformer/` written by diffusers' `save_pretrained` per guidance_embeds,
    and the model."""
    cache = {}

    def get(guidance: bool):
        if guidance not in cache:
            torch.manual_seed(0)
            model = diffusers.FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance)
            model = randomize(model, seed=int(guidance))
            folder = tmp_path_factory.mktemp(f"flux-guidance-{guidance}") / "transformer"
            model.save_pretrained(folder)
            cache[guidance] = folder, model
        return cache[guidance]

    return get


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell-like", "dev-like"])
def test_float32_matches_diffusers(saved, guidance):
    """Loaded from the folder above `transformer/`, as from a pipeline's."""
    folder, reference = saved(guidance)
    data = {k: v.astype(np.float32) for k, v in inputs().items()}
    ours = jax_predict(load_flux_transformer(folder.parent), data, guidance)
    assert relative_l2(ours, diffusers_predict(reference, data, guidance)) < FLOAT32_TOLERANCE


def test_bfloat16_matches_diffusers(saved):
    folder, _ = saved(True)
    data = {k: v.astype(np.float32) for k, v in inputs().items()}
    ours = jax_predict(load_flux_transformer(folder, dtype="bfloat16"), data, True)
    reference = diffusers.FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    expected = diffusers_predict(reference.eval(), data, True, torch.bfloat16)
    assert relative_l2(ours, expected) < BFLOAT16_TOLERANCE


def test_save_round_trip(saved, tmp_path):
    """Our save_flux_transformer writes a folder diffusers loads, holding the same weights
    and config: the reloaded diffusers model predicts what the original did."""
    folder, reference = saved(True)
    save_flux_transformer(load_flux_transformer(folder), tmp_path)
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    written, original = (json.loads((f / "config.json").read_text()) for f in (tmp_path, folder))
    assert public(written) == public(original)
    data = {k: v.astype(np.float32) for k, v in inputs(seed=1).items()}
    np.testing.assert_array_equal(
        diffusers_predict(reloaded, data, True), diffusers_predict(reference, data, True)
    )


def public(config) -> dict:
    """A diffusers config without its bookkeeping (`_name_or_path`, `_diffusers_version`)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_wrong_weights_are_refused(saved, tmp_path):
    folder, _ = saved(False)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    tensors["proj_out.weight"] = tensors["proj_out.weight"][:, :-1].copy()
    tensors["transformer_blocks.0.attn.norm_q.bias"] = tensors.pop(
        "transformer_blocks.0.attn.norm_q.weight"
    )
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightMismatch) as error:
        load_flux_transformer(tmp_path)
    for key in ("proj_out.weight", "norm_q.weight", "norm_q.bias"):
        assert key in str(error.value)


def test_config_refuses_what_it_cannot_run(saved):
    folder, _ = saved(False)
    config = json.loads((folder / "config.json").read_text())
    assert FluxConfig.from_diffusers(config).to_diffusers()["axes_dims_rope"] == (2, 2, 4)
    with pytest.raises(ValueError, match="qk_norm: unknown key"):
        FluxConfig.from_diffusers({**config, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="patch_size: 2 is not supported"):
        FluxConfig.from_diffusers({**config, "patch_size": 2})
    with pytest.raises(ValueError, match="must add up to attention_head_dim"):
        FluxConfig.from_diffusers({**config, "axes_dims_rope": [2, 2, 2]})


# ------------------------------------------------------------------------ patch parallelism

STEPS = 4
SCHEDULER = dict(SD_NOISE_SCHEDULE, timestep_spacing="leading")  # test_tiny_transformer.py's


class Loop:
    """The dev-like model loaded from diffusers' folder, run by `sharding.loops.denoise`
    with an Euler schedule, no classifier-free guidance (the guidance embedding instead),
    one sample; runs compiled once per (height, parallel configuration)."""

    def __init__(self, model):
        self.model = model
        config = schedulers.SchedulerConfig.from_diffusers(SCHEDULER, "euler")
        self.schedule = schedulers.make_schedule(config, STEPS)
        self.runs = {}

    def sampling(self, data: dict) -> Sampling:
        return Sampling(self.schedule, conditioning(data, True), None)

    def run(self, height: int, parallel: ParallelConfig) -> np.ndarray:
        if (height, parallel) not in self.runs:
            data = inputs(seed=2, batch=1, height=height)
            graphdef, weights = nnx.split(self.model)
            latents = jnp.asarray(data["latents"], jnp.float32) * self.schedule.init_noise_sigma
            run = jax.jit(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
            out = run(weights, self.sampling(data), latents)
            self.runs[height, parallel] = np.asarray(out)
        return self.runs[height, parallel]


@pytest.fixture(scope="module")
def loop(saved):
    return Loop(load_flux_transformer(saved(True)[0]))


SINGLE = ParallelConfig()


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("height", [16, 10], ids=["even-slabs", "uneven-slabs"])
def test_sync_equals_single(loop, height, devices):
    """16 latent rows (8 token rows) split evenly over 2 and 4 patches; 10 rows (5 token
    rows) do not: slabs of 3 + 2 and 2 + 1 + 1 + 1 token rows (`sharding.split`), each
    slab's rotary rows starting at its first real row."""
    sync = loop.run(height, ParallelConfig(devices, mode="sync"))
    assert relative_l2(sync, loop.run(height, SINGLE)) < ROUNDING


def test_displaced_differs_from_single(loop):
    """After the first step (synchronous: no warm-up beyond it) each of 4 patches attends to
    the other patches' image keys and values of the previous step: close to the single-device
    result, not equal to it. Measured 1.8e-3 (sync: 4e-8; naive patches: 2.6e-2 on 2); the
    final latent is mostly the initial noise, and a warm-up step more leaves 4e-4."""
    displaced = loop.run(16, ParallelConfig(4, mode="displaced", warmup_steps=0))
    difference = relative_l2(displaced, loop.run(16, SINGLE))
    assert DISPLACED_MARGIN < difference < 0.1, difference


def test_only_image_keys_and_values_travel(loop):
    """Every keys-and-values message (2, B, tokens, D) holds this patch's image tokens, no
    text token, in the double- and the single-stream blocks alike."""
    devices, height = 4, 16
    data = inputs(seed=2, batch=1, height=height)
    graphdef, weights = nnx.split(loop.model)
    parallel = ParallelConfig(devices, mode="sync")
    program = jax.make_jaxpr(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
    jaxpr = program(weights, loop.sampling(data), jnp.asarray(data["latents"], jnp.float32))
    messages = kv_messages(jaxpr.jaxpr)
    image_tokens = (height // devices // 2) * (WIDTH // 2)
    blocks = CONFIG["num_layers"] + CONFIG["num_single_layers"]
    assert len(messages) == blocks and {m[2] for m in messages} == {image_tokens}, messages

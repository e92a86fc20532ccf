"""The attention kernels of `jaxfusion.models.scaled_dot_product`: chunked (online softmax)
against a float64 numpy softmax attention and the xla path at lengths that are no multiple
of the chunks, the backend choice and its refusals, the chunked kernel's bounded memory, and
chunked attention inside the patch-parallel program (stale K/V on 8 simulated devices).
Parity of whole models with chunked attention forced is in test_unet_parity.py,
test_vae.py and test_text_encoders.py."""

import dataclasses
import logging

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers_models import SD_NOISE_SCHEDULE, SDXL_LIGHT, randomize, relative_l2
from flax import nnx

from jaxfusion import schedulers
from jaxfusion.models import CLIPTextConfig, CLIPTextModel, Conditioning, load_unet
from jaxfusion.models import scaled_dot_product as sdp
from jaxfusion.models.names import ATTENTION_BACKENDS
from jaxfusion.models.scaled_dot_product import (
    XLA_LOGITS_BYTES,
    DotProductAttention,
    attention,
    chunked_attention,
    resolve_backend,
    set_attention,
    xla_attention,
)
from sharding import ParallelConfig
from sharding.loops import Sampling, denoise

FLOAT32 = 1e-6  # relative L2 of float32 attention against float64
BFLOAT16 = 1e-2  # bfloat16 inputs: ~2**-8 per rounding of the weights and the output


def numpy_attention(q, k, v, causal=False) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v in float64; q (B, Tq, H, d), k, v (B, Tk, H, d); with
    `causal`, query t sees keys 0..t."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tri(q.shape[1], k.shape[1], dtype=bool), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def qkv(batch, tq, tk, heads, head_dim, *, scale=1.0, dtype=jnp.float32, seed=0):
    """Random q, k, v; `scale` multiplies q, so the logits have about that spread."""
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal((batch, tq, heads, head_dim))
    k = rng.standard_normal((batch, tk, heads, head_dim))
    v = rng.standard_normal((batch, tk, heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@jax.jit
def _xla(q, k, v):
    return xla_attention(q, k, v)


# (batch, Tq, Tk, heads, head_dim, causal, logit scale): query_chunk 64 and key_chunk 48
# divide none of the lengths, so the last query and key blocks are padded and masked.
CASES = {
    "self": (2, 300, 300, 3, 16, False, 1.0),
    "cross_77": (2, 300, 77, 3, 16, False, 1.0),
    "long_keys": (1, 300, 1000, 2, 8, False, 1.0),
    "causal": (2, 300, 300, 2, 16, True, 1.0),
    "causal_clip": (3, 77, 77, 4, 8, True, 1.0),
    "causal_more_keys": (1, 100, 300, 2, 8, True, 1.0),
    "vae_one_head_512": (1, 300, 300, 1, 512, False, 1.0),
    "peaked": (2, 300, 300, 2, 16, False, 30.0),  # logits up to ~100: exp overflows unshifted
    "chunks_longer_than_sequence": (1, 40, 30, 2, 8, False, 1.0),
}
QUERY_CHUNK, KEY_CHUNK = 64, 48


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_equals_float64_and_xla(name):
    batch, tq, tk, heads, head_dim, causal, scale = CASES[name]
    q, k, v = qkv(batch, tq, tk, heads, head_dim, scale=scale)
    expected = numpy_attention(q, k, v, causal)
    chunked = jax.jit(chunked_attention, static_argnames=("causal", "query_chunk", "key_chunk"))
    out = chunked(q, k, v, causal=causal, query_chunk=QUERY_CHUNK, key_chunk=KEY_CHUNK)
    xla = jax.jit(xla_attention, static_argnames="causal")(q, k, v, causal=causal)
    assert out.shape == (batch, tq, heads, head_dim) and out.dtype == jnp.float32
    assert relative_l2(xla, expected) <= FLOAT32, "the xla reference itself"
    assert relative_l2(out, expected) <= FLOAT32
    assert relative_l2(out, xla) <= FLOAT32


def test_causal_masks_the_future():
    """Changing the keys and values after position t leaves the outputs up to t alone."""
    q, k, v = qkv(1, 77, 77, 2, 8)
    run = jax.jit(
        lambda q, k, v: chunked_attention(q, k, v, causal=True, query_chunk=16, key_chunk=24)
    )
    out = np.asarray(run(q, k, v))
    changed = np.asarray(run(q, k.at[:, 40:].add(5.0), v.at[:, 40:].add(5.0)))
    np.testing.assert_array_equal(out[:, :40], changed[:, :40])
    assert not np.allclose(out[:, 40:], changed[:, 40:])


@pytest.mark.parametrize("name", ["cross_77", "causal", "vae_one_head_512"])
def test_chunked_bfloat16_close_to_float32(name):
    batch, tq, tk, heads, head_dim, causal, scale = CASES[name]
    q, k, v = qkv(batch, tq, tk, heads, head_dim, scale=scale, dtype=jnp.bfloat16)
    out = chunked_attention(q, k, v, causal=causal, query_chunk=QUERY_CHUNK, key_chunk=KEY_CHUNK)
    assert out.dtype == jnp.bfloat16
    # the float32 result of the same (bfloat16-rounded) inputs
    expected = numpy_attention(q, k, v, causal)
    xla = xla_attention(q, k, v, causal=causal)
    assert relative_l2(xla.astype(jnp.float32), expected) <= BFLOAT16, "the xla reference"
    error = relative_l2(out.astype(jnp.float32), expected)
    assert error <= BFLOAT16
    assert relative_l2(out.astype(jnp.float32), xla.astype(jnp.float32)) <= BFLOAT16


def test_chunked_gradients_equal_xla():
    """Differentiable (no NaN from the masked -inf logits), with the same gradients."""
    q, k, v = qkv(1, 50, 70, 2, 8, seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(kernel):
        return lambda q, k, v: (kernel(q, k, v) * cotangent).sum()

    chunked = jax.grad(
        loss(lambda q, k, v: chunked_attention(q, k, v, causal=True, query_chunk=16, key_chunk=24)),
        argnums=(0, 1, 2),
    )(q, k, v)
    xla = jax.grad(loss(lambda q, k, v: xla_attention(q, k, v, causal=True)), argnums=(0, 1, 2))(
        q, k, v
    )
    for got, want in zip(chunked, xla, strict=True):
        assert np.isfinite(got).all()
        assert relative_l2(got, want) <= 1e-5


def test_attention_dispatches_backends():
    q, k, v = qkv(1, 30, 20, 2, 8)
    expected = numpy_attention(q, k, v)
    for backend in ATTENTION_BACKENDS:
        out = attention(q, k, v, backend=backend, query_chunk=7, key_chunk=6)
        assert relative_l2(out, expected) <= FLOAT32, backend
    module = DotProductAttention("chunked", query_chunk=7, key_chunk=6)
    assert relative_l2(module(q, k, v), expected) <= FLOAT32


# ----------------------------------------------------------------------------- backend choice


def shapes(batch, tq, tk, heads, head_dim=64, dtype=jnp.float32):
    return (
        jax.ShapeDtypeStruct((batch, tq, heads, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, tk, heads, head_dim), dtype),
    )


def test_auto_is_xla_for_small_logits_and_chunked_for_large_on_cpu():
    assert jax.default_backend() == "cpu"
    tokens = 4096  # 4096 x 4096 float32 logits: exactly XLA_LOGITS_BYTES
    assert tokens * tokens * 4 == XLA_LOGITS_BYTES
    assert resolve_backend("auto", *shapes(1, tokens, tokens, 1)) == "xla"
    assert resolve_backend("auto", *shapes(1, tokens, tokens + 1, 1)) == "chunked"
    assert resolve_backend("auto", *shapes(2, 1024, 77, 10)) == "xla"  # SDXL cross-attention
    assert resolve_backend("auto", *shapes(2, 4096, 4096, 10)) == "chunked"  # SDXL 1024 self
    assert resolve_backend("auto", *shapes(1, 16384, 16384, 1, 512)) == "chunked"  # VAE
    for backend in ("xla", "chunked"):
        assert resolve_backend(backend, *shapes(1, 16384, 16384, 1)) == backend
        assert resolve_backend(backend, *shapes(1, 8, 8, 1)) == backend


def test_cudnn_on_cpu_falls_back_to_chunked_and_says_so_once(caplog):
    sdp._say_once.cache_clear()  # an earlier test may have said it already
    with caplog.at_level(logging.WARNING, logger="jaxfusion"):
        for _ in range(3):
            q, k = shapes(1, 64, 64, 2, 64, jnp.bfloat16)
            assert resolve_backend("cudnn", q, k) == "chunked"
        q, k, v = qkv(1, 30, 20, 2, 8, dtype=jnp.bfloat16)
        out = attention(q, k, v, backend="cudnn", query_chunk=7, key_chunk=6)
        assert relative_l2(out.astype(jnp.float32), numpy_attention(q, k, v)) <= BFLOAT16
    records = [r for r in caplog.records if r.name == "jaxfusion" and "cudnn" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert "cudnn does not apply" in message and "platform is cpu" in message, message
    assert "using chunked" in message


def test_cudnn_problem_names_the_reason():
    q = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.float32)
    assert "platform is cpu" in sdp.cudnn_problem(q)


def test_bad_backend_names_and_chunks_are_refused():
    q, k = shapes(1, 8, 8, 1)
    choices = str(list(ATTENTION_BACKENDS))
    for call in (
        lambda: resolve_backend("flash", q, k),
        lambda: DotProductAttention("flash"),
        lambda: attention(*qkv(1, 8, 8, 1, 4), backend="flash"),
        lambda: sdp.check_backend("XLA"),
    ):
        with pytest.raises(ValueError, match="is not one of") as error:
            call()
        assert choices in str(error.value)

    model = tiny_clip()
    with pytest.raises(ValueError, match="is not one of") as error:
        set_attention(model, "flash")
    assert choices in str(error.value)
    for chunks in ({"query_chunk": 0}, {"key_chunk": 0}, {"query_chunk": -4}):
        with pytest.raises(ValueError, match="chunk sizes must be positive"):
            set_attention(model, "chunked", **chunks)
    # refused before anything changed
    assert {(p.backend, p.query_chunk) for p in processors(model)} == {("auto", sdp.QUERY_CHUNK)}


def tiny_clip() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    return CLIPTextModel.abstract(config)


def processors(model) -> list[DotProductAttention]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, DotProductAttention)]


def test_set_attention_sets_every_layer():
    model = tiny_clip()
    assert len(processors(model)) == 3
    set_attention(model, "chunked", query_chunk=5, key_chunk=9)
    assert {(p.backend, p.query_chunk, p.key_chunk) for p in processors(model)} == {
        ("chunked", 5, 9)
    }
    set_attention(model, "xla")
    assert {(p.backend, p.query_chunk, p.key_chunk) for p in processors(model)} == {
        ("xla", sdp.QUERY_CHUNK, sdp.KEY_CHUNK)
    }


# ----------------------------------------------------------------------------- memory


def temp_bytes(kernel, q, k) -> int:
    return jax.jit(kernel).lower(q, k, k).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    ("tokens", "heads", "head_dim"), [(65536, 1, 64), (65536, 1, 512), (50000, 2, 64)]
)
def test_chunked_memory_is_bounded(tokens, heads, head_dim):
    """At 65,536 tokens xla's float32 logits take 16 GiB; the chunked kernel's temporaries
    are a few blocks (default chunks: 1024 x 2048 logits, 8 MiB), compiled from shapes."""
    q, k = shapes(1, tokens, tokens, heads, head_dim)
    logits = heads * tokens * tokens * 4
    chunked = temp_bytes(chunked_attention, q, k)
    xla = temp_bytes(xla_attention, q, k)
    print(
        f"{tokens} tokens: logits {logits / 2**20:.0f} MiB, temporaries chunked "
        f"{chunked / 2**20:.0f} MiB, xla {xla / 2**20:.0f} MiB"
    )
    assert xla >= logits
    assert chunked < logits / 20
    # and the kernel's own bound: a few blocks of logits plus the padded q, k, v and output
    block = heads * sdp.QUERY_CHUNK * sdp.KEY_CHUNK * 4
    assert chunked < 8 * block + 8 * tokens * heads * head_dim * 4


# ----------------------------------------------------------------------------- patch parallel

STEPS, LATENT, GUIDANCE = 4, 32, 5.0
SCHEDULER = dict(SD_NOISE_SCHEDULE, timestep_spacing="leading")
# On 8 patches of a 32 x 32 latent the self-attentions see 32 or 8 query tokens and 256 or
# 64 keys, the cross-attentions 7 text tokens: these chunks split all but the 8 and the 7,
# with padding everywhere.
PARALLEL_CHUNKS = dict(query_chunk=6, key_chunk=20)
# Chunked against xla over the whole loop: ~1.2e-6 observed, the same on one device and with
# a single block (query_chunk = key_chunk = 4096, no chunking at all): float32 rounding of
# the softmax's normalization order, amplified by 4 steps of guidance 5.
LOOP_ROUNDING = 3e-6


class UNetRun:
    """A tiny random SDXL-shaped UNet (diffusers' weights, loaded by jaxfusion), an Euler
    schedule and one CFG batch; `final_latents` runs the whole denoising loop."""

    def __init__(self, folder):
        torch.manual_seed(0)
        randomize(diffusers.UNet2DConditionModel(**SDXL_LIGHT), seed=1).save_pretrained(folder)
        self.unet = load_unet(folder)
        rng = np.random.default_rng(1)
        self.latents = rng.standard_normal((1, LATENT, LATENT, 4)).astype(np.float32)
        pooled = SDXL_LIGHT["projection_class_embeddings_input_dim"] - 6 * 8
        self.conditioning = Conditioning(
            rng.standard_normal((2, 7, SDXL_LIGHT["cross_attention_dim"])).astype(np.float32),
            rng.standard_normal((2, pooled)).astype(np.float32),
            np.tile(np.float32([128, 128, 0, 0, 128, 128]), (2, 1)),
        )
        config = schedulers.SchedulerConfig.from_diffusers(SCHEDULER, "euler")
        self.schedule = schedulers.make_schedule(config, STEPS)

    def final_latents(self, parallel: ParallelConfig, backend: str) -> np.ndarray:
        set_attention(self.unet, backend, **PARALLEL_CHUNKS)
        graphdef, weights = nnx.split(self.unet)
        sampling = Sampling(self.schedule, self.conditioning, jnp.float32(GUIDANCE))
        latents = jnp.asarray(self.latents) * self.schedule.init_noise_sigma
        run = jax.jit(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
        return np.asarray(run(weights, sampling, latents))


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    return UNetRun(tmp_path_factory.mktemp("unet"))


@pytest.fixture
def chunked_calls(monkeypatch):
    """(Tq, Tk, query_chunk, key_chunk) of every chunked kernel traced during the test."""
    calls = []
    kernel = sdp.KERNELS["chunked"]

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs["query_chunk"], kwargs["key_chunk"]))
        return kernel.run(q, k, v, **kwargs)

    monkeypatch.setitem(sdp.KERNELS, "chunked", dataclasses.replace(kernel, run=spy))
    return calls


def assert_really_chunked(calls):
    assert calls, "no chunked kernel was traced"
    assert {(qc, kc) for *_, qc, kc in calls} == {(6, 20)}
    assert any(tq > qc and tq % qc and tk > kc and tk % kc for tq, tk, qc, kc in calls), calls


@pytest.mark.slow
def test_displaced_chunked_equals_xla_on_eight_devices(unet_run, chunked_calls):
    """Stale K/V of 7 other patches plus the fresh own ones, through chunked attention; only
    step 0 is synchronous."""
    parallel = ParallelConfig(8, mode="displaced", warmup_steps=0)
    xla = unet_run.final_latents(parallel, "xla")
    assert not chunked_calls
    chunked = unet_run.final_latents(parallel, "chunked")
    assert_really_chunked(chunked_calls)
    assert {tk for _, tk, *_ in chunked_calls} >= {256, 64, 7}  # all-gathered keys and text
    assert np.isfinite(chunked).all() and chunked.std() > 0.5
    error = relative_l2(chunked, xla)
    print(f"displaced, 8 devices: chunked vs xla relative L2 {error:.2e}")
    assert error <= LOOP_ROUNDING


@pytest.mark.slow
def test_sync_chunked_on_eight_devices_equals_single_device_xla(unet_run, chunked_calls):
    single = unet_run.final_latents(ParallelConfig(), "xla")
    sync = unet_run.final_latents(ParallelConfig(8, mode="sync"), "chunked")
    assert_really_chunked(chunked_calls)
    error = relative_l2(sync, single)
    print(f"sync, 8 devices, chunked vs single xla: relative L2 {error:.2e}")
    assert error <= 1e-5

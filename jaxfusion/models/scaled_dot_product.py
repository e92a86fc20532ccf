"""Scaled dot-product attention with pluggable kernels, the one attention every model uses.

Backends (`ATTENTION_BACKENDS`: auto and the kernels of `KERNELS`, each with its options):
  xla: the reference: logits (B, heads, Tq, Tk) in float32, softmax, weights cast to v's
    dtype, as PyTorch's math path. Memory grows with Tq x Tk: for short sequences only.
  chunked: exact blockwise attention with an online softmax (Rabe & Staats 2021, the
    arithmetic of flash attention) in pure JAX: a scan over query chunks, each a scan over
    key chunks, so that memory is bounded by the chunk sizes. Any lengths (the last chunks
    are padded and masked), any head width, any backend; correct inside `shard_map` and
    `scan`.
  cudnn: `jax.nn.dot_product_attention(implementation="cudnn")`, flash attention on NVIDIA
    GPUs, where it applies (`cudnn_problem`); elsewhere chunked, said once.
  auto (default): xla while the logits are small (`XLA_LOGITS_BYTES`), else cudnn where it
    applies, else chunked. (A TPU kernel, Pallas splash attention, would slot in here.)

The backend is a static attribute of each model's `DotProductAttention` module, set for a
whole model by `set_attention` (as diffusers' `set_attn_processor`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.names import ATTENTION_BACKENDS, AttentionBackend

# auto keeps the einsum path while the float32 logits of one call take at most this much.
XLA_LOGITS_BYTES = 64 * 2**20
QUERY_CHUNK = 1024
KEY_CHUNK = 2048
CUDNN_MAX_HEAD_DIM = 256

log = logging.getLogger("jaxfusion")


def check_backend(backend: str) -> AttentionBackend:
    """`backend` if it names one of `ATTENTION_BACKENDS`, else a ValueError naming them."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r} is not one of {list(ATTENTION_BACKENDS)}")
    return backend


def check_chunks(query_chunk: int, key_chunk: int) -> None:
    """Refuses chunk sizes the chunked kernel cannot use (ValueError)."""
    if query_chunk < 1 or key_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got {query_chunk} and {key_chunk}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    backend: AttentionBackend = "auto",
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v, with softmax in float32.

    q: (B, Tq, heads, head_dim); k, v: (B, Tk, heads, head_dim) -> (B, Tq, heads, head_dim)
    in v's dtype. With `causal`, query t attends to keys 0..t. The chunk sizes are the
    chunked kernel's (see `chunked_attention`).
    """
    kernel = KERNELS[resolve_backend(backend, q, k)]
    options = dict(query_chunk=query_chunk, key_chunk=key_chunk)
    return kernel.run(q, k, v, causal=causal, **{name: options[name] for name in kernel.options})


def resolve_backend(backend: AttentionBackend, q: jax.Array, k: jax.Array) -> str:
    """The kernel `backend` runs for these shapes on this platform (see the module doc)."""
    backend = check_backend(backend)
    if backend == "auto":
        b, tq, heads, _ = q.shape
        if b * heads * tq * k.shape[1] * 4 <= XLA_LOGITS_BYTES:
            return "xla"
        return "chunked" if cudnn_problem(q) else "cudnn"
    if backend == "cudnn":
        problem = cudnn_problem(q)
        if problem:
            _say_once(f"attention: cudnn does not apply ({problem}); using chunked")
            return "chunked"
    return backend


def cudnn_problem(q: jax.Array) -> str | None:
    """Why cuDNN's fused attention cannot run on `q` here, or None when it can."""
    platform = jax.default_backend()
    if platform != "gpu":
        return f"platform is {platform}, not an NVIDIA GPU"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cuDNN takes bfloat16 or float16)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head_dim {head_dim} (cuDNN takes a multiple of 8, at most {CUDNN_MAX_HEAD_DIM})"
    return _cudnn_compile_error(q.dtype, head_dim)


@functools.cache
def _cudnn_compile_error(dtype: jnp.dtype, head_dim: int) -> str | None:
    """Compiles a small cuDNN attention once per (dtype, head_dim): some jax and CUDA
    versions fail there, and a clear fallback beats a failed generation."""
    shape = jax.ShapeDtypeStruct((1, 128, 1, head_dim), dtype)
    try:
        jax.jit(cudnn_attention).lower(shape, shape, shape).compile()
    except Exception as error:  # the message of whatever cuDNN or XLA raised is the report
        return f"cuDNN attention failed to compile: {str(error).splitlines()[0]}"
    return None


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    bias: jax.Array | None = None,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """The reference: the whole (B, heads, Tq, Tk) logits in float32 (see `attention`).

    Beyond `attention`'s arguments, for attentions the kernels do not cover (T5's): the
    logits are multiplied by `scale` (default head_dim ** -0.5), then `bias` (broadcast to
    (B, heads, Tq, Tk), e.g. a relative position bias (heads, Tq, Tk)) is added in float32;
    keys where `key_mask` (B, Tk) is False get no weight.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if causal:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
    """cuDNN's fused (flash) attention; same layout (B, T, heads, head_dim)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """Exact attention in blocks of `query_chunk` queries x `key_chunk` keys with an online
    softmax: per query block a running peak logit, total weight and weighted sum of values,
    rescaled by exp(old peak - new peak) as each key block arrives, divided by the total
    at the end.
    Peak memory: the float32 logits of one block, B x heads x query_chunk x key_chunk."""
    b, tq, heads, head_dim = q.shape
    tk = k.shape[1]
    qc, kc = min(query_chunk, tq), min(key_chunk, tk)
    nq, nk = -(-tq // qc), -(-tk // kc)

    def blocks(x, chunk, count):  # (B, T, heads, d) -> (count, B, chunk, heads, d)
        x = jnp.pad(x, ((0, 0), (0, count * chunk - x.shape[1]), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(b, count, chunk, heads, x.shape[-1]), 1, 0)

    q_blocks, k_blocks, v_blocks = blocks(q, qc, nq), blocks(k, kc, nk), blocks(v, kc, nk)
    scale = head_dim**-0.5

    def query_block(inputs):
        qi, q_block = inputs
        query_pos = qi * qc + jnp.arange(qc)

        def key_block(carry, inputs):
            peak, total, acc = carry  # (B, heads, qc) twice, (B, qc, heads, d): float32
            kj, k_block, v_block = inputs
            s = jnp.einsum("bqhd,bkhd->bhqk", q_block, k_block, preferred_element_type=jnp.float32)
            key_pos = kj * kc + jnp.arange(kc)
            valid = key_pos[None, :] < tk
            if causal:
                valid = valid & (key_pos[None, :] <= query_pos[:, None])
            s = jnp.where(valid, s * scale, -jnp.inf)
            new_peak = jnp.maximum(peak, s.max(axis=-1))
            shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)  # rows with no key yet
            p = jnp.exp(s - shift[..., None])
            rescale = jnp.exp(peak - shift)
            total = total * rescale + p.sum(axis=-1)
            pv = jnp.einsum(
                "bhqk,bkhd->bqhd", p.astype(v.dtype), v_block, preferred_element_type=jnp.float32
            )
            acc = acc * jnp.moveaxis(rescale, 1, 2)[..., None] + pv
            return (new_peak, total, acc), None

        init = (
            jnp.full((b, heads, qc), -jnp.inf, jnp.float32),
            jnp.zeros((b, heads, qc), jnp.float32),
            jnp.zeros((b, qc, heads, v.shape[-1]), jnp.float32),
        )
        (_, total, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(nk), k_blocks, v_blocks))
        return (acc / jnp.moveaxis(total, 1, 2)[..., None]).astype(v.dtype)

    out = jax.lax.map(query_block, (jnp.arange(nq), q_blocks))  # (nq, B, qc, heads, d)
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * qc, heads, v.shape[-1])
    return out[:, :tq]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An attention kernel: `run(q, k, v, *, causal, **options)`, and which options of
    `attention` are its own (`options`, passed to it by name)."""

    run: Callable[..., jax.Array]
    options: tuple[str, ...] = ()


# Every kernel `attention` runs; `auto` picks one of them (`resolve_backend`).
KERNELS: dict[str, Kernel] = {
    "xla": Kernel(xla_attention),
    "chunked": Kernel(chunked_attention, options=("query_chunk", "key_chunk")),
    "cudnn": Kernel(cudnn_attention),
}
assert ("auto", *KERNELS) == ATTENTION_BACKENDS, "names.ATTENTION_BACKENDS names the kernels"


class DotProductAttention(nnx.Module):
    """The attention kernel of one attention layer: `backend` and the chunked kernel's chunk
    sizes are static (part of the graph), chosen for a whole model by `set_attention`. No
    parameters."""

    def __init__(
        self,
        backend: AttentionBackend = "auto",
        *,
        query_chunk: int = QUERY_CHUNK,
        key_chunk: int = KEY_CHUNK,
    ):
        self.backend = check_backend(backend)
        check_chunks(query_chunk, key_chunk)
        self.query_chunk = query_chunk
        self.key_chunk = key_chunk

    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False
    ) -> jax.Array:
        """See `attention`."""
        return attention(
            q,
            k,
            v,
            causal=causal,
            backend=self.backend,
            query_chunk=self.query_chunk,
            key_chunk=self.key_chunk,
        )


def set_attention(
    model: nnx.Module,
    backend: AttentionBackend,
    *,
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
) -> None:
    """Makes every attention layer of `model` run the kernel `backend` (chunked with these
    chunk sizes)."""
    backend = check_backend(backend)
    check_chunks(query_chunk, key_chunk)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, DotProductAttention):
            module.backend = backend
            module.query_chunk = query_chunk
            module.key_chunk = key_chunk

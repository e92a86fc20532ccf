"""FluxTransformer2DModel (diffusers' `transformers/transformer_flux.py`), the denoiser of
Flux.1 [dev] and [schnell], with the configuration read from and written to diffusers'
`config.json`. Inference only; parameter paths are diffusers' state-dict keys.

    latents (B, h, w, C) NHWC --pack 2x2--> tokens (B, h/2 * w/2, 4C)   (`pack_latents`)
      x_embedder -> image tokens (B, N, D);  context_embedder(prompt_embeds) -> text (B, T, D)
      temb = timestep_embedder(t) [+ guidance_embedder(g)] + text_embedder(pooled)  (B, D)
      -> double-stream blocks (image and text streams, joint attention over [text, image])
      -> single-stream blocks (one stream [text, image], attention beside an MLP)
      -> norm_out (AdaLayerNormContinuous) -> proj_out -> (B, N, 4C) --unpack--> (B, h, w, C)

Attention is joint: the text tokens come first, then the image's; rotary position
embeddings rotate queries and keys by each token's (0, row, column) in the whole latent's
token grid (text tokens at (0, 0, 0), no rotation). The keys and values go through a
`sharding.KVExchange` whose shared tokens are the text's, so on a row slab (patch
parallelism) only the image tokens' keys and values travel; the slab's token rows (columns,
on naive column slabs) start at the row (column) the patch context says (`FluxPosEmbed`).

Timestep and guidance convention: `predict` and `__call__` take the sampler's timestep
t = sigma * 1000 (FlowMatchEulerDiscreteScheduler's `timesteps`) and the guidance scale
itself ([dev]). diffusers' FluxPipeline passes t / 1000 (in the model's dtype) to the model,
which multiplies by 1000 (in its dtype), and passes the guidance scale (float32), which the
model casts to its dtype and multiplies by 1000; this module does both halves with the same
roundings, so its sinusoidal features see the same numbers as diffusers'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from jaxfusion.models.attention import FeedForward
from jaxfusion.models.configuration import freeze, from_diffusers_config
from jaxfusion.models.embeddings import TimestepEmbedding, timestep_features
from jaxfusion.models.layers import Linear, RMSNorm, normalize
from jaxfusion.models.scaled_dot_product import DotProductAttention
from sharding.context import PatchPrimitive

CLASS_NAME = "FluxTransformer2DModel"
PACK = 2  # FluxPipeline packs 2x2 latent pixels into one token
ROPE_THETA = 10000.0
TIME_FEATURES = 256  # the sinusoidal features of the timestep and the guidance
EPSILON = 1e-6  # every LayerNorm and RMSNorm of the model


@dataclass(frozen=True)
class FluxConfig:
    """diffusers' FluxTransformer2DModel configuration: field names, meanings and defaults
    are diffusers' (FLUX.1 [dev] sets guidance_embeds; [schnell] does not).

    patch_size is 1 in every Flux checkpoint: the 2x2 packing is the pipeline's (here
    `pack_latents`), and diffusers' model never unpacks a larger patch; other values are
    refused. out_channels None means in_channels.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        freeze(self, CLASS_NAME)

    def _problems(self) -> list[str]:
        problems = []
        if self.patch_size != 1:
            problems.append(
                f"patch_size: {self.patch_size} is not supported (only 1: Flux packs 2x2 "
                "latent pixels into a token in the pipeline)"
            )
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if value is not None and value % (PACK * PACK):
                problems.append(
                    f"{name}: {value} is not a multiple of {PACK * PACK} (a token packs "
                    f"{PACK}x{PACK} latent pixels)"
                )
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            problems.append(
                f"axes_dims_rope: {self.axes_dims_rope!r} must be 3 even numbers (the rotary "
                "dimensions of the (index, row, column) position ids)"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"axes_dims_rope: {self.axes_dims_rope!r} must add up to attention_head_dim "
                f"({self.attention_head_dim})"
            )
        return problems

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> FluxConfig:
        """Reads a diffusers `config.json` dict; any other key, or a value this model cannot
        run, is refused, all of them named in one ValueError."""
        return from_diffusers_config(cls, config, class_name=CLASS_NAME, fixed_keys={})

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' FluxTransformer2DModel is built from."""
        return {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}

    @property
    def inner_dim(self) -> int:
        """D, the width of every token."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """C, the channels of the latent the model denoises (in_channels / 4)."""
        return self.in_channels // (PACK * PACK)

    @property
    def output_channels(self) -> int:
        """The channels of the prediction (out_channels, or in_channels, over 4)."""
        return (self.out_channels or self.in_channels) // (PACK * PACK)


def early_blocks(num_layers: int) -> int:
    """How many double-stream blocks, from the first, exchange their keys and values as soon
    as they produce them in a displaced step (`sharding.send_when_produced`): a third of
    them, 7 of FLUX.1's 19. Every block costs about 12 d^2 FLOPs per token (double and
    single alike), so those 7 of 57 are an eighth of the step: the least window of a later
    block's exchange, which starts with the step."""
    return math.ceil(num_layers / 3)


# ------------------------------------------------------------------------------- packing


def pack_latents(latents: jax.Array) -> jax.Array:
    """NHWC latents (B, h, w, C) -> tokens (B, h/2 * w/2, 4C): FluxPipeline's `_pack_latents`
    for NHWC. Tokens are row-major over the (h/2, w/2) grid, features ordered (C, 2, 2)."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // PACK, PACK, w // PACK, PACK, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """tokens (B, h/2 * w/2, 4C) -> NHWC (B, h, w, C): the inverse of `pack_latents`
    (FluxPipeline's `_unpack_latents`)."""
    b, _, features = tokens.shape
    c = features // (PACK * PACK)
    x = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, height, width, c)


# ------------------------------------------------------------------------------ positions


def rotary_frequencies(dim: int, theta: float = ROPE_THETA) -> np.ndarray:
    """(dim/2,) float32: 1 / theta ** (2j / dim), computed in float64 as diffusers'
    `get_1d_rotary_pos_embed` (Flux) does, then rounded."""
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


class FluxPosEmbed(PatchPrimitive):
    """The rotary tables (cos, sin) of the sequence [text tokens, image tokens] (diffusers'
    `FluxPosEmbed` on `cat(txt_ids, img_ids)`): text ids (0, 0, 0); image token (r, c) of
    the whole token grid has ids (0, r, c). Each axis i rotates `axes_dims[i]` features, in
    pairs (interleaved: features 2j and 2j+1 share the angle pos * f_j). Float32 (diffusers
    computes the angles in float64 on CPU, then rounds the tables to float32).

    On a slab the image's first token row and column are the patch context's `first_row`
    and `first_column` (0 on one device; row slabs start at column 0, naive column slabs at
    row 0): the only thing a slab cannot know by itself.
    """

    def __init__(self, axes_dims: tuple[int, ...]):
        self.axes_dims = tuple(axes_dims)

    def __call__(self, text_tokens: int, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
        """(cos, sin), each (text_tokens + rows * cols, head_dim) float32, for `text_tokens`
        then a slab of `rows` x `cols` image tokens, row-major."""
        first_row = 0 if self.patch is None else self.patch.first_row(rows)
        first_col = 0 if self.patch is None else self.patch.first_column(cols)
        row = jnp.broadcast_to((first_row + jnp.arange(rows))[:, None], (rows, cols))
        col = jnp.broadcast_to((first_col + jnp.arange(cols))[None, :], (rows, cols))
        image = jnp.stack([jnp.zeros_like(row), row, col], axis=-1).reshape(rows * cols, 3)
        ids = jnp.concatenate([jnp.zeros((text_tokens, 3), image.dtype), image])
        ids = ids.astype(jnp.float32)
        angles = jnp.concatenate(
            [ids[:, i, None] * rotary_frequencies(dim) for i, dim in enumerate(self.axes_dims)],
            axis=-1,
        )
        return jnp.repeat(jnp.cos(angles), 2, axis=-1), jnp.repeat(jnp.sin(angles), 2, axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, N, heads, head_dim) rotated pairwise by the tables (N, head_dim): diffusers'
    `apply_rotary_emb(use_real_unbind_dim=-1)`, in float32, returned in x's dtype."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x.astype(jnp.float32) * cos[:, None] + rotated * sin[:, None]
    return out.astype(x.dtype)


# -------------------------------------------------------------------------- normalization


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x (B, N, D) * (1 + scale) + shift, with shift, scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nnx.Module):
    """diffusers' AdaLayerNormZero (`chunks` 6) and AdaLayerNormZeroSingle (`chunks` 3):
    `linear` (D -> chunks * D) of SiLU(temb), split into (shift, scale, *rest); the output is
    LayerNorm(x) (no affine, eps 1e-6) modulated by shift and scale, and `rest` (the gates,
    and the MLP's shift, scale, gate), each (B, D)."""

    def __init__(self, dim: int, chunks: int, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, ...]:
        """x (B, N, D), temb (B, D) -> (normed x (B, N, D), *rest (B, D))."""
        shift, scale, *rest = jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)
        normed = normalize(x, EPSILON).astype(x.dtype)
        return modulate(normed, shift, scale), *rest


class AdaLayerNormContinuous(nnx.Module):
    """diffusers' AdaLayerNormContinuous (no affine, eps 1e-6), the output norm: `linear`
    (D -> 2D) of SiLU(temb) split into (scale, shift), in that order (not shift first)."""

    def __init__(self, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.linear = Linear(dim, 2 * dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """x (B, N, D), temb (B, D) -> (B, N, D)."""
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb).astype(x.dtype)), 2, axis=-1)
        return modulate(normalize(x, EPSILON).astype(x.dtype), shift, scale)


# ------------------------------------------------------------------------------ attention


class FluxAttention(nnx.Module):
    """diffusers' FluxAttention with its FluxAttnProcessor: `to_q`, `to_k`, `to_v` (with
    bias), RMSNorm `norm_q`, `norm_k` per head; with `context` (the double-stream blocks) the
    text's `add_q_proj`, `add_k_proj`, `add_v_proj`, `norm_added_q`, `norm_added_k` and the
    output projections `to_out.0` (image) and `to_add_out` (text); without (single-stream)
    no output projection. Keys and values of the whole image come through `kv_exchange`."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        context: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.heads = heads

        def linear(out: int = heads * head_dim, into: int = dim) -> Linear:
            return Linear(into, out, dtype=dtype, rngs=rngs)

        def rms_norm() -> RMSNorm:
            return RMSNorm(head_dim, epsilon=EPSILON, dtype=dtype, rngs=rngs)

        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.norm_q, self.norm_k = rms_norm(), rms_norm()
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = linear(), linear(), linear()
            self.norm_added_q, self.norm_added_k = rms_norm(), rms_norm()
            self.to_out = nnx.List([linear(dim, heads * head_dim)])
            self.to_add_out = linear(dim, heads * head_dim)
        self.processor = DotProductAttention()
        self.kv_exchange = sharding.KVExchange()

    def projections(
        self, x: jax.Array, q: Linear, k: Linear, v: Linear, norm_q: RMSNorm, norm_k: RMSNorm
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, N, D) -> normed queries, normed keys, values, each (B, N, heads, head_dim)."""
        b, n, _ = x.shape

        def heads(y):
            return y.reshape(b, n, self.heads, -1)

        return norm_q(heads(q(x))), norm_k(heads(k(x))), heads(v(x))

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        rotary: tuple[jax.Array, jax.Array],
        text_tokens: int,
    ) -> jax.Array:
        """Queries, keys, values (B, N, heads, head_dim) of [text, this slab's image] tokens
        -> attention over the text and the whole image's tokens, (B, N, heads * head_dim)."""
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        k, v = self.kv_exchange(k, v, text_tokens)
        out = self.processor(q, k, v)
        return out.reshape(*out.shape[:2], -1)

    def __call__(
        self, x: jax.Array, rotary: tuple[jax.Array, jax.Array], text_tokens: int
    ) -> jax.Array:
        """Single-stream: x (B, T + N, D), the text tokens first -> (B, T + N, inner_dim)."""
        q, k, v = self.projections(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        return self.attend(q, k, v, rotary, text_tokens)

    def joint(
        self, x: jax.Array, context: jax.Array, rotary: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        """Double-stream: image x (B, N, D), text context (B, T, D) -> (image out (B, N, D),
        text out (B, T, D)), after `to_out.0` and `to_add_out`."""
        text_tokens = context.shape[1]
        image = self.projections(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        text = self.projections(
            context,
            self.add_q_proj,
            self.add_k_proj,
            self.add_v_proj,
            self.norm_added_q,
            self.norm_added_k,
        )
        q, k, v = (jnp.concatenate([t, i], axis=1) for t, i in zip(text, image, strict=True))
        out = self.attend(q, k, v, rotary, text_tokens)
        return self.to_out[0](out[:, text_tokens:]), self.to_add_out(out[:, :text_tokens])


# --------------------------------------------------------------------------------- blocks


def clip_float16(x: jax.Array) -> jax.Array:
    """x clipped to float16's finite range when it is float16 (as diffusers' blocks do)."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxTransformerBlock(nnx.Module):
    """A double-stream block: image and text each have their own AdaLayerNormZero (`norm1`,
    `norm1_context`), feed-forward (`ff`, `ff_context`: GELU-tanh, 4x), and share one joint
    attention (`attn`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs | None):
        self.norm1 = AdaLayerNormZero(dim, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNormZero(dim, 6, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, heads, head_dim, context=True, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate", dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, activation_fn="gelu-approximate", dtype=dtype, rngs=rngs)

    @staticmethod
    def mlp(x: jax.Array, attn: jax.Array, rest: list[jax.Array], ff: FeedForward) -> jax.Array:
        """One stream's residual updates: x (B, N, D) + gate_msa * attn, then + gate_mlp *
        ff(LayerNorm modulated by shift_mlp, scale_mlp)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = rest
        x = x + gate_msa[:, None] * attn
        normed = modulate(normalize(x, EPSILON).astype(x.dtype), shift_mlp, scale_mlp)
        return x + gate_mlp[:, None] * ff(normed)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        temb: jax.Array,
        rotary: tuple[jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array]:
        """image x (B, N, D), text context (B, T, D), temb (B, D) -> (x, context)."""
        normed, *rest = self.norm1(x, temb)
        normed_context, *rest_context = self.norm1_context(context, temb)
        attn, attn_context = self.attn.joint(normed, normed_context, rotary)
        x = self.mlp(x, attn, rest, self.ff)
        context = clip_float16(self.mlp(context, attn_context, rest_context, self.ff_context))
        return x, context


class FluxSingleTransformerBlock(nnx.Module):
    """A single-stream block on [text, image] tokens: AdaLayerNormZeroSingle (`norm`), then
    attention (`attn`, no output projection) beside a GELU-tanh MLP (`proj_mlp`, 4x), both
    concatenated into `proj_out`, gated."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs | None):
        mlp_dim = 4 * dim
        self.norm = AdaLayerNormZero(dim, 3, dtype=dtype, rngs=rngs)
        self.proj_mlp = Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.proj_out = Linear(dim + mlp_dim, dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, heads, head_dim, context=False, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array,
        rotary: tuple[jax.Array, jax.Array],
        text_tokens: int,
    ) -> jax.Array:
        """x (B, T + N, D), the text tokens first, temb (B, D) -> (B, T + N, D)."""
        normed, gate = self.norm(x, temb)
        mlp = jax.nn.gelu(self.proj_mlp(normed), approximate=True)
        attn = self.attn(normed, rotary, text_tokens)
        out = self.proj_out(jnp.concatenate([attn, mlp], axis=-1))
        return clip_float16(x + gate[:, None] * out)


class TimeTextEmbedding(nnx.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings, or with `guidance` its
    CombinedTimestepGuidanceTextProjEmbeddings: `timestep_embedder` (256 -> D) of the
    timestep's sinusoidal features [+ `guidance_embedder` (256 -> D) of the guidance's] +
    `text_embedder` (pooled_projection_dim -> D; diffusers' PixArtAlphaTextProjection with
    SiLU, the same linear_1 -> SiLU -> linear_2 as a TimestepEmbedding)."""

    def __init__(self, dim: int, pooled_dim: int, *, guidance: bool, dtype, rngs: nnx.Rngs | None):
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(TIME_FEATURES, dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = (
            TimestepEmbedding(TIME_FEATURES, dim, dtype=dtype, rngs=rngs) if guidance else None
        )
        self.text_embedder = TimestepEmbedding(pooled_dim, dim, dtype=dtype, rngs=rngs)

    def embed(self, embedder: TimestepEmbedding, values: jax.Array) -> jax.Array:
        """values (B,) -> embedder(sinusoidal features (B, 256)) (B, D)."""
        features = timestep_features(
            values, TIME_FEATURES, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return embedder(features.astype(self.dtype))

    def __call__(
        self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array
    ) -> jax.Array:
        """timestep (B,), guidance (B,) or None, each already as diffusers' model feeds its
        features (x 1000), pooled (B, pooled_dim) -> temb (B, D)."""
        temb = self.embed(self.timestep_embedder, timestep)
        if self.guidance_embedder is not None:
            temb = temb + self.embed(self.guidance_embedder, guidance)
        return temb + self.text_embedder(pooled.astype(self.dtype))


# ---------------------------------------------------------------------------------- model


class FluxTransformer2DModel(nnx.Module):
    """Flux.1's transformer (see the module docstring), a `sharding.loops.Denoiser`.

    Conditioning: a dict with `prompt_embeds` (B, T, joint_attention_dim) (T5's),
    `pooled_prompt_embeds` (B, pooled_projection_dim) (CLIP's), and with guidance_embeds
    (FLUX.1 [dev]) `guidance` (B,), the guidance scale.
    """

    def __init__(
        self, config: FluxConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.config = config
        self.dtype = dtype
        dim, heads, head_dim = (
            config.inner_dim,
            config.num_attention_heads,
            config.attention_head_dim,
        )

        def linear(into: int, out: int = dim) -> Linear:
            return Linear(into, out, dtype=dtype, rngs=rngs)

        self.pos_embed = FluxPosEmbed(config.axes_dims_rope)
        self.time_text_embed = TimeTextEmbedding(
            dim,
            config.pooled_projection_dim,
            guidance=config.guidance_embeds,
            dtype=dtype,
            rngs=rngs,
        )
        self.context_embedder = linear(config.joint_attention_dim)
        self.x_embedder = linear(config.in_channels)
        self.transformer_blocks = nnx.List(
            [
                FluxTransformerBlock(dim, heads, head_dim, dtype=dtype, rngs=rngs)
                for _ in range(config.num_layers)
            ]
        )
        # The first blocks' exchanges travel while the rest of the step computes (read early
        # in the next step, they would have little of it before them); the others' from the
        # start of the step that reads them, after at least these blocks' compute.
        for block in list(self.transformer_blocks)[: early_blocks(config.num_layers)]:
            sharding.send_when_produced(block)
        self.single_transformer_blocks = nnx.List(
            [
                FluxSingleTransformerBlock(dim, heads, head_dim, dtype=dtype, rngs=rngs)
                for _ in range(config.num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dtype=dtype, rngs=rngs)
        out_features = config.patch_size**2 * (config.out_channels or config.in_channels)
        self.proj_out = linear(dim, out_features)

    @classmethod
    def abstract(cls, config: FluxConfig, *, dtype: jnp.dtype = jnp.float32):
        """The model with `jax.ShapeDtypeStruct` parameters: nothing is allocated."""
        return cls(config, dtype=dtype, rngs=None)

    def embed_times(
        self, timestep: jax.Array, guidance: jax.Array | None, batch: int
    ) -> tuple[jax.Array, jax.Array | None]:
        """The sampler's timestep (() or (B,)) and the guidance scale ((B,) or None) as
        diffusers' model feeds them to its sinusoidal features, each (B,) in the model's
        dtype: (t / 1000) * 1000 and g * 1000, rounded where FluxPipeline and the model
        round them (see the module docstring)."""
        t = jnp.broadcast_to(jnp.asarray(timestep), (batch,)).astype(self.dtype)
        t = (t / 1000).astype(self.dtype) * 1000
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError(
                    "this Flux transformer has guidance_embeds (FLUX.1 [dev]): give the "
                    "conditioning a 'guidance' (B,), the guidance scale"
                )
            guidance = jnp.broadcast_to(jnp.asarray(guidance), (batch,)).astype(self.dtype) * 1000
        return t, guidance

    def __call__(
        self,
        hidden_states: jax.Array,
        grid: tuple[int, int],
        timestep: jax.Array,
        conditioning: Mapping[str, jax.Array],
    ) -> jax.Array:
        """Packed tokens (B, rows * cols, in_channels) of a `grid` = (rows, cols) slab of the
        token grid (row-major), at the sampler's `timestep` -> (B, rows * cols,
        out_channels): diffusers' forward, with img_ids from `pos_embed` and txt_ids zeros."""
        dtype = self.dtype
        b = hidden_states.shape[0]
        prompt = conditioning["prompt_embeds"].astype(dtype)
        text_tokens = prompt.shape[1]
        t, guidance = self.embed_times(timestep, conditioning.get("guidance"), b)
        temb = self.time_text_embed(t, guidance, conditioning["pooled_prompt_embeds"])
        x = self.x_embedder(hidden_states.astype(dtype))
        context = self.context_embedder(prompt)
        rotary = self.pos_embed(text_tokens, *grid)
        for block in self.transformer_blocks:
            x, context = block(x, context, temb, rotary)
        x = jnp.concatenate([context, x], axis=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rotary, text_tokens)
        x = self.norm_out(x[:, text_tokens:], temb)
        return self.proj_out(x)

    @property
    def row_unit(self) -> int:
        """Slab boundaries at whole tokens, 2 latent rows (`sharding.loops.Denoiser`)."""
        return PACK

    def check_inputs(self, shape: tuple[int, ...]) -> None:
        """Refuses latents this model cannot take, naming the problem."""
        c = self.config.latent_channels
        if len(shape) != 4 or shape[-1] != c or shape[1] % PACK or shape[2] % PACK:
            raise ValueError(
                f"latents have shape {tuple(shape)}; expected (batch, height, width, {c}) "
                f"NHWC with height and width even (2x2 latent pixels make a token)"
            )

    def predict(
        self, latents: jax.Array, timestep: jax.Array, conditioning: Mapping[str, jax.Array]
    ) -> jax.Array:
        """latents (B, h, w, C) NHWC, the whole latent or a slab (h, w even), at the
        sampler's `timestep` () (sigma * 1000) -> the prediction (B, h, w, C_out)."""
        self.check_inputs(latents.shape)
        _, h, w, _ = latents.shape
        out = self(pack_latents(latents), (h // PACK, w // PACK), timestep, conditioning)
        return unpack_latents(out, h, w)

    def cache_conditioning(self, conditioning: Mapping[str, jax.Array]) -> None:
        """Nothing to cache (`sharding.loops.Denoiser`): the text stream depends on the
        timestep from the first block on, and its two projections of the conditioning
        (`context_embedder`, `text_embedder`) are cheap beside the blocks."""

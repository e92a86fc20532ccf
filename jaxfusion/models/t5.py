"""The T5 text encoder (transformers' `T5EncoderModel`, Flux's `text_encoder_2`), inference
only, with the configuration read from and written to transformers' `config.json`.

Module and parameter paths are transformers' state-dict keys (`encoder.block.0.layer.0.
SelfAttention.q.weight` is `encoder.block[0].layer[0].SelfAttention.q.kernel` here), so
`convert.state_dict` maps them mechanically. The token embedding is `shared` alone:
transformers ties `encoder.embed_tokens` to it (`convert.text_encoder.t5_encoder_keys`).

What Flux takes from it (diffusers' `FluxPipeline._get_t5_prompt_embeds`): input ids
(B, max_sequence_length) from `tokenizer_2` (the prompt, `</s>`, then `<pad>` up to
max_sequence_length, 512 by default), called *without* an attention mask, so the padding
tokens are attended to; `last_hidden_state` (B, max_sequence_length, d_model) is the
transformer's text conditioning.

The arithmetic is transformers': RMS layer norms without mean subtraction, a relative
position bias (bucketed, bidirectional) computed by block 0 and added to the attention
logits of every block, no 1/sqrt(d_kv) scaling of the logits, a gated-GELU (T5 v1.1) or
ReLU feed-forward. Half precision follows transformers too: in bfloat16 everything runs in
bfloat16 (with norm statistics, softmax, activations and accumulations in float32); in
float16 the feed-forward's output projection `wo` runs in float32, as transformers keeps
`wo` in float32 for float16 (`_keep_in_fp32_modules`), so that the residual stream is
float32 from block 0's feed-forward on, and float16 activations are clamped to the finite
range where transformers clamps them. Two differences in float16, both toward float32: our
`wo` weights are stored in float16 and upcast (transformers stores them in float32: the same
unless the checkpoint holds more than float16's precision), and the gated product enters
`wo` unrounded (transformers rounds it to float16 first, where T5 v1.1 can overflow).

The attention always runs `scaled_dot_product.xla_attention` (with the position bias and
without scaling; `set_attention` does not apply): its float32 logits take B x num_heads x
L x L x 4 bytes, 64 MiB a prompt for Flux's 512 tokens and 64 heads.
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

from jaxfusion.models.configuration import freeze, from_transformers_config
from jaxfusion.models.layers import Embed, Linear, matmul_bias
from jaxfusion.models.scaled_dot_product import xla_attention
from nnxtools.parameters import ones, parameter

MODEL_TYPE = "t5"
# transformers' activations by name (`ACT2FN`), those T5 configs use.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # the tanh approximation
}
# Keys of a T5 config.json that do not change what the encoder computes (beside
# transformers' generic ones, `configuration.TRANSFORMERS_GENERIC_KEYS`): dropout, training
# and decoder settings, special token ids (the tokenizer's business).
_IGNORED_KEYS = frozenset(
    {
        "bos_token_id",
        "classifier_dropout",
        "dropout_rate",
        "eos_token_id",
        "initializer_factor",
        "n_positions",
        "num_decoder_layers",
        "output_past",
        "pad_token_id",
        "scale_decoder_outputs",
        "use_cache",
    }
)
# Keys transformers derives from `feed_forward_proj` (and writes): accepted when they agree.
_DERIVED_KEYS = ("dense_act_fn", "is_gated_act")


def feed_forward_kind(feed_forward_proj: str) -> tuple[str, bool]:
    """(activation name, gated) of a `feed_forward_proj`, by transformers' rule: "act" or
    "gated-act", with "gated-gelu" meaning the tanh-approximated `gelu_new` (T5 v1.1), where
    a plain "gelu" is the exact one."""
    gated = feed_forward_proj.startswith("gated-")
    activation = feed_forward_proj.removeprefix("gated-")
    if feed_forward_proj == "gated-gelu":
        activation = "gelu_new"
    return activation, gated


@dataclass(frozen=True)
class T5Config:
    """The configuration of a T5 encoder: the fields of transformers' `T5Config` that the
    encoder uses, with their names, meanings and defaults.

    vocab_size: rows of the token embedding `shared`.
    d_model: the width of the residual stream.
    d_kv: the width of one attention head (num_heads * d_kv need not be d_model).
    d_ff: the feed-forward's hidden width.
    num_layers: the encoder's blocks.
    num_heads: attention heads.
    relative_attention_num_buckets, relative_attention_max_distance: the relative position
      buckets (half per direction; half of those exact distances, the rest logarithmic up to
      max_distance, beyond which distances share the last bucket).
    layer_norm_epsilon: the RMS norms' epsilon.
    feed_forward_proj: "relu" (original T5), "gated-gelu" (T5 v1.1, Flux), or another
      "[gated-]act" with act one of `ACTIVATIONS`.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        freeze(self, "T5")

    def _problems(self) -> list[str]:
        problems = []
        activation, _ = feed_forward_kind(self.feed_forward_proj)
        if activation not in ACTIVATIONS:
            supported = [f"{g}{a}" for g in ("", "gated-") for a in ("relu", "gelu", "gelu_new")]
            problems.append(
                f"feed_forward_proj: {self.feed_forward_proj!r} is not supported (use one of "
                f"{supported})"
            )
        exact = self.relative_attention_num_buckets // 4
        if exact < 1 or self.relative_attention_max_distance <= exact:
            problems.append(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets}, "
                f"relative_attention_max_distance={self.relative_attention_max_distance}: "
                "need at least 4 buckets and a max distance above a quarter of them"
            )
        return problems

    @property
    def dense_act_fn(self) -> str:
        """The feed-forward's activation, a key of `ACTIVATIONS` (transformers' name)."""
        return feed_forward_kind(self.feed_forward_proj)[0]

    @property
    def is_gated_act(self) -> bool:
        """Whether the feed-forward is gated (`wi_0`, `wi_1`) rather than plain (`wi`)."""
        return feed_forward_kind(self.feed_forward_proj)[1]

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> T5Config:
        """Reads a transformers `config.json` dict of a T5 model; any key or value that would
        change the encoder's computation outside the supported set (a decoder, an unknown
        key, a `dense_act_fn` or `is_gated_act` that disagrees with `feed_forward_proj`) is
        refused, all of them named in one error."""
        derived = dict(
            zip(
                _DERIVED_KEYS,
                feed_forward_kind(config.get("feed_forward_proj", cls.feed_forward_proj)),
                strict=True,
            )
        )
        problems = [
            f"{key}: {config[key]!r} disagrees with feed_forward_proj (which means {value!r})"
            for key, value in derived.items()
            if key in config and config[key] != value
        ]
        return from_transformers_config(
            cls,
            {k: v for k, v in config.items() if k not in derived},
            model_type=MODEL_TYPE,
            name="T5",
            fixed_keys={"is_decoder": False},
            ignored_keys=_IGNORED_KEYS,
            problems=problems,
        )

    def to_transformers(self) -> dict[str, Any]:
        """The `config.json` dict transformers' T5Config is built from (the model adds
        `architectures`)."""
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32: the bucket of key position k seen from query position q, as
    transformers' `T5Attention._relative_position_bucket` (bidirectional, the encoder's)
    computes it, in float32 where it takes logarithms. Computed by numpy when the model is
    traced (the shapes are static), so that every backend gets the same table."""
    position = np.arange(length)
    relative = position[None, :] - position[:, None]  # key - query
    half = num_buckets // 2
    buckets = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    max_exact = half // 2
    # float32 as in transformers: a log one ulp off moves a distance into the next bucket.
    ratio = np.maximum(distance, 1).astype(np.float32) / max_exact
    scaled = np.log(ratio) / math.log(max_distance / max_exact) * (half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def clamp_float16(x: jax.Array) -> jax.Array:
    """transformers' clamp of float16 hidden states after each sublayer: into float16's
    finite range, to 1000 below its largest value where any value is infinite. Other
    dtypes pass."""
    if x.dtype != jnp.float16:
        return x
    largest = float(jnp.finfo(jnp.float16).max)
    bound = jnp.where(jnp.isinf(x).any(), largest - 1000, largest).astype(x.dtype)
    return jnp.clip(x, -bound, bound)


class T5LayerNorm(nnx.Module):
    """transformers' T5LayerNorm, an RMS norm: no mean subtraction, no bias; `scale` (dim,)
    (transformers' `weight`)."""

    def __init__(
        self, dim: int, *, epsilon: float, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = parameter(rngs, ones, (dim,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., dim), any float dtype -> (..., dim) in the norm's dtype: the mean square
        and the normalization in float32, rounded to the dtype, then times `scale` (in
        transformers' order)."""
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        normed = (x * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
        return self.scale[...] * normed


def _layer_norm(config: T5Config, dtype: jnp.dtype, rngs: nnx.Rngs | None) -> T5LayerNorm:
    return T5LayerNorm(config.d_model, epsilon=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)


def _linear(inputs: int, outputs: int, dtype: jnp.dtype, rngs: nnx.Rngs | None) -> Linear:
    """T5's linear layers have no bias."""
    return Linear(inputs, outputs, use_bias=False, dtype=dtype, rngs=rngs)


class T5Attention(nnx.Module):
    """Self-attention: `q`, `k`, `v` (d_model -> num_heads * d_kv), `o` back, no biases; block
    0's also holds `relative_attention_bias` (num_buckets, num_heads), the position bias
    every block adds."""

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        inner = config.num_heads * config.d_kv
        self.heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = _linear(config.d_model, inner, dtype, rngs)
        self.k = _linear(config.d_model, inner, dtype, rngs)
        self.v = _linear(config.d_model, inner, dtype, rngs)
        self.o = _linear(inner, config.d_model, dtype, rngs)
        self.relative_attention_bias = (
            Embed(self.num_buckets, self.heads, dtype=dtype, rngs=rngs)
            if has_relative_attention_bias
            else None
        )

    def position_bias(self, length: int) -> jax.Array:
        """(num_heads, length, length): the bias of key k for query q, from the bucket of
        k - q (`relative_position_buckets`). Only block 0's attention has it."""
        if self.relative_attention_bias is None:
            raise ValueError("only the first block's attention holds the position bias")
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))

    def __call__(
        self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """x: (B, L, d_model); position_bias: (num_heads, L, L); mask: (B, L) bool, False for
        keys to ignore, or None -> (B, L, d_model). softmax(q k^T + position_bias) v, the
        logits not scaled (T5 folds 1/sqrt(d_kv) into its initialization)."""
        b, length, _ = x.shape
        q, k, v = (proj(x).reshape(b, length, self.heads, -1) for proj in (self.q, self.k, self.v))
        out = xla_attention(q, k, v, scale=1.0, bias=position_bias, key_mask=mask)
        return self.o(out.reshape(b, length, -1))


def _output_projection(wo: Linear, h: jax.Array) -> jax.Array:
    """`wo` of the feed-forward's hidden h (..., d_ff): in float32 for a float16 model (as
    transformers keeps `wo` in float32 for float16), else in the model's dtype."""
    if wo.dtype == jnp.float16:
        return matmul_bias(h, wo.kernel[...].astype(jnp.float32), None, jnp.float32)
    return wo(h)


class T5DenseActDense(nnx.Module):
    """The plain feed-forward (`relu`, original T5): `wo(act(wi(x)))`, no biases."""

    def __init__(self, config: T5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.act = config.dense_act_fn
        self.wi = _linear(config.d_model, config.d_ff, dtype, rngs)
        self.wo = _linear(config.d_ff, config.d_model, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, L, d_model) -> (B, L, d_model); the activation in float32."""
        return _output_projection(self.wo, ACTIVATIONS[self.act](self.wi(x).astype(jnp.float32)))


class T5DenseGatedActDense(nnx.Module):
    """The gated feed-forward (`gated-gelu`, T5 v1.1): `wo(act(wi_0(x)) * wi_1(x))`, no
    biases."""

    def __init__(self, config: T5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.act = config.dense_act_fn
        self.wi_0 = _linear(config.d_model, config.d_ff, dtype, rngs)
        self.wi_1 = _linear(config.d_model, config.d_ff, dtype, rngs)
        self.wo = _linear(config.d_ff, config.d_model, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, L, d_model) -> (B, L, d_model); activation and gate product in float32."""
        gate = ACTIVATIONS[self.act](self.wi_0(x).astype(jnp.float32))
        return _output_projection(self.wo, gate * self.wi_1(x).astype(jnp.float32))


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention: `x + SelfAttention(layer_norm(x))`."""

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.SelfAttention = T5Attention(
            config,
            has_relative_attention_bias=has_relative_attention_bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.layer_norm = _layer_norm(config, dtype, rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: (B, L, d_model) -> (B, L, d_model) (see `T5Attention`)."""
        return x + self.SelfAttention(self.layer_norm(x), position_bias, mask)


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward: `x + DenseReluDense(layer_norm(x))`."""

    def __init__(self, config: T5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(config, dtype=dtype, rngs=rngs)
        self.layer_norm = _layer_norm(config, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, L, d_model) -> (B, L, d_model)."""
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """`layer`: [T5LayerSelfAttention, T5LayerFF], each output clamped in float16."""

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(
                    config,
                    has_relative_attention_bias=has_relative_attention_bias,
                    dtype=dtype,
                    rngs=rngs,
                ),
                T5LayerFF(config, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: (B, L, d_model) -> (B, L, d_model)."""
        x = clamp_float16(self.layer[0](x, position_bias, mask))
        return clamp_float16(self.layer[1](x))


class T5Stack(nnx.Module):
    """transformers' encoder `T5Stack` without its embedding (tied to the model's `shared`):
    `block` (num_layers `T5Block`s, the first holding the position bias) and
    `final_layer_norm`."""

    def __init__(self, config: T5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.block = nnx.List(
            [
                T5Block(config, has_relative_attention_bias=i == 0, dtype=dtype, rngs=rngs)
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = _layer_norm(config, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (B, L, d_model) token embeddings; mask: (B, L) bool or None -> (B, L, d_model)."""
        position_bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, position_bias, mask)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """transformers' T5EncoderModel (Flux's `text_encoder_2`): `shared` (vocab_size, d_model),
    the token embedding, and `encoder`, a `T5Stack`."""

    def __init__(self, config: T5Config, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None):
        self.config = config
        self.dtype = dtype
        self.shared = Embed(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(config, dtype=dtype, rngs=rngs)

    @classmethod
    def abstract(cls, config: T5Config, *, dtype: jnp.dtype = jnp.float32) -> T5EncoderModel:
        """The model with `jax.ShapeDtypeStruct` parameters: nothing is allocated."""
        return cls(config, dtype=dtype, rngs=None)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids: (B, L) int, any L (positions are relative); attention_mask: (B, L),
        nonzero for tokens to attend to, or None to attend to all of them (as Flux calls it)
        -> last_hidden_state (B, L, d_model), in the model's dtype."""
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, tokens)"
            )
        mask = None if attention_mask is None else attention_mask.astype(bool)
        return self.encoder(self.shared(input_ids), mask)

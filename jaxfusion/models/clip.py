"""CLIP text encoders (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`),
inference only, with the configuration read from and written to transformers' `config.json`.

Module and parameter paths are transformers' state-dict keys (`text_model.encoder.layers.0.
self_attn.q_proj.weight` is `text_model.encoder.layers[0].self_attn.q_proj.kernel` here), so
`convert.state_dict` maps them mechanically.

What Stable Diffusion takes from these encoders (diffusers' `encode_prompt`), for input ids
(B, 77) from the pipeline's tokenizer, called without an attention mask:

- SD 1.x/2.x (`text_encoder`, a `CLIPTextModel`): `last_hidden_state` (B, 77, D). With
  diffusers' `clip_skip=k`: `final_layer_norm(hidden_states[-(k + 1)])`, i.e.
  `model.final_layer_norm(output.hidden_states[-(k + 1)])`.
- SDXL: `hidden_states[-2]` (the penultimate layer's output, *not* final-layer-normed; with
  `clip_skip=k`: `hidden_states[-(k + 2)]`) of `text_encoder` (D=768) and of `text_encoder_2`
  (D=1280), concatenated on features -> (B, 77, 2048); the pooled text embedding (B, 1280) is
  `text_embeds` of `text_encoder_2` (a `CLIPTextModelWithProjection`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfusion.models.configuration import from_transformers_config
from jaxfusion.models.layers import Embed, LayerNorm, Linear
from jaxfusion.models.scaled_dot_product import DotProductAttention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
MODEL_TYPE = "clip_text_model"
# The eos_token_id of configs written before transformers PR #24773; with it the pooled token
# is the one with the highest id (CLIP's tokenizer gives `<|endoftext|>` the highest id).
LEGACY_EOS_TOKEN_ID = 2

# Keys of a CLIP text config.json that do not change what inference computes (beside
# transformers' generic ones, `configuration.TRANSFORMERS_GENERIC_KEYS`).
_IGNORED_KEYS = frozenset(
    {"attention_dropout", "dropout", "initializer_factor", "initializer_range"}
)


@dataclass(frozen=True)
class CLIPTextConfig:
    """The configuration of a CLIP text encoder. Field names, meanings and defaults are
    transformers' `CLIPTextConfig`'s."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        problems = []
        if self.hidden_act not in ACTIVATIONS:
            problems.append(
                f"hidden_act: {self.hidden_act!r} is not supported (use one of "
                f"{sorted(ACTIVATIONS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size: {self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not isinstance(self.eos_token_id, int):
            problems.append(f"eos_token_id: {self.eos_token_id!r} is not supported (one int)")
        if problems:
            raise ValueError("unsupported CLIP text configuration:\n  " + "\n  ".join(problems))

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Reads a transformers `config.json` dict of a CLIP text model; any key or value
        outside the supported set is refused, all of them named in one error."""
        return from_transformers_config(
            cls, config, model_type=MODEL_TYPE, name="CLIP text", ignored_keys=_IGNORED_KEYS
        )

    def to_transformers(self) -> dict[str, Any]:
        """The `config.json` dict transformers' CLIPTextConfig is built from (the model adds
        `architectures`)."""
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}


class CLIPTextOutput(NamedTuple):
    """What the text encoders return; B = batch, T = tokens (77 for SD), D = hidden_size.

    last_hidden_state: (B, T, D), the last layer's output after `final_layer_norm`.
    hidden_states: num_hidden_layers + 1 arrays (B, T, D): the embeddings, then every
      layer's output (the last one before `final_layer_norm`), as transformers'
      `output_hidden_states=True` gives them.
    pooled_output: (B, D), `last_hidden_state` at each row's end-of-text token.
    text_embeds: (B, projection_dim), `pooled_output @ text_projection`; only
      `CLIPTextModelWithProjection` has it (None otherwise).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled_output: jax.Array
    text_embeds: jax.Array | None = None


def _layer_norm(config: CLIPTextConfig, dtype, rngs):
    return LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention: `q_proj`, `k_proj`, `v_proj`, `out_proj` (all with
    bias); softmax in float32 in every dtype."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.processor = DotProductAttention()

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D); token t attends to tokens 0..t."""
        b, t, _ = x.shape
        q, k, v = (
            proj(x).reshape(b, t, self.heads, -1)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(self.processor(q, k, v, causal=True).reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    """`fc1`, activation (`quick_gelu` or exact `gelu`), `fc2`."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.hidden_act = config.hidden_act
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: `layer_norm1` + `self_attn`, `layer_norm2` + `mlp`."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.layer_norm1 = _layer_norm(config, dtype, rngs)
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, dtype, rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nnx.Module):
    """`token_embedding` (vocab_size, D) + `position_embedding` (max_position_embeddings, D)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        def embed(rows: int) -> Embed:
            return Embed(rows, config.hidden_size, dtype=dtype, rngs=rngs)

        self.token_embedding = embed(config.vocab_size)
        self.position_embedding = embed(config.max_position_embeddings)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: (B, T) int -> (B, T, D); positions are 0..T-1."""
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPEncoder(nnx.Module):
    """`layers`: num_hidden_layers `CLIPEncoderLayer`s."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """x: (B, T, D) -> (x, every layer's output), num_hidden_layers + 1 arrays (B, T, D)."""
        hidden_states = [x]
        for layer in self.layers:
            hidden_states.append(layer(hidden_states[-1]))
        return tuple(hidden_states)


class CLIPTextTransformer(nnx.Module):
    """transformers' `text_model`: `embeddings`, `encoder`, `final_layer_norm`, pooling."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(config, dtype, rngs)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids: (B, T) int, T <= max_position_embeddings, every row holding an
        end-of-text token -> `CLIPTextOutput` without `text_embeds`."""
        limit = self.config.max_position_embeddings
        if input_ids.ndim != 2 or input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, tokens) with "
                f"tokens <= max_position_embeddings={limit}"
            )
        hidden_states = self.encoder(self.embeddings(input_ids))
        last_hidden_state = self.final_layer_norm(hidden_states[-1])
        eos_position = self._eos_position(input_ids)
        pooled = jnp.take_along_axis(last_hidden_state, eos_position[:, None, None], axis=1)
        return CLIPTextOutput(last_hidden_state, hidden_states, pooled[:, 0])

    def _eos_position(self, input_ids: jax.Array) -> jax.Array:
        """(B,) index of each row's pooled token, by transformers' rule: the highest id with
        the legacy eos_token_id 2, else the first `eos_token_id`."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


class CLIPTextModel(nnx.Module):
    """transformers' CLIPTextModel (the text encoder of SD 1.x/2.x and SDXL's first one).

    Its parameters sit under `text_model`, as in the checkpoints on the hub (transformers
    >= 5 also writes them without that prefix; `convert.text_encoder.text_model_keys` reads
    both).
    """

    def __init__(
        self, config: CLIPTextConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        self.config = config
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    @classmethod
    def abstract(cls, config: CLIPTextConfig, *, dtype: jnp.dtype = jnp.float32):
        """The model with `jax.ShapeDtypeStruct` parameters: nothing is allocated."""
        return cls(config, dtype=dtype, rngs=None)

    @property
    def final_layer_norm(self) -> LayerNorm:
        """For diffusers' `clip_skip` on SD 1.x/2.x: `final_layer_norm(hidden_states[-(k+1)])`."""
        return self.text_model.final_layer_norm

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids: (B, T) int (T = 77 for SD), no attention mask (as diffusers calls it)
        -> `CLIPTextOutput` (text_embeds None)."""
        return self.text_model(input_ids)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' CLIPTextModelWithProjection (SDXL's `text_encoder_2`): CLIPTextModel plus
    `text_projection` (D -> projection_dim, no bias) of the pooled output."""

    def __init__(
        self, config: CLIPTextConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None
    ):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.text_projection = Linear(
            config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids: (B, T) int -> `CLIPTextOutput` with text_embeds (B, projection_dim)."""
        output = self.text_model(input_ids)
        return output._replace(text_embeds=self.text_projection(output.pooled_output))

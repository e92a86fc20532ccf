"""A plain PyTorch reference of DistriFusion (displaced patch parallelism) for diffusers'
`FluxTransformer2DModel`: the oracle for jaxfusion's `displaced` (and `naive`) mode on Flux.1.
It shares only the weights and the slab boundaries (`sharding.split.Split`) with the JAX code.
The model is diffusers' own, in float64, with every attention's processor replaced by
`_Processor` (written from diffusers' `FluxAttnProcessor`); everything runs sequentially on
one device: a Python loop over patches with explicit stale keys and values.

The rule (P patches along height, steps t = 0..T-1 in sampling order, W = warmup_steps):

* The latent (B, C, h, w) is cut by rows into P slabs at multiples of 2 latent rows (one
  token row), as `Split.of(h, P, 2)` says: the h / 2 token rows spread evenly, the first
  patches taking one more where they do not divide. Patch i's image tokens are those of its
  rows, packed 2x2 as FluxPipeline packs them, with the image ids (0, row, column) of those
  rows in the WHOLE token grid; the text ids are zeros.
* Steps 0..W are synchronous: the model runs on the whole latent, exactly as diffusers does,
  while every attention layer records each patch's image keys and values (after the RMS norm
  and the rotary embedding): the "fresh" values. The last synchronous step thus fills the
  stale buffers of step W+1.
* Steps t > W are displaced: for each patch i in turn, the model runs on [text, patch i's
  image tokens]; in every attention layer (the double-stream blocks' joint attention and the
  single-stream blocks' attention alike) the keys and values are the patch's own text ones,
  then for each patch j in order: patch i's own fresh image keys/values if j == i, else those
  patch j recorded at step t-1. The queries are the patch's own [text, image] tokens. Each
  patch computes its own text stream (every patch's text states differ in a displaced step,
  since they attend to different keys); nothing about the text is exchanged. Once all
  patches ran, their fresh keys/values of step t become the stale ones of step t+1. The
  patches' image outputs are concatenated in row order and unpacked.
* `kv_refresh` K: the stale keys/values are replaced only after displaced steps W+K, W+2K,
  ...; the other displaced steps leave them as they were (steps W+1..W+K read step W's,
  steps W+K+1..W+2K step W+K's). Each patch's own keys/values are always fresh.
* `compress` (a codec of `codec_reference.py`): the stale image keys/values another patch
  reads are what a receiver of that codec holds, as the UNet reference
  (`distrifusion_reference.py`) has them: one message stream (`codec_reference.Channel`)
  per (attention, sending patch), whose message is the patch's keys and values stacked as
  (2, B, tokens, heads * head_dim): a row per (key or value, sample, token), a column per
  head and channel, as `sharding.KVExchange` sends it. Each step that replaces the stale
  keys/values sends every patch's message through its stream (synchronous steps exactly;
  residual codecs start their base there) and the receivers then hold what `Channel.send`
  returns. Only what another patch reads goes through the codec: each patch's own
  keys/values, and the text's, are its exact fresh ones. Whether a block exchanges at the
  start of the step that reads (the default) or right after producing
  (`sends_when_produced`) changes nothing here: both read what the previous step sent.

Other modes: "naive" (every step, each patch runs the model on [text, its own image tokens]
alone, image ids of its rows in the whole grid, no warm-up), "single" (diffusers' model on the
whole latent every step; the processor changes nothing). Naive mode's slabs may also be
columns (`split` "col"; "alternate": rows at even steps, columns at odd ones): the latent cut
by columns as `Split.of(w, P, 2)` says, each patch's image tokens those of its columns (all
rows), packed 2x2, with the image ids (0, row, column) of those columns in the whole grid.

The sampler is diffusers' FlowMatchEulerDiscreteScheduler with its timesteps set as
FluxPipeline sets them (`fake_sampling.set_timesteps`); it steps the whole latent with the
whole (concatenated) prediction. The timestep and the guidance go to the model as
FluxPipeline passes them: t / 1000 in the latents' dtype, the guidance scale in float32.

Float64 except where diffusers itself computes in float32 whatever the model's dtype: the
rotary tables (computed in float64, returned as float32), the timestep's and the guidance's
sinusoidal features (float32 arguments), and the scheduler's step (it upcasts the sample to
float32 and returns the model output's dtype). The processor applies the rotary embedding in
float64 (diffusers' `apply_rotary_emb` would round queries and keys to float32).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F
from codec_reference import Channel
from diffusers import FluxPipeline
from fake_sampling import set_timesteps

from sharding.split import Split

MODES = ("displaced", "naive", "single")
SPLITS = ("row", "col", "alternate")  # naive mode's slabs
PACK = 2  # latent rows (and columns) per token
VAE_SCALE = 8  # what FluxPipeline._unpack_latents divides the pixel size by


class _State:
    """What the processors share: the phase of the current model call, the patch being run,
    the text's token count and the keys/values, keyed by the attention's name, each a list of
    P per-patch (keys, values) (B, tokens, heads, head_dim); the codec's message streams."""

    def __init__(self, patches: int, image_tokens: list[int], compress: str = "none"):
        self.patches = patches
        self.image_tokens = image_tokens  # each patch's image tokens
        self.compress = compress
        self.channels: dict[tuple[str, int], Channel] = {}  # (attention, patch): its stream
        self.text_tokens = 0
        self.phase = "full"  # "full": synchronous; "patch": displaced; "alone": naive
        self.index = 0  # the patch of a "patch" or "alone" call
        self.refresh_kv = True  # False: this displaced step's K/V do not replace the stale
        self.stale: dict[str, list] = {}  # recorded at the previous step
        self.fresh: dict[str, list] = {}  # recorded at the current step

    def record(self, name: str, i: int, key: torch.Tensor, value: torch.Tensor) -> None:
        slots = self.fresh.setdefault(name, [None] * self.patches)
        if slots[i] is not None:
            raise RuntimeError(f"{name} ran twice for patch {i} in one step")
        slots[i] = (key, value)

    def end_step(self) -> None:
        """The fresh keys/values of this step become the stale ones of the next (or not, in
        a displaced step that does not refresh them)."""
        for name, slots in self.fresh.items():
            if any(slot is None for slot in slots):
                raise RuntimeError(f"{name}: not every patch recorded its keys and values")
        if self.phase == "patch" and not self.refresh_kv:
            self.fresh = {}
            return
        self.stale = {
            name: [self._send(name, i, *slot) for i, slot in enumerate(slots)]
            for name, slots in self.fresh.items()
        }
        self.fresh = {}

    def _send(self, name: str, i: int, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """What the receivers of patch i's keys and values (B, tokens, heads, head_dim) in
        attention `name` hold once this step sent them: its message (2, B, tokens, heads *
        head_dim) through the stream's codec."""
        channel = self.channels.setdefault((name, i), Channel(self.compress))
        message = torch.stack([key, value]).flatten(3).double().numpy()
        held = torch.from_numpy(channel.send(message, exact=self.phase == "full"))
        held = held.unflatten(3, key.shape[2:]).to(key.dtype)
        return held[0], held[1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `apply_rotary_emb(use_real_unbind_dim=-1, sequence_dim=1)` for x (B, S,
    heads, head_dim) and tables (S, head_dim), in x's dtype (float64 here) throughout."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    cos, sin = (table.to(x.dtype)[None, :, None, :] for table in (cos, sin))
    return x * cos + rotated * sin


class _Processor:
    """diffusers' FluxAttnProcessor (unfused projections), with the image keys and values of
    the attention chosen by the phase of `state` (see the module docstring)."""

    def __init__(self, name: str, state: _State):
        self.name = name
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None or image_rotary_emb is None:
            raise NotImplementedError("an attention mask, or no rotary embedding")
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:  # double-stream: the text comes first
            text_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            text_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([attn.norm_added_q(text_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_key), key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        query, key = (_rotate(x, *image_rotary_emb) for x in (query, key))
        key, value = self._keys_and_values(key, value)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text, image = out[:, :text_tokens], out[:, text_tokens:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)

    def _keys_and_values(self, key, value) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value (B, T + N, heads, head_dim) of this call's [text, image] tokens -> the
        keys and values its queries attend to; records the image's fresh ones."""
        state, name = self.state, self.name
        text = state.text_tokens
        if state.phase == "alone":
            return key, value
        image_key, image_value = key[:, text:], value[:, text:]
        if state.phase == "full":
            split = zip(
                image_key.split(state.image_tokens, dim=1),
                image_value.split(state.image_tokens, dim=1),
                strict=True,
            )
            for j, (k, v) in enumerate(split):
                state.record(name, j, k, v)
            return key, value
        i = state.index
        state.record(name, i, image_key, image_value)
        parts = [
            (image_key, image_value) if j == i else stale
            for j, stale in enumerate(state.stale[name])
        ]
        return (
            torch.cat([key[:, :text]] + [k for k, _ in parts], dim=1),
            torch.cat([value[:, :text]] + [v for _, v in parts], dim=1),
        )


@contextlib.contextmanager
def _processors(model, state: _State):
    """Every attention of `model` through a `_Processor` sharing `state`, for the block."""
    original = model.attn_processors
    names = {name: _Processor(name.removesuffix(".processor"), state) for name in original}
    model.set_attn_processor(names)
    try:
        yield
    finally:
        model.set_attn_processor(original)


class FluxReference:
    """diffusers' FluxTransformer2DModel `model`, copied in float64, run as the rule says."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        self.guidance_embeds = self.model.config.guidance_embeds

    def _call(self, x, row, col, prompt_embeds, pooled, guidance, timestep):
        """The prediction (B, C, rows, cols) for the latent slab `x` (B, C, rows, cols) whose
        first token is at (`row`, `col`) of the whole grid, as FluxPipeline calls its
        transformer."""
        b, c, h, w = x.shape
        tokens = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // PACK, w // PACK, "cpu", x.dtype)
        img_ids[:, 1] += row
        img_ids[:, 2] += col
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, dtype=x.dtype)
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=timestep.expand(b).to(x.dtype) / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
        ).sample
        return FluxPipeline._unpack_latents(out, h * VAE_SCALE, w * VAE_SCALE, VAE_SCALE)

    def denoise(
        self,
        scheduler,
        latents: np.ndarray,
        prompt_embeds: np.ndarray,
        pooled_prompt_embeds: np.ndarray,
        guidance: float | None,
        *,
        steps: int,
        patches: int = 1,
        warmup_steps: int = 0,
        mode: str = "displaced",
        kv_refresh: int = 1,
        split: str = "row",
        compress: str = "none",
    ) -> np.ndarray:
        """The final latents (B, C, h, w), float64, of a FluxPipeline-like loop from the
        initial noise `latents` (B, C, h, w) NCHW, whose model predictions follow `mode`
        (see the module docstring). `scheduler`: a FlowMatchEulerDiscreteScheduler, its
        timesteps set here for `steps` steps and the image's token count. `guidance`: the
        guidance scale ([dev]'s embedding), None without one. `split`: naive mode's slabs,
        "row", "col" or "alternate". `compress`: the codec of the stale keys and values
        ("displaced" only)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        if split not in SPLITS or (split != "row" and mode != "naive"):
            raise ValueError(f"split={split!r}: use one of {SPLITS}, other than 'row' in naive")
        if compress != "none" and mode != "displaced":
            raise ValueError(f"compress={compress!r}: displaced mode only")
        if (guidance is None) == self.guidance_embeds:
            raise ValueError("give a guidance scale exactly when the model has guidance_embeds")
        b, _, h, w = latents.shape
        counts = Split.of(h, patches, PACK).counts if mode != "single" else (h,)
        column_counts = Split.of(w, patches, PACK).counts if mode == "naive" else (w,)
        state = _State(len(counts), [count // PACK * (w // PACK) for count in counts], compress)
        x = torch.from_numpy(np.asarray(latents, np.float64))
        prompt = torch.from_numpy(np.asarray(prompt_embeds, np.float64))
        pooled = torch.from_numpy(np.asarray(pooled_prompt_embeds, np.float64))
        state.text_tokens = prompt.shape[1]
        scale = None
        if guidance is not None:
            scale = torch.full([b], guidance, dtype=torch.float32)
        set_timesteps(scheduler, steps, (h // PACK) * (w // PACK))

        def run(slab, row, col, t):
            return self._call(slab, row // PACK, col // PACK, prompt, pooled, scale, t)

        with torch.no_grad(), _processors(self.model, state):
            for step, t in enumerate(scheduler.timesteps):
                if mode == "single" or (mode == "displaced" and step <= warmup_steps):
                    state.phase = "full" if mode == "displaced" else "alone"
                    out = run(x, 0, 0, t)
                else:
                    state.phase = "patch" if mode == "displaced" else "alone"
                    state.refresh_kv = (step - warmup_steps) % kv_refresh == 0
                    on_columns = split == "col" or (split == "alternate" and step % 2 == 1)
                    dim = 3 if on_columns else 2  # NCHW: cut the columns or the rows
                    outs, start = [], 0
                    for i, count in enumerate(column_counts if on_columns else counts):
                        state.index = i
                        slab = x.narrow(dim, start, count)
                        first = (0, start) if on_columns else (start, 0)
                        outs.append(run(slab, *first, t))
                        start += count
                    out = torch.cat(outs, dim=dim)
                if mode == "displaced":
                    state.end_step()
                x = scheduler.step(out, t, x).prev_sample
        return x.numpy()

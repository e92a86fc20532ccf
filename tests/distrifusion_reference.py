"""A plain PyTorch reference of DistriFusion (displaced patch parallelism) on top of diffusers'
`UNet2DConditionModel`: the oracle for jaxfusion's `displaced` mode. It shares only the weights
with the JAX code (and the table of which codec a halo takes). Everything runs sequentially on
one device: a Python loop over patches with explicit stale buffers. Clarity over speed; the
models in tests are tiny.

The rule (P patches along height, steps t = 0..T-1 in sampling order, W = warmup_steps):

* Every feature map of height h, at every UNet level, is split into P equal row slabs; patch i
  owns rows [i*h/P, (i+1)*h/P). Or, given the latent rows of each patch (`slab_rows`, an
  uneven split whose boundaries are multiples of 2 ** (levels - 1)), patch i owns the rows
  [ceil(b_i / 2**k), ceil(b_{i+1} / 2**k)) of level k, b_i its first latent row: the
  boundaries halved with each stride-2 convolution (the image's end rounds up, as the
  convolution's output size does).
* Steps 0..W are synchronous: the UNet runs on the full latent, exactly as diffusers does, while
  every layer below records what each patch would send (its slice of the full activation: the
  "fresh" values). The last synchronous step thus fills the stale buffers of step W+1.
* Steps t > W are displaced: for each patch i in turn, the UNet runs on patch i's latent slab;
  every layer below combines patch i's own fresh activations of step t with the *stale* values
  the other patches recorded at step t-1. Once all patches ran, the fresh values of step t become
  the stale buffers of step t+1. The patch predictions are concatenated along height; guidance
  and the scheduler step act on the full latent as usual.

What is stale in a displaced step, per layer kind (module inside the UNet):

* `nn.Conv2d` with kernel height > 1 (resnet 3x3 convs, Upsample2D's conv after the nearest
  interpolation, Downsample2D's stride-2 conv with padding 1, `conv_out`), except `conv_in`:
  patch i's input slab gets p = padding rows on top from the last p rows of patch i-1's input
  to this conv *at step t-1*, and p rows below from the first p rows of patch i+1's input at
  step t-1; zeros at the image's top and bottom edges. Columns are zero-padded as usual, and the
  conv runs with row padding 0. Fresh values: the first and the last p rows of the patch's
  input slab.
* `conv_in`: its halo rows are *current*: patch i's latent slab is padded with the neighbours'
  rows of the current step's (scaled) latent. Nothing stale.
* `nn.GroupNorm`: patch moments m1 = E[x], m2 = E[x^2] per (sample, group), in float32, shape
  (2, B, G): the fresh value. Synchronous steps use the full image's moments. Displaced steps,
  by rule `gn` (w_j = n_j / N, patch j's share of the layer's elements, 1 / P for equal slabs):
    - "corrected": m = sum_j w_j stale_j + (fresh_i - stale_i) for both moments;
      var = m2 - m1^2, and where that is negative (per sample and group) the fresh local
      variance fresh_m2 - fresh_m1^2 (clamped at 0 against rounding) replaces it; the mean
      stays the corrected one.
    - "stale": m = w_i fresh_i + sum_{j != i} w_j stale_j; var = max(m2 - m1^2, 0).
    - "separate": the fresh local moments only; var = max(m2 - m1^2, 0).
    - "sync": the exact global moments of the current step (sum_j w_j fresh_j). This needs
      every patch's fresh moments of the same layer in the same step, so with "sync" the P
      patches run in lockstep: one thread per patch, meeting at a barrier at every
      GroupNorm. Nothing stale.
  In every case y = (x - m1) / sqrt(var + eps) * weight + bias, with the module's eps.
  Synchronous steps use var = max(m2 - m1^2, 0) of the full image.
* Self-attention (`Attention` modules with `is_cross_attention == False`, i.e. `attn1` of every
  BasicTransformerBlock): queries from patch i's tokens; keys and values of all patches: patch
  i's own fresh K, V and the other patches' K, V of step t-1, concatenated in patch order.
  Fresh value: the patch's K and V (outputs of to_k / to_v, before the head split).
* Everything else (cross-attention `attn2`, 1x1 convs, linear layers, LayerNorm, feed-forward,
  nearest upsampling, time / text embeddings) is local and unchanged.

Compression (`compress`, a codec of `codec_reference.py`): what the halo convs and the
self-attentions record becomes stale through the codec, one message stream per (layer, patch,
message): K/V the patch's (2, B, T, heads * head_dim); a conv's halo its first p rows (sent up)
and its last p rows (sent down), each as (B, p * W, C). The stale value of a message is what
`codec_reference.Channel.send` returns for it at the end of each step (synchronous steps send
exactly). Halos never go below 4 bits: under residual-int2 and residual-1bit they go through
residual-int4 (`sharding.codecs.HALO`, the one table of that rule; K/V through the named
codec). GroupNorm moments and conv_in stay exact.

Other modes of `reference_denoise`:

* "naive": every step, every patch runs the unmodified UNet on its own latent slab, with no
  context at all (zero padding at the slab's edges in every conv including conv_in, local
  GroupNorm moments, self-attention over its own tokens). No warm-up. `split` says which
  slabs: "row" (P slabs along height), "col" (P slabs along width) or "alternate" (row slabs
  on even steps t, column slabs on odd ones); `slab_rows` and `slab_columns` their sizes
  where they are unequal.
* "single": the ordinary diffusers denoising loop on the full latent.

The scheduler is any diffusers scheduler (Euler, DDIM, DPM-Solver++ ...): it always steps the
full latent with the full (concatenated) prediction, as in diffusers' own loop.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from codec_reference import Channel
from torch import nn

from sharding.codecs import HALO  # which codec a halo goes through: the rule, not the codec

GN_RULES = ("corrected", "stale", "separate", "sync")
MODES = ("displaced", "naive", "single")
NAIVE_SPLITS = ("row", "col", "alternate")


class _State:
    """What the hooked layers share: the phase of the current UNet call, the patch being run
    and the buffers, keyed by module name, each a list of P per-patch values."""

    def __init__(
        self,
        patches: int,
        gn: str,
        compress: str = "none",
        slab_rows: tuple[int, ...] | None = None,
    ):
        self.patches = patches
        self.gn = gn
        self.compress = compress
        self.slab_rows = slab_rows  # the latent rows of each patch; None: P equal slabs
        self.latent_size: tuple[int, int] | None = None  # (h, w) of the UNet call's input
        self.channels: dict[tuple, Channel] = {}  # (layer, patch, message): its stream
        self.compressible: set[str] = set()  # the layers whose records go through the codec
        self.kv_layers: set[str] = set()  # the self-attentions
        self.refresh_kv = True  # False: this displaced step's K/V do not replace the stale ones
        self.phase = "full"  # "full": synchronous step; "patch": one patch of a displaced step
        self.stale: dict[str, list] = {}  # recorded at the previous step
        self.fresh: dict[str, list] = {}  # recorded at the current step
        self.conv_in_input: torch.Tensor | None = None  # the current full input of conv_in
        self.barrier: threading.Barrier | None = None  # lockstep patches (gn="sync")
        self._local = threading.local()
        self._lock = threading.Lock()

    @property
    def index(self) -> int:
        return self._local.index

    @index.setter
    def index(self, value: int) -> None:
        self._local.index = value

    def sizes(self, height: int) -> list[int]:
        """Each patch's rows of a feature map of `height` rows (see the module docstring)."""
        if self.slab_rows is None:
            if height % self.patches:
                raise ValueError(f"height {height} does not divide by {self.patches}")
            return [height // self.patches] * self.patches
        level = self._level(lambda h, w: h == height)
        ends = [-(-sum(self.slab_rows[: i + 1]) // 2**level) for i in range(self.patches)]
        return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def token_sizes(self, tokens: int) -> list[int]:
        """Each patch's tokens of a row-major feature map of `tokens` tokens."""
        if self.slab_rows is None:
            return self.sizes(tokens)
        level = self._level(lambda h, w: h * w == tokens)
        height, width = (-(-side // 2**level) for side in self.latent_size)
        return [rows * width for rows in self.sizes(height)]

    def _level(self, matches) -> int:
        """The UNet level k whose feature map (ceil(h / 2**k), ceil(w / 2**k)) matches."""
        for level in range(8):
            if matches(*(-(-side // 2**level) for side in self.latent_size)):
                return level
        raise ValueError(f"no level of a {self.latent_size} latent matches")

    def record(self, name: str, i: int, value) -> None:
        with self._lock:
            slots = self.fresh.setdefault(name, [None] * self.patches)
            if slots[i] is not None:
                raise RuntimeError(f"{name} ran twice for patch {i} in one step")
            slots[i] = value

    def end_step(self) -> None:
        for name, slots in self.fresh.items():
            if any(slot is None for slot in slots):
                raise RuntimeError(f"{name}: not every patch recorded a value")
            if name in self.kv_layers and self.phase == "patch" and not self.refresh_kv:
                self.fresh[name] = self.stale[name]
            elif name in self.compressible:
                self.fresh[name] = [self._send(name, i, slot) for i, slot in enumerate(slots)]
        self.stale, self.fresh = self.fresh, {}

    def _send(self, name: str, i: int, messages: dict) -> dict:
        """What the receivers of patch i's `messages` ({message: (..., rows, cols)}) hold."""
        sent = {}
        for message, value in messages.items():
            key = (name, i, message)
            codec = HALO[self.compress] if name not in self.kv_layers else self.compress
            channel = self.channels.setdefault(key, Channel(codec))
            held = channel.send(value.double().numpy(), exact=self.phase == "full")
            sent[message] = torch.from_numpy(held).to(value.dtype)
        return sent


# ---------------------------------------------------------------------------------------------
# Convolutions


def _halo_conv(conv: nn.Conv2d, x, above, below) -> torch.Tensor:
    """`conv` on slab `x` whose row padding comes from the neighbouring slabs: `above` (the
    last p rows of the slab above) and `below` (the first p rows of the slab below), (B, C, p,
    W); None means the image edge (zeros)."""
    p = conv.padding[0]
    if p:
        top = above if above is not None else torch.zeros_like(x[:, :, :p])
        bottom = below if below is not None else torch.zeros_like(x[:, :, :p])
        x = torch.cat([top, x, bottom], dim=2)
    return F.conv2d(
        x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups
    )


def _halo_messages(slab: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """What a patch's slab (B, C, h, W) sends: its first p rows ("up") and its last p rows
    ("down"), each as (B, p * W, C)."""
    b, c, _, w = slab.shape

    def rows(part):
        return part.permute(0, 2, 3, 1).reshape(b, p * w, c)

    return {"up": rows(slab[:, :, :p]), "down": rows(slab[:, :, -p:])}


def _halo_rows(message: torch.Tensor, channels: int, width: int) -> torch.Tensor:
    """A (B, p * W, C) halo message back as rows (B, C, p, W)."""
    return message.reshape(message.shape[0], -1, width, channels).permute(0, 3, 1, 2)


def _conv_forward(conv: nn.Conv2d, name: str, state: _State, x: torch.Tensor) -> torch.Tensor:
    p = conv.padding[0]
    if state.phase == "full":
        if name != "conv_in" and p:
            state.compressible.add(name)
            for i, part in enumerate(x.split(state.sizes(x.shape[2]), dim=2)):
                state.record(name, i, _halo_messages(part, p))
        return nn.Conv2d.forward(conv, x)
    i, last = state.index, state.patches - 1
    if not p:
        return _halo_conv(conv, x, None, None)
    if name == "conv_in":  # halo rows from the current latent
        slabs = state.conv_in_input.split(state.sizes(state.conv_in_input.shape[2]), dim=2)
        if not torch.equal(slabs[i], x):
            raise RuntimeError("conv_in's input is not patch i's slab of the current latent")
        above = slabs[i - 1][:, :, -p:] if i > 0 else None
        below = slabs[i + 1][:, :, :p] if i < last else None
    else:
        state.record(name, i, _halo_messages(x, p))
        channels, width = x.shape[1], x.shape[3]
        stale = state.stale[name]
        above = _halo_rows(stale[i - 1]["down"], channels, width) if i > 0 else None
        below = _halo_rows(stale[i + 1]["up"], channels, width) if i < last else None
    return _halo_conv(conv, x, above, below)


# ---------------------------------------------------------------------------------------------
# GroupNorm


def _moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(2, B, G): E[x] and E[x^2] per (sample, group), in float32."""
    xg = x.float().reshape(x.shape[0], groups, -1)
    return torch.stack([xg.mean(-1), (xg * xg).mean(-1)])


def _recorded_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """What a patch records of a GroupNorm's input: its `_moments` and its element count."""
    return _moments(x, groups), x[0].numel()


def _combined(recorded: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """sum_j w_j m_j, w_j = n_j / N, of recorded (moments m_j, count n_j)."""
    total = sum(count for _, count in recorded)
    return sum(count / total * moments for moments, count in recorded)


def _variance(moments: torch.Tensor) -> torch.Tensor:
    return (moments[1] - moments[0] ** 2).clamp(min=0)


def _normalize(norm: nn.GroupNorm, x: torch.Tensor, mean, var) -> torch.Tensor:
    xg = x.float().reshape(x.shape[0], norm.num_groups, -1)
    y = (xg - mean[..., None]) / torch.sqrt(var[..., None] + norm.eps)
    y = y.reshape(x.shape)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
    return y.to(x.dtype)


def _group_norm_forward(norm: nn.GroupNorm, name: str, state: _State, x) -> torch.Tensor:
    groups = norm.num_groups
    if state.phase == "full":
        for i, part in enumerate(x.split(state.sizes(x.shape[2]), dim=2)):
            state.record(name, i, _recorded_moments(part, groups))
        moments = _moments(x, groups)
        return _normalize(norm, x, moments[0], _variance(moments))
    i = state.index
    fresh, count = _recorded_moments(x, groups)
    state.record(name, i, (fresh, count))
    if state.gn == "sync":
        state.barrier.wait()  # every patch has recorded its moments of this layer
        moments = _combined(state.fresh[name])
        return _normalize(norm, x, moments[0], _variance(moments))
    if state.gn == "separate":
        return _normalize(norm, x, fresh[0], _variance(fresh))
    stale = state.stale[name]
    if state.gn == "stale":
        moments = _combined([(fresh, count) if j == i else m for j, m in enumerate(stale)])
        return _normalize(norm, x, moments[0], _variance(moments))
    if state.gn == "corrected":
        moments = _combined(stale) + (fresh - stale[i][0])
        var = moments[1] - moments[0] ** 2
        var = torch.where(var < 0, _variance(fresh), var)
        return _normalize(norm, x, moments[0], var)
    raise ValueError(f"gn={state.gn!r}: use one of {GN_RULES}")


# ---------------------------------------------------------------------------------------------
# Self-attention


class _SelfAttentionProcessor:
    """diffusers' AttnProcessor2_0 for self-attention, with keys and values of all patches."""

    def __init__(self, name: str, state: _State):
        self.name = name
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        unsupported = (
            encoder_hidden_states is not None,
            attention_mask is not None,
            attn.spatial_norm is not None,
            attn.group_norm is not None,
            hidden_states.ndim != 3,
        )
        if any(unsupported):
            raise NotImplementedError(f"{self.name}: unsupported self-attention variant")
        state, name = self.state, self.name
        residual = hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        state.compressible.add(name)
        state.kv_layers.add(name)
        if state.phase == "full":
            # Tokens are rows flattened row-major: runs of whole rows are the row slabs.
            kv = torch.stack([key, value])
            for j, part in enumerate(kv.split(state.token_sizes(kv.shape[2]), dim=2)):
                state.record(name, j, {"kv": part})
        else:
            i = state.index
            state.record(name, i, {"kv": torch.stack([key, value])})
            kv = [
                torch.stack([key, value]) if j == i else stale["kv"]
                for j, stale in enumerate(state.stale[name])
            ]
            key, value = torch.cat(kv, dim=2)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------
# The displaced UNet


@contextlib.contextmanager
def _hooked(unet, state: _State):
    """Temporarily routes the UNet's convs (kernel height > 1), GroupNorms and self-attention
    through the DistriFusion layers above."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D

    patched, processors = [], []
    try:
        for name, module in unet.named_modules():
            if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
                # It pads (0, 1, 0, 1) itself before a padding-0 conv: not a halo conv.
                raise NotImplementedError(f"{name}: Downsample2D with padding 0")
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                if module.padding_mode != "zeros" or isinstance(module.padding, str):
                    raise NotImplementedError(f"{name}: padding {module.padding!r}")
                module.forward = lambda x, m=module, n=name: _conv_forward(m, n, state, x)
                patched.append(module)
            elif isinstance(module, nn.GroupNorm):
                module.forward = lambda x, m=module, n=name: _group_norm_forward(m, n, state, x)
                patched.append(module)
            elif isinstance(module, Attention) and not module.is_cross_attention:
                processors.append((module, module.processor))
                module.set_processor(_SelfAttentionProcessor(name, state))
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
        for module, processor in processors:
            module.set_processor(processor)


class DisplacedUNet:
    """The UNet of one DistriFusion run: `sync` and `displaced` predict the noise of one step
    and record that step's fresh values, which the next `displaced` call reads as stale."""

    def __init__(
        self,
        unet,
        patches: int,
        gn: str = "corrected",
        compress: str = "none",
        slab_rows: tuple[int, ...] | None = None,
    ):
        if gn not in GN_RULES:
            raise ValueError(f"gn={gn!r}: use one of {GN_RULES}")
        self.unet = unet
        self.state = _State(patches, gn, compress, slab_rows)

    def _call(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        ).sample

    def sync(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        """The exact full-image prediction; records every patch's fresh values."""
        state = self.state
        state.phase = "full"
        state.latent_size = tuple(sample.shape[2:])
        with torch.no_grad(), _hooked(self.unet, state):
            out = self._call(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        state.end_step()
        return out

    def displaced(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        """The prediction of a displaced step: one UNet call per patch slab, the other
        patches' contributions from the buffers of the previous step."""
        state, count = self.state, self.state.patches
        if not state.stale:
            raise RuntimeError("a displaced step needs a previous step's buffers")
        state.phase = "patch"
        conv_in_input = sample
        if self.unet.config.center_input_sample:
            conv_in_input = 2 * sample - 1.0
        state.conv_in_input = conv_in_input
        state.latent_size = tuple(sample.shape[2:])
        slabs = sample.split(state.sizes(sample.shape[2]), dim=2)
        outs = [None] * count

        def run(i):
            state.index = i
            with torch.no_grad():
                outs[i] = self._call(slabs[i], timestep, encoder_hidden_states, added_cond_kwargs)

        with _hooked(self.unet, state):
            if state.gn == "sync":
                _run_in_lockstep(state, run, count)
            else:
                for i in range(count):
                    run(i)
        state.end_step()
        state.conv_in_input = None
        return torch.cat(outs, dim=2)


def _run_in_lockstep(state: _State, run, count: int) -> None:
    """Runs `run(i)` for every patch in its own thread; the GroupNorms meet at a barrier."""
    state.barrier = threading.Barrier(count, timeout=600)
    errors = []

    def target(i):
        try:
            run(i)
        except BaseException as error:
            errors.append(error)
            state.barrier.abort()  # release the other patches

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state.barrier = None
    if errors:
        # A BrokenBarrierError of a released patch is a consequence; report the cause.
        errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
        raise errors[0]


# ---------------------------------------------------------------------------------------------
# The denoising loop


def reference_denoise(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    added_cond_kwargs: dict | None = None,
    guidance_scale: float | None,
    num_inference_steps: int,
    patches: int,
    warmup_steps: int,
    gn: str = "corrected",
    mode: str = "displaced",
    split: str = "row",
    compress: str = "none",
    kv_refresh: int = 1,
    slab_rows: tuple[int, ...] | None = None,
    slab_columns: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The final latents (B, C, h, w), float32, of a denoising loop whose UNet predictions
    follow `mode` ("displaced", "naive" or "single"; see the module docstring).

    `latents` is the initial noise before `scheduler.init_noise_sigma` scaling. With
    `guidance_scale` set, `encoder_hidden_states` (and `added_cond_kwargs`) hold the
    unconditional half first, and the prediction is u + g * (c - u); otherwise they hold B rows.
    `scheduler.set_timesteps(num_inference_steps)` is called here. Steps 0..warmup_steps are
    synchronous in "displaced" mode; "naive" and "single" ignore `warmup_steps` and `gn`.
    `split` ("row", "col" or "alternate") is the slabs of "naive"; the other modes ignore it.
    `compress`: the codec of "displaced" (see the module docstring). `kv_refresh` K: the
    self-attentions' stale K/V are replaced only after displaced steps W+K, W+2K, ... (W =
    `warmup_steps`); the other displaced steps read the same ones as the step before.
    `slab_rows`, `slab_columns`: the latent rows (columns) of each patch where the slabs are
    unequal; None: P equal slabs.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if split not in NAIVE_SPLITS:
        raise ValueError(f"split={split!r}: use one of {NAIVE_SPLITS}")
    if warmup_steps < 0:
        raise ValueError("warmup_steps must be >= 0 (step 0 is always synchronous)")

    def slab_sizes(given: tuple[int, ...] | None, size: int) -> list[int]:
        if given is None and size % patches:
            raise ValueError(f"latent side {size} does not divide by {patches}")
        sizes = [size // patches] * patches if given is None else list(given)
        if sum(sizes) != size or len(sizes) != patches:
            raise ValueError(f"slabs {sizes} are not {patches} parts of {size}")
        return sizes

    slabs = {2: slab_rows, 3: slab_columns}
    displaced = None
    if mode == "displaced":
        slab_sizes(slab_rows, latents.shape[2])
        displaced = DisplacedUNet(unet, patches, gn, compress, slab_rows)

    def predict(step: int, sample, timestep):
        if mode == "single":
            with torch.no_grad():
                return unet(
                    sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
                ).sample
        if mode == "naive":
            columns = split == "col" or (split == "alternate" and step % 2 == 1)
            dim = 3 if columns else 2  # NCHW: width or height
            sizes = slab_sizes(slabs[dim], sample.shape[dim])
            with torch.no_grad():
                outs = [
                    unet(
                        slab, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
                    ).sample
                    for slab in sample.split(sizes, dim=dim)
                ]
            return torch.cat(outs, dim=dim)
        if step <= warmup_steps:
            return displaced.sync(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        displaced.state.refresh_kv = (step - warmup_steps) % kv_refresh == 0
        return displaced.displaced(sample, timestep, encoder_hidden_states, added_cond_kwargs)

    scheduler.set_timesteps(num_inference_steps)
    latents = latents.float() * scheduler.init_noise_sigma
    with torch.no_grad():
        for step, timestep in enumerate(scheduler.timesteps):
            sample = latents if guidance_scale is None else torch.cat([latents, latents])
            sample = scheduler.scale_model_input(sample, timestep)
            noise = predict(step, sample, timestep)
            if guidance_scale is not None:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, timestep, latents).prev_sample
    return latents.float()

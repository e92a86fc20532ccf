"""The denoising loops run a denoiser that is not a UNet: the tiny DiT-like transformer of
`tiny_transformer.py`, with image self-attention and with joint attention (text tokens beside
the image's, as SD3 and Flux). `sync` equals one device; `displaced` and `naive` equal an
independent sequential float64 numpy reference of the algorithm for this transformer (written
from the module's weights, not by calling its JAX code), stepped by diffusers'
EulerDiscreteScheduler. Under joint attention every patch keeps its own text tokens: in a
displaced step they attend to the other patches' stale image keys, so each patch's text
states differ, as the reference computes them."""

import copy

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers_models import SD_NOISE_SCHEDULE, relative_l2
from flax import nnx
from jaxprs import equations, kv_messages
from tiny_transformer import EPSILON, MAX_PERIOD, TinyTransformer

from jaxfusion import schedulers
from sharding import ParallelConfig
from sharding.loops import Sampling, denoise

STEPS, WARMUP, GUIDANCE = 4, 1, 5.0
LATENT, CHANNELS, PATCH, WIDTH, HEADS, LABEL = 16, 4, 2, 32, 2, 8
TEXT_TOKENS, TEXT_DIM = 3, 6  # joint attention's text
SCHEDULER = dict(SD_NOISE_SCHEDULE, timestep_spacing="leading")  # test_parallel.py's
ROUNDING = 1e-5  # float32 vs float32 (sync vs single): reordered sums only
# JAX (float32) vs the float64 reference: float32 rounding of every activation (~1e-7
# relative per operation), the largest being the timestep's sinusoidal arguments t * f_j,
# rounded by up to 3e-5 absolute at t = 751; through 4 Euler steps this leaves ~1e-6
# relative L2 in the final latents (measured 8e-7 in every mode). 1e-5 keeps 10x headroom
# and sits 200x below the displaced-vs-single difference (2e-3 at P = 2, 3e-3 at P = 4), so
# a displaced step that used this step's keys/values, or its own stale ones, would fail.
REFERENCE_TOLERANCE = 1e-5
DISPLACED_MARGIN = 1e-3  # displaced (and naive) vs single must differ by more than this


def randomized(model: nnx.Module, seed: int = 0, scale: float = 0.05) -> nnx.Module:
    """`model` with noise added to every parameter (LayerNorm scales not all ones, biases not
    all zeros), so that a swapped or ignored parameter shows in the output."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    noisy = jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape, np.float32), params)
    nnx.update(model, noisy)
    return model


# ---------------------------------------------------------------- the float64 numpy reference


def f64(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def np_sinusoidal(positions: np.ndarray, dim: int) -> np.ndarray:
    half = dim // 2
    args = np.asarray(positions, np.float64)[..., None] * MAX_PERIOD ** (-np.arange(half) / half)
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def np_layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPSILON) * scale + bias


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + torch.special.erf(torch.from_numpy(x / np.sqrt(2))).numpy())


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Reference:
    """The transformer in float64 numpy, from `model`'s weights, with the keys/values each
    attention uses given from outside: the sequential reference of the patch-parallel modes."""

    def __init__(self, model: TinyTransformer):
        self.w = jax.tree.map(f64, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def forward(self, slab, start, t, label, text, context):
        """The prediction (B, rows, cols, C) for `slab` (B, rows, cols, C), whose first
        latent (row, column) in the whole latent is `start` ((0, 0) for the whole latent),
        at timestep `t`, labels (B, label_dim), text (B, T, text_dim) or None.

        context(layer, k, v): the image keys and values (B, N_kv, heads, head_dim) that
        layer's attention uses, given this slab's fresh ones (B, N, heads, head_dim); the
        text's own are put first. Returns (prediction, [(k, v) fresh of each layer]).
        """
        w, p = self.w, PATCH
        b, rows, cols, c = slab.shape
        tr, tc = rows // p, cols // p
        # Patch embedding: token (r, c) = sum over its p x p pixels of kernel[i, j, ch, :].
        patches = slab.reshape(b, tr, p, tc, p, c).transpose(0, 1, 3, 2, 4, 5)
        kernel = w["patch_embed"]["kernel"]  # (p, p, C, D)
        x = np.einsum("nrcijk,ijkd->nrcd", patches, kernel) + w["patch_embed"]["bias"]
        x = x.reshape(b, tr * tc, WIDTH)
        half = WIDTH // 2
        row = np_sinusoidal(start[0] // p + np.arange(tr), half)
        col = np_sinusoidal(start[1] // p + np.arange(tc), half)
        grid = np.concatenate(
            [np.repeat(row[:, None], tc, 1), np.repeat(col[None, :], tr, 0)], axis=-1
        )
        x = x + grid.reshape(tr * tc, WIDTH)
        x = x + np_sinusoidal(np.float64(t), WIDTH) @ w["time_proj"]["kernel"]
        x = x + w["time_proj"]["bias"]
        x = x + (label @ w["label_proj"]["kernel"] + w["label_proj"]["bias"])[:, None]
        shared = 0
        if text is not None:
            shared = text.shape[1]
            x = np.concatenate([text @ w["text_proj"]["kernel"] + w["text_proj"]["bias"], x], 1)
        fresh = []
        hd = WIDTH // HEADS
        for layer, blk in enumerate(w["blocks"].values()):

            def lin(name, y, blk=blk):
                return y @ blk[name]["kernel"] + blk[name]["bias"]

            h = np_layer_norm(x, blk["norm1"]["scale"], blk["norm1"]["bias"])
            q, k, v = (lin(n, h).reshape(b, -1, HEADS, hd) for n in ("to_q", "to_k", "to_v"))
            fresh.append((k[:, shared:], v[:, shared:]))
            keys, values = context(layer, k[:, shared:], v[:, shared:])
            keys = np.concatenate([k[:, :shared], keys], axis=1)
            values = np.concatenate([v[:, :shared], values], axis=1)
            weights = np_softmax(np.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(hd))
            a = np.einsum("bhqk,bkhd->bqhd", weights, values).reshape(b, -1, WIDTH)
            x = x + lin("to_out", a)
            h = np_layer_norm(x, blk["norm2"]["scale"], blk["norm2"]["bias"])
            x = x + lin("fc2", np_gelu(lin("fc1", h)))
        h = np_layer_norm(x[:, shared:], w["norm_out"]["scale"], w["norm_out"]["bias"])
        out = h @ w["proj_out"]["kernel"] + w["proj_out"]["bias"]
        out = out.reshape(b, tr, tc, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, rows, cols, c), fresh

    def predict(self, step, sample, t, label, text, mode, patches, stale, slabs=None):
        """The prediction at `step` for the whole `sample` (B, h, w, C) under `mode`; `stale`
        holds every layer's (K, V) of the whole image from the previous step and is updated
        in place with this step's (each patch's own fresh ones). `slabs`: a naive step's
        (axis, latent rows or columns of each patch along it), axis 1 (row slabs) or 2
        (column slabs)."""

        def own(layer, k, v):
            return k, v

        if mode == "single" or (mode == "displaced" and step <= WARMUP):
            out, fresh = self.forward(sample, (0, 0), t, label, text, own)
            stale[:] = fresh
            return out
        if mode == "naive":  # each slab alone, at its rows and columns of the whole latent
            axis, counts = slabs
            outs, start = [], 0
            for count in counts:
                slab = np.take(sample, np.arange(start, start + count), axis=axis)
                first = (start, 0) if axis == 1 else (0, start)
                outs.append(self.forward(slab, first, t, label, text, own)[0])
                start += count
            return np.concatenate(outs, axis=axis)
        outs, fresh_slabs = [], []
        for i, slab in enumerate(np.split(sample, patches, axis=1)):

            def context(layer, k, v, i=i):
                n = k.shape[1]
                keys, values = (a.copy() for a in stale[layer])
                keys[:, i * n : (i + 1) * n], values[:, i * n : (i + 1) * n] = k, v
                return keys, values

            out, fresh = self.forward(slab, (i * slab.shape[1], 0), t, label, text, context)
            outs.append(out)
            fresh_slabs.append(fresh)
        stale[:] = [
            tuple(np.concatenate([f[layer][j] for f in fresh_slabs], axis=1) for j in (0, 1))
            for layer in range(len(stale))
        ]
        return np.concatenate(outs, axis=1)

    def denoise(self, latents, label, text, mode, patches=1, split="row", rows=None, cols=None):
        """Final latents (B, h, w, C) from the initial noise `latents` (B, h, w, C, before
        init_noise_sigma), labels (2B, label_dim) and text (2B, T, text_dim) or None,
        unconditional first, with guidance. Naive slabs: `split` "row", "col" or
        "alternate" (row slabs at even steps, column slabs at odd ones); `rows`, `cols`:
        each patch's latent rows (columns) along them, default P equal ones."""
        _, h, w, _ = latents.shape
        rows = rows or (h // patches,) * patches
        cols = cols or (w // patches,) * patches
        scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
        scheduler.set_timesteps(STEPS)
        x = torch.from_numpy(latents.astype(np.float64)) * scheduler.init_noise_sigma
        stale = [None] * len(self.w["blocks"])
        for step, t in enumerate(scheduler.timesteps):
            on_columns = split == "col" or (split == "alternate" and step % 2 == 1)
            slabs = (2, cols) if on_columns else (1, rows)
            sample = scheduler.scale_model_input(torch.cat([x, x]), t).numpy()
            noise = self.predict(step, sample, float(t), label, text, mode, patches, stale, slabs)
            uncond, cond = np.split(noise, 2)
            guided = torch.from_numpy(uncond + GUIDANCE * (cond - uncond))
            x = scheduler.step(guided, t, x).prev_sample
        return x.numpy()


# ------------------------------------------------------------------------------- the JAX runs


class Case:
    """The random tiny transformer (with joint attention if `joint`), an Euler schedule and
    one CFG batch of inputs; JAX runs compiled once per parallel configuration, reference runs
    once per (mode, patches, naive slabs)."""

    def __init__(self, joint: bool):
        text_dim = TEXT_DIM if joint else None
        self.model = randomized(TinyTransformer(text_dim=text_dim, rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(0)
        self.latents = rng.standard_normal((1, LATENT, LATENT, CHANNELS)).astype(np.float32)
        self.label = rng.standard_normal((2, LABEL)).astype(np.float32)  # (uncond, cond)
        text = rng.standard_normal((2, TEXT_TOKENS, TEXT_DIM)).astype(np.float32)
        self.text = text if joint else None
        self.schedule = self.schedule_of()
        self.reference_model = Reference(self.model)
        self._runs, self._references, self._crops = {}, {}, {}

    def cropped(self, rows: int, cols: int) -> "Case":
        """This case on the first `rows` x `cols` of its latents (same model and inputs,
        runs and references of its own)."""
        if (rows, cols) == self.latents.shape[1:3]:
            return self
        if (rows, cols) not in self._crops:
            crop = copy.copy(self)
            crop.latents = self.latents[:, :rows, :cols]
            crop._runs, crop._references, crop._crops = {}, {}, {}
            self._crops[rows, cols] = crop
        return self._crops[rows, cols]

    @staticmethod
    def schedule_of() -> schedulers.Schedule:
        config = schedulers.SchedulerConfig.from_diffusers(SCHEDULER, "euler")
        return schedulers.make_schedule(config, STEPS)

    def sampling(self) -> Sampling:
        conditioning = {"label": jnp.asarray(self.label)}
        if self.text is not None:
            conditioning["text"] = jnp.asarray(self.text)
        return Sampling(self.schedule, conditioning, jnp.float32(GUIDANCE))

    def jax(self, parallel: ParallelConfig) -> np.ndarray:
        """Final latents (B, h, w, C) of `sharding.loops.denoise`."""
        if parallel not in self._runs:
            graphdef, weights = nnx.split(self.model)
            latents = jnp.asarray(self.latents) * self.schedule.init_noise_sigma
            run = jax.jit(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
            self._runs[parallel] = np.asarray(run(weights, self.sampling(), latents))
        return self._runs[parallel]

    def reference(self, mode: str, patches: int = 1, **slabs) -> np.ndarray:
        """`Reference.denoise`'s final latents; `slabs`: its naive `split`, `rows`, `cols`."""
        key = (mode, patches, tuple(sorted(slabs.items())))
        if key not in self._references:
            text = None if self.text is None else self.text.astype(np.float64)
            out = self.reference_model.denoise(
                self.latents, self.label.astype(np.float64), text, mode, patches, **slabs
            )
            self._references[key] = out
        return self._references[key]


@pytest.fixture(scope="module", params=[False, True], ids=["self-attention", "joint"])
def case(request):
    return Case(joint=request.param)


SINGLE = ParallelConfig()


def test_single_equals_reference(case):
    """The oracle itself first: one device, every step the full-image forward."""
    assert relative_l2(case.jax(SINGLE), case.reference("single")) < REFERENCE_TOLERANCE


@pytest.mark.parametrize("devices", [2, 4])
def test_sync_equals_single(case, devices):
    sync = case.jax(ParallelConfig(devices, mode="sync"))
    assert relative_l2(sync, case.jax(SINGLE)) < ROUNDING


def test_sync_on_unequal_slabs_equals_single(case):
    """10 latent rows over 3 patches: slab boundaries at whole 2x2 patches, rows 4, 4 and
    2 in arrays of 4 (`sharding.split`); positions from each slab's first real row."""
    uneven = Case(joint=case.text is not None)
    uneven.latents = uneven.latents[:, :10]
    sync = uneven.jax(ParallelConfig(3, mode="sync"))
    assert relative_l2(sync, uneven.jax(SINGLE)) < ROUNDING


@pytest.mark.parametrize(("devices", "cfg"), [(2, 1), (4, 1), (4, 2)])
def test_displaced_equals_reference_and_differs_from_single(case, devices, cfg):
    """Steps 0..WARMUP synchronous, then each patch attends to the other patches' keys and
    values of the previous step, its own fresh. With cfg = 2 each guidance half runs on its
    own devices, with its half of the {"label"} conditioning (cached per half)."""
    parallel = ParallelConfig(devices, cfg, mode="displaced", warmup_steps=WARMUP)
    displaced = case.jax(parallel)
    expected = case.reference("displaced", parallel.patches)
    assert relative_l2(displaced, expected) < REFERENCE_TOLERANCE
    assert relative_l2(displaced, case.jax(SINGLE)) > DISPLACED_MARGIN  # really displaced


def test_naive_equals_reference_and_differs_from_single(case):
    naive = case.jax(ParallelConfig(4, mode="naive"))
    assert relative_l2(naive, case.reference("naive", 4)) < REFERENCE_TOLERANCE
    assert relative_l2(naive, case.jax(SINGLE)) > DISPLACED_MARGIN


# Naive slabs other than P equal row slabs: (split, patches, latent rows x columns, each
# patch's latent rows, its columns), the unequal ones at whole 2x2 patches as
# `sharding.split` cuts them (written out here; None: P equal ones).
NAIVE_SLABS = [
    pytest.param("col", 4, (16, 16), None, None, id="col-even"),
    pytest.param("col", 3, (16, 10), None, (4, 4, 2), id="col-uneven"),
    pytest.param("alternate", 4, (16, 16), None, None, id="alternate-even"),
    pytest.param("alternate", 3, (10, 14), (4, 4, 2), (6, 4, 4), id="alternate-uneven"),
]


@pytest.mark.parametrize(("split", "patches", "shape", "rows", "cols"), NAIVE_SLABS)
def test_naive_slabs_equal_reference(case, split, patches, shape, rows, cols):
    """Column slabs, and alternate ones (row slabs at even steps, column slabs at odd
    ones): each patch's tokens sit at their rows and columns of the whole token grid, on
    unequal slabs too."""
    cropped = case.cropped(*shape)
    naive = cropped.jax(ParallelConfig(patches, mode="naive", naive_split=split))
    expected = cropped.reference("naive", patches, split=split, rows=rows, cols=cols)
    assert relative_l2(naive, expected) < REFERENCE_TOLERANCE
    assert relative_l2(expected, cropped.reference("single")) > DISPLACED_MARGIN


def label_products(jaxpr) -> tuple[int, int]:
    """(outside scans, inside scans): how many matrix products of `jaxpr` and its inner
    programs take the (2, LABEL) labels."""
    scanned = [
        in_scan
        for eqn, in_scan in equations(jaxpr)
        if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.shape == (2, LABEL)
    ]
    return scanned.count(False), scanned.count(True)


@pytest.mark.parametrize("mode", ["sync", "displaced"])
def test_joint_attention_exchanges_only_image_tokens(mode):
    """The text's keys and values stay on each device: every keys-and-values message that
    travels, (2, B, tokens, D), holds this patch's image tokens and no text token."""
    model = TinyTransformer(text_dim=TEXT_DIM, rngs=nnx.Rngs(0))
    graphdef, weights = nnx.split(model)
    devices = 4
    parallel = ParallelConfig(devices, mode=mode, warmup_steps=WARMUP)
    conditioning = {"label": jnp.zeros((2, LABEL)), "text": jnp.zeros((2, TEXT_TOKENS, TEXT_DIM))}
    sampling = Sampling(Case.schedule_of(), conditioning, jnp.float32(GUIDANCE))
    latents = jnp.zeros((1, LATENT, LATENT, CHANNELS))
    program = jax.make_jaxpr(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
    jaxpr = program(weights, sampling, latents).jaxpr
    messages = kv_messages(jaxpr)
    image_tokens = (LATENT // devices // PATCH) * (LATENT // PATCH)
    assert messages and {shape[2] for shape in messages} == {image_tokens}, messages


def test_label_embedding_is_cached_before_the_loop(case):
    """`cache_conditioning` projects the labels once, before the steps' scan; the steps read
    the cached embedding."""
    graphdef, weights = nnx.split(case.model)
    latents = jnp.zeros((1, LATENT, LATENT, CHANNELS))
    jaxpr = jax.make_jaxpr(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x))
    jaxpr = jaxpr(weights, case.sampling(), latents).jaxpr
    assert label_products(jaxpr) == (1, 0)

"""Flux.1's patch parallelism against an independent sequential reference: jaxfusion's
displaced loop (`sharding.loops.denoise`, DistriFusion) on the [dev]-like transformer
(`jaxfusion.models.transformer_flux`, guidance embedding, no classifier-free guidance)
equals `flux_reference.py`, diffusers' own FluxTransformer2DModel in float64 run patch by
patch with explicit stale keys and values, both stepped by flow-matching Euler as FluxPipeline
schedules it. The reference shares only the weights (diffusers writes the folder we load) and
the slab boundaries (`sharding.split.Split`) with the code under test.

This checks *which* keys and values each attention reads in a displaced step: the patch's own
text and fresh image ones, the other patches' image ones from the step before, in the double-
and the single-stream blocks alike; each patch's text stream its own. Heights: 16 latent rows
(8 token rows: 4 + 4 on 2 patches, 2 + 2 + 2 + 2 on 4) and 10 (5 token rows: 3 + 2 and
2 + 1 + 1 + 1), whose slabs are unequal. Naive mode also on column slabs (and alternate
ones): the 6 token columns as 3 + 3 on 2 patches and 2 + 2 + 1 + 1 on 4, where every patch's
image ids must be those of its columns in the whole grid (before that was fixed, a column
slab's ids started at column 0 and row index x rows: 6e-3 .. 1.9e-2 from the reference).
Displaced mode also with each codec of the exchanged image keys and values
(`ParallelConfig.compress`), against the reference whose stale keys and values are what a
receiver of that codec holds (`codec_reference.Channel`), on the first double-stream block
(which sends when it produces) as on the others. About 55 s in all on 2 busy cores, 35 s
without the tests marked slow, before the codec tests: those add about 8 s to the fast tier
and 35 s in all.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from codec_reference import CODEC_NAMES
from diffusers_models import randomize, relative_l2
from flax import nnx
from flux_models import FLUX_CONFIG
from flux_reference import FluxReference

from jaxfusion import schedulers
from jaxfusion.models.pretrained import load_flux_transformer
from sharding import ParallelConfig
from sharding.loops import Sampling, denoise

STEPS, WARMUP, GUIDANCE = 4, 1, 3.5
CHANNELS, WIDTH, TEXT_TOKENS = 4, 12, 5  # 6 token columns
# FLUX.1 [dev]'s scheduler: its shift of the noise levels depends on the image's token count.
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True)
# JAX (float32) vs the float64 reference: measured 7.7e-7 .. 1.0e-6 in every case below
# (displaced, naive, kv_refresh; 9.8e-7 and 7.8e-7 for one device): float32 rounding of every
# activation, which one device alone shows too (the float32 parity with diffusers is 2.3e-6
# for one prediction), carried through 4 Euler steps. 10x headroom; displaced differs from
# single by 1.7e-3 .. 3.7e-3, over 100x the tolerance, so a displaced step that read this
# step's keys and values, or the wrong patches' stale ones, would fail.
REFERENCE_TOLERANCE = 1e-5
DISPLACED_MARGIN = 1e-3  # displaced (naive, kv_refresh) vs single must differ by more
# With a codec, the same tolerance: measured 7.8e-7 .. 2.0e-6 (fp8 2.0e-6 on even slabs,
# int8 1.1e-6 and 1.2e-6; every other codec and slab 7.8e-7 .. 9.9e-7, as without one). A
# float32 t = x / s can round to another code than the float64 one where t sits at a decision
# boundary: a few of the 3840 .. 6144 values a step sends are within 1e-5 (relative) of one
# (`codec_reference.ambiguous`: 2 .. 13 for fp8 and int8, 0 .. 1 for the residual codecs), and
# one flip moves the run by about one quantization step of one key or value: the 1e-6 over
# the float32 rounding that fp8 shows. Each codec moves the run from uncompressed displaced by
# 4.0e-5 (int8) .. 9.8e-4 (residual-1bit), over twice the tolerance: a run that ignored the
# codec would fail. So would one whose warm-up did not round what fp8 sends (1.6e-4; 8.4e-5 in
# the first double-stream block alone, which sends when it produces), or one that ignored the
# codec in that block alone (1.2e-4 fp8, 5.8e-5 residual-int4, 3.3e-4 residual-1bit).
CODEC_MARGIN = 2 * REFERENCE_TOLERANCE  # a codec vs uncompressed displaced must differ by more


class Case:
    """The random [dev]-like transformer written by diffusers and loaded by jaxfusion, one
    sample of inputs per height; JAX runs compiled once per (height, parallel config),
    reference runs once per (height, mode and its arguments)."""

    def __init__(self, folder):
        torch.manual_seed(0)
        model = diffusers.FluxTransformer2DModel(**FLUX_CONFIG, guidance_embeds=True)
        model = randomize(model, seed=1)
        model.save_pretrained(folder)
        self.model = load_flux_transformer(folder)
        self.reference_model = FluxReference(model)
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        self._runs, self._references = {}, {}

    @staticmethod
    def inputs(height: int) -> dict[str, np.ndarray]:
        """NHWC latents (1, height, WIDTH, 4), prompt embeddings (1, T, 12), pooled (1, 10)."""
        rng = np.random.default_rng(2)
        return {
            "latents": rng.standard_normal((1, height, WIDTH, CHANNELS)).astype(np.float32),
            "prompt_embeds": rng.standard_normal(
                (1, TEXT_TOKENS, FLUX_CONFIG["joint_attention_dim"])
            ).astype(np.float32),
            "pooled_prompt_embeds": rng.standard_normal(
                (1, FLUX_CONFIG["pooled_projection_dim"])
            ).astype(np.float32),
        }

    def jax(self, height: int, parallel: ParallelConfig) -> np.ndarray:
        """Final latents (1, height, WIDTH, 4) of `sharding.loops.denoise`."""
        if (height, parallel) not in self._runs:
            data = self.inputs(height)
            config = schedulers.SchedulerConfig.from_diffusers(self.scheduler.config, "flow_match")
            image_seq_len = (height // 2) * (WIDTH // 2)
            schedule = schedulers.make_schedule(config, STEPS, image_seq_len=image_seq_len)
            conditioning = {
                "prompt_embeds": jnp.asarray(data["prompt_embeds"]),
                "pooled_prompt_embeds": jnp.asarray(data["pooled_prompt_embeds"]),
                "guidance": jnp.full((1,), GUIDANCE, jnp.float32),
            }
            graphdef, weights = nnx.split(self.model)
            run = jax.jit(lambda w, s, x: denoise(nnx.merge(graphdef, w), s, x, parallel))
            out = run(weights, Sampling(schedule, conditioning, None), data["latents"])
            self._runs[height, parallel] = np.asarray(out)
        return self._runs[height, parallel]

    def reference(self, height: int, mode: str, patches: int = 1, **options) -> np.ndarray:
        """Final latents (1, height, WIDTH, 4) of `FluxReference.denoise` (NHWC here)."""
        key = (height, mode, patches, tuple(sorted(options.items())))
        if key not in self._references:
            data = self.inputs(height)
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
            out = self.reference_model.denoise(
                scheduler,
                data["latents"].transpose(0, 3, 1, 2),
                data["prompt_embeds"],
                data["pooled_prompt_embeds"],
                GUIDANCE,
                steps=STEPS,
                patches=patches,
                mode=mode,
                **options,
            )
            self._references[key] = out.transpose(0, 2, 3, 1)
        return self._references[key]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return Case(tmp_path_factory.mktemp("flux-dev") / "transformer")


HEIGHTS = pytest.mark.parametrize("height", [16, 10], ids=["even-slabs", "uneven-slabs"])


@HEIGHTS
def test_single_equals_reference(case, height):
    """The oracle itself first: one device, every step diffusers' model on the whole latent
    (through the reference's attention processor)."""
    single = case.jax(height, ParallelConfig())
    assert relative_l2(single, case.reference(height, "single")) < REFERENCE_TOLERANCE


@HEIGHTS
@pytest.mark.parametrize("devices", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_displaced_equals_reference_and_differs_from_single(case, height, devices):
    """Steps 0..WARMUP synchronous, steps WARMUP+1..3 displaced. The fast tier keeps 4
    patches, where each patch reads three others' stale keys and values."""
    parallel = ParallelConfig(devices, mode="displaced", warmup_steps=WARMUP)
    expected = case.reference(height, "displaced", devices, warmup_steps=WARMUP)
    assert relative_l2(case.jax(height, parallel), expected) < REFERENCE_TOLERANCE
    assert relative_l2(expected, case.reference(height, "single")) > DISPLACED_MARGIN


@HEIGHTS
def test_naive_equals_reference_and_differs_from_single(case, height):
    """Each of 4 patches attends to its own text and image tokens only, its image ids those
    of its rows in the whole token grid, on unequal slabs too (token rows from 0, 2, 3, 4)."""
    naive = case.jax(height, ParallelConfig(4, mode="naive"))
    expected = case.reference(height, "naive", 4)
    assert relative_l2(naive, expected) < REFERENCE_TOLERANCE
    assert relative_l2(expected, case.reference(height, "single")) > DISPLACED_MARGIN


@pytest.mark.parametrize(
    ("split", "height", "devices"),
    [
        pytest.param("col", 10, 2, id="col-even"),  # token columns 3 + 3
        pytest.param("col", 10, 4, id="col-uneven"),  # token columns 2 + 2 + 1 + 1
        pytest.param("alternate", 16, 2, id="alternate-even"),  # rows 4 + 4, columns 3 + 3
        pytest.param("alternate", 10, 4, id="alternate-uneven"),  # 2 + 1 + 1 + 1, 2 + 2 + 1 + 1
    ],
)
def test_naive_column_slabs_equal_reference(case, split, height, devices):
    """Naive column slabs, and alternate ones (row slabs at even steps, column slabs at odd
    ones): each patch's image ids are (0, row, column) of its columns (rows) in the whole
    token grid, on unequal slabs too."""
    naive = case.jax(height, ParallelConfig(devices, mode="naive", naive_split=split))
    expected = case.reference(height, "naive", devices, split=split)
    assert relative_l2(naive, expected) < REFERENCE_TOLERANCE
    assert relative_l2(expected, case.reference(height, "single")) > DISPLACED_MARGIN


@pytest.mark.slow
def test_kv_refresh_equals_reference(case):
    """kv_refresh=2 with W = 0 on 4 unequal slabs: steps 1..3 displaced, the stale keys and
    values replaced after step 2 only (step 2 reads step 0's, step 3 step 2's)."""
    parallel = ParallelConfig(4, mode="displaced", warmup_steps=0, kv_refresh=2)
    expected = case.reference(10, "displaced", 4, warmup_steps=0, kv_refresh=2)
    assert relative_l2(case.jax(10, parallel), expected) < REFERENCE_TOLERANCE
    every_step = case.reference(10, "displaced", 4, warmup_steps=0)
    assert relative_l2(expected, every_step) > DISPLACED_MARGIN


def slow_but(fast, cases):
    """`cases` as parameters, all but those in `fast` marked slow."""
    return [c if c in fast else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


CODEC_CASES = [(codec, 16) for codec in CODEC_NAMES[1:]] + [("residual-1bit", 10)]


@pytest.mark.parametrize(
    ("compress", "height"), slow_but({("fp8", 16), ("residual-1bit", 16)}, CODEC_CASES)
)
def test_displaced_with_codec_equals_reference(case, compress, height):
    """4 patches, steps 0..WARMUP synchronous (fp8 and int8 keep what they would send, rounded;
    the residual codecs' base starts exact), then displaced steps whose stale keys and values
    went through the codec: the other patches' as their receivers hold them. The fast tier
    keeps one codec of each kind (`sharding.codecs`: quantized, residual) on even slabs; the
    uneven ones send zero tokens as padding, which must not change the codec's scales."""
    parallel = ParallelConfig(4, mode="displaced", warmup_steps=WARMUP, compress=compress)
    actual = case.jax(height, parallel)
    expected = case.reference(height, "displaced", 4, warmup_steps=WARMUP, compress=compress)
    assert relative_l2(actual, expected) < REFERENCE_TOLERANCE
    uncompressed = case.reference(height, "displaced", 4, warmup_steps=WARMUP)
    assert relative_l2(actual, uncompressed) > CODEC_MARGIN


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["fp8", "residual-int4"])
def test_kv_refresh_with_codec_equals_reference(case, compress):
    """kv_refresh=2 with W = 0 on 4 unequal slabs: steps 1 and 2 read step 0's exact keys and
    values (fp8: rounded), step 3 what step 2 sent through the codec; where nothing is
    exchanged a block reads what it last received (kept beside fp8's payload, in the residual
    base)."""
    parallel = ParallelConfig(4, mode="displaced", warmup_steps=0, kv_refresh=2, compress=compress)
    actual = case.jax(10, parallel)
    expected = case.reference(10, "displaced", 4, warmup_steps=0, kv_refresh=2, compress=compress)
    assert relative_l2(actual, expected) < REFERENCE_TOLERANCE
    uncompressed = case.reference(10, "displaced", 4, warmup_steps=0, kv_refresh=2)
    assert relative_l2(actual, uncompressed) > CODEC_MARGIN

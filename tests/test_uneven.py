"""Patch parallelism on heights that do not split into P equal slabs at every UNet level:
slabs of unequal real rows in equal device arrays (`sharding.split`). Sync equals one device
to float32 rounding; displaced and naive equal the sequential PyTorch reference given the
same split (`distrifusion_reference.py`, `slab_rows`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers_models import relative_l2
from parallel_case import CODEC_ROUNDING, ROUNDING, SINGLE, WARMUP, Case

import jaxfusion
from jaxfusion.builtin import builtin_model_path
from jaxfusion.models import AutoencoderKL, load_vae
from jaxfusion.models.row_blocks import set_row_blocks
from jaxfusion.models.scaled_dot_product import set_attention
from sharding import ParallelConfig
from sharding.rows import map_rows
from sharding.split import Split

# 3 patches: rows 8, 8, 4 (arrays of 8), columns 12, 12, 14 (arrays of 16). 8 patches: rows
# 4 x 7 and 6, columns 8 and 4 x 6 and 6 (arrays of 8): both sides uneven at every count.
SIZES = {3: (20, 38), 8: (34, 38)}
UNIT = 4  # SDXL_LIGHT's 3 levels: boundaries at multiples of 4 latent rows
# A whole generation: three guided steps amplify float32 rounding (tests/test_patch_decode.py).
GENERATION_ROUNDING = 1e-4


@pytest.mark.parametrize("unit", [1, 2, 4, 8])
def test_split_rule(unit):
    """Every side of 1..80 rows over 1..9 patches: the real rows cover the side in order,
    boundaries at multiples of the unit, no two patches more than a unit apart but the
    last (which also takes the rows short of a unit), the least arrays a unit split
    allows; at every coarser level the rows a stride-2, padding-1 convolution leaves."""
    for size in range(1, 81):
        for patches in range(1, 10):
            if patches > math.ceil(size / unit):
                with pytest.raises(ValueError, match="use at most"):
                    Split.of(size, patches, unit)
                continue
            split = Split.of(size, patches, unit)
            counts, starts = split.counts, split.starts
            assert sum(counts) == size and min(counts) >= 1
            assert all(start % unit == 0 for start in starts)
            whole = [count // unit for count in counts]
            assert max(whole) - min(whole) <= 1
            if patches == 1:  # nothing to align: the plain array (cfg-only parallelism)
                assert split.counts == (size,) and split.slab == size and split.even
                continue
            assert split.slab == unit * math.ceil(size / (patches * unit)) >= max(counts)
            assert split.even == (size % (patches * unit) == 0)
            height = size
            for halvings in range(1, unit.bit_length()):  # the levels the unit allows
                height, slab = (height + 2 - 3) // 2 + 1, split.slab >> halvings
                level = split.at(slab)
                assert sum(level.counts) == height and level.slab == slab
                assert all(c <= slab for c in level.counts)
                assert level.starts == tuple(start >> halvings for start in starts)


def test_levels_coarser_than_the_unit_are_refused():
    """7 rows over 3 patches at units of 2 (rows 2, 2, 3, arrays of 4): one halving keeps
    the boundaries whole, a second would cut row 2 in half."""
    split = Split.of(7, 3, 2)
    assert split.at(2).counts == (1, 1, 2)
    with pytest.raises(ValueError, match="coarser than the split's unit allows"):
        split.at(1)


def test_layout_for_the_devices():
    """`pad` puts each patch's rows at the head of its array, zeros after them; `unpad`
    takes them back."""
    split = Split.of(10, 3, 2)  # rows 4, 4, 2 in arrays of 4
    x = np.arange(2 * 10 * 3).reshape(2, 10, 3).astype(np.float32)
    padded = np.asarray(split.pad(jnp.asarray(x), 1))
    assert padded.shape == split.laid_out(x.shape, 1) == (2, 12, 3)
    np.testing.assert_array_equal(padded[:, :8], x[:, :8])
    np.testing.assert_array_equal(padded[:, 8:10], x[:, 8:10])
    assert not padded[:, 10:].any()
    np.testing.assert_array_equal(np.asarray(split.unpad(jnp.asarray(padded), 1)), x)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The UNet case at each patch count's sizes, made on first use."""
    made = {}

    def case(patches: int) -> Case:
        if patches not in made:
            made[patches] = Case(tmp_path_factory.mktemp("unet"), SIZES[patches])
            made[patches].patches = patches
        return made[patches]

    return case


@pytest.fixture
def case(cases):
    return cases(3)


def slabs(case: Case) -> dict:
    """The latent's rows and columns of each patch, as jaxfusion splits them."""
    _, _, height, width = case.latents.shape
    return dict(
        slab_rows=Split.of(height, case.patches, UNIT).counts,
        slab_columns=Split.of(width, case.patches, UNIT).counts,
    )


@pytest.mark.parametrize("patches", [3, 8])
def test_sync_equals_single(cases, patches):
    case = cases(patches)
    sync = case.jax(ParallelConfig(patches, mode="sync"))
    assert relative_l2(sync, case.jax(SINGLE)) < ROUNDING


def test_chunked_attention_sync_equals_single(tmp_path):
    """The gathered keys and values hold each patch's real tokens only, as many as the
    whole image's (190 and 50 at a 20 x 38 latent's two attention levels): chunks of 64 end
    in a ragged one, as on one device."""
    chunked = Case(tmp_path, SIZES[3])
    set_attention(chunked.unet, "chunked", query_chunk=48, key_chunk=64)
    sync = chunked.jax(ParallelConfig(3, mode="sync"))
    assert relative_l2(sync, chunked.jax(SINGLE)) < ROUNDING


@pytest.mark.slow
def test_sync_with_the_guidance_halves_split_equals_single(case):
    sync = case.jax(ParallelConfig(6, 2, mode="sync"))
    assert relative_l2(sync, case.jax(SINGLE)) < ROUNDING


@pytest.mark.parametrize(
    ("patches", "gn"),
    [
        (3, "corrected"),
        (3, "stale"),
        pytest.param(3, "sync", marks=pytest.mark.slow),
        pytest.param(3, "separate", marks=pytest.mark.slow),
    ],
)
def test_displaced_equals_reference(cases, patches, gn):
    """GroupNorm's stale rules weigh each patch by its real rows (the reference records
    each patch's element count beside its moments)."""
    case = cases(patches)
    parallel = ParallelConfig(patches, mode="displaced", warmup_steps=WARMUP, group_norm=gn)
    expected = case.reference("displaced", case.patches, gn, **slabs(case))
    assert relative_l2(case.jax(parallel), expected) < ROUNDING
    assert relative_l2(expected, case.jax(SINGLE)) > 1e-3  # really displaced


@pytest.mark.slow
def test_compressed_displaced_equals_reference(case):
    """Codecs see the padding tokens of K/V as zeros, which move no scale: the same as
    compressing each patch's real tokens alone (residual-1bit: a base and a 1-bit residual
    per row, scales of each, as tests/test_codecs.py checks on equal slabs)."""
    compress = "residual-1bit"
    parallel = ParallelConfig(case.patches, warmup_steps=WARMUP, compress=compress)
    expected = case.reference("displaced", case.patches, compress=compress, **slabs(case))
    assert relative_l2(case.jax(parallel), expected) < CODEC_ROUNDING


@pytest.mark.parametrize("split", ["row", pytest.param("col", marks=pytest.mark.slow), "alternate"])
def test_naive_equals_reference(case, split):
    """Each patch runs its real rows (columns) alone, as one device would."""
    naive = case.jax(ParallelConfig(case.patches, mode="naive", naive_split=split))
    expected = case.reference("naive", case.patches, split=split, **slabs(case))
    assert relative_l2(naive, expected) < ROUNDING


@pytest.mark.parametrize("row_blocks", [False, True], ids=["whole", "row-blocked"])
def test_decode_equals_one_device(row_blocks):
    """The built-in VAE's decode of a 10-row latent over 3 devices (rows 4, 3, 3: the
    decoder only upsamples, its boundaries may be any row) and 8 (2, 2, then 1 each), whole
    and by blocks of one row (the statistics of real rows only, the halo from below inside
    the padded array)."""
    vae = load_vae(builtin_model_path())
    if row_blocks:
        set_row_blocks(vae, threshold_bytes=0, block_bytes=2 * 1024)
    latents = np.random.default_rng(0).standard_normal((2, 10, 12, 4)).astype("f4")
    expected = np.asarray(jax.jit(vae.decode)(latents))
    for devices in (3, 8):
        parallel = ParallelConfig(devices, mode="sync")
        run = jax.jit(lambda z, parallel=parallel: map_rows(vae, AutoencoderKL.decode, z, parallel))
        actual = np.asarray(run(latents))
        assert actual.shape == expected.shape
        assert relative_l2(actual, expected) < ROUNDING, devices
    assert expected.std() > 0.01


@pytest.fixture(scope="module")
def pipe():
    return jaxfusion.load_pipeline(builtin_model_path())


@pytest.mark.slow
def test_image_to_image_equals_single(pipe):
    """The built-in model's whole program at 80x64 (a 20x16 latent) on 3 devices from a
    starting image: its encode split by rows (at multiples of the VAE's 4 pixels), the loop,
    the decode; the image comes back whole (a jit boundary splits only evenly). Prompt to
    image on unequal slabs: tests/test_patch_decode.py."""
    options = dict(prompt="a red circle", height=80, width=64, num_inference_steps=3)
    parallel = ParallelConfig(3, mode="sync")
    single = pipe(**options)
    image = dict(image=single, strength=0.6)
    start = pipe(**options, **image)
    assert relative_l2(pipe(**options, **image, parallel=parallel), start) < GENERATION_ROUNDING

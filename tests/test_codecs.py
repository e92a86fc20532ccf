"""The codecs of displaced steps (`ParallelConfig.compress`, `sharding.codecs`): each
quantizer against its formula in float64 numpy (`codec_reference.py`), the packed bytes
included; displaced runs with a codec (and with `kv_refresh`) against the sequential
PyTorch reference run through the same formulas, and with all steps in warm-up against
single. The runs take one codec of each kind (`sharding.codecs`; the exchange treats every
quantizer of a kind alike): int8 (`Quantized`) and residual-1bit (`Residual`, with its
halos at residual-int4); the round-trip test checks every quantizer against its formula."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from codec_reference import CODE_BITS, ambiguous, continuous, packed_bytes, quantize, round_codes
from diffusers_models import relative_l2
from parallel_case import CODEC_ROUNDING, ROUNDING, SINGLE, STEPS, WARMUP, Case

from sharding import ParallelConfig
from sharding.codecs import CODECS
from sharding.names import COMPRESSIONS

QUANTIZED = COMPRESSIONS[1:]
ONE_OF_EACH_KIND = ("int8", "residual-1bit")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return Case(tmp_path_factory.mktemp("unet"))


def slow_but(first, names):
    """`names` as parameters, all but `first` marked slow."""
    return [n if n == first else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", QUANTIZED)
def test_round_trip_matches_formula_and_packs_bits(name):
    """Codes (packed `bits` per code into uint8; int8 as int8), scales and decoded values of
    a (2, 5, 37) message (37 columns: the packing pads) against the float64 formula."""
    quantizer = CODECS[name].quantizer
    row_sizes = np.float64([[1], [3], [0.1], [0], [9]])
    x = (np.random.default_rng(1).standard_normal((2, 5, 37)) * row_sizes).astype(np.float32)
    # float32 and float64 round every value alike (the all-zero row, t = 0, aside)
    assert not ambiguous(name, np.delete(x, 3, axis=1), tolerance=1e-6).any()
    payload = quantizer.encode(jnp.asarray(x))
    expected, codes = quantize(name, x)
    bits = CODE_BITS[name]
    assert payload.codes.shape == (2, 5, math.ceil(37 * bits / 8))
    if name == "int8":
        assert payload.codes.dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(payload.codes, np.int64) + 127, codes)
    else:
        assert payload.codes.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(payload.codes), packed_bytes(codes, bits))
    scales = [payload.row_scale] + ([] if payload.col_scale is None else [payload.col_scale])
    assert all(s.dtype == jnp.float32 for s in scales)
    decoded = np.asarray(quantizer.decode(payload), np.float64)
    scale = np.abs(continuous(name, x)[1]).max(-1, keepdims=True)
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-6 * scale.max())
    assert np.all(decoded[:, 3] == 0)  # an all-zero row decodes to zeros


def test_round_codes_are_the_formula_rounding():
    """The oracle's own codes against a hand-written case: int4 codes of [-7, 0.5, 3.4, 7]
    (scale 1) are q + 7 = [0, 7, 10, 14] (round half to even); 2 bits of [-2, -0.1, 0.1, 5]
    over s = 1.2 * 1.8 are floor(t) = [-1, -1, 0, 2] clipped to [-2, 1], + 2."""
    np.testing.assert_array_equal(
        round_codes("residual-int4", np.array([-7, 0.5, 3.4, 7.0])), [0, 7, 10, 14]
    )
    t, _ = continuous("residual-int2", np.array([[-2, -0.1, 0.1, 5.0]]))
    np.testing.assert_array_equal(round_codes("residual-int2", t), [[1, 1, 2, 3]])


def config(compress: str, **options) -> ParallelConfig:
    return ParallelConfig(4, mode="displaced", compress=compress, **options)


@pytest.mark.parametrize("compress", slow_but("residual-1bit", ONE_OF_EACH_KIND))
def test_displaced_with_codec_equals_reference(case, compress):
    actual = case.jax(config(compress, warmup_steps=WARMUP))
    expected = case.reference("displaced", 4, compress=compress)
    error = relative_l2(actual, expected)
    assert error < CODEC_ROUNDING, compress
    uncompressed = case.reference("displaced", 4)
    assert relative_l2(actual, uncompressed) > 5 * error  # the codec does something


@pytest.mark.slow  # the fast tier has the reference test's compile
@pytest.mark.parametrize("compress", ONE_OF_EACH_KIND)
def test_all_steps_warm_equals_single(case, compress):
    displaced = case.jax(config(compress, warmup_steps=STEPS - 1))
    assert relative_l2(displaced, case.jax(SINGLE)) < ROUNDING


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["none", "residual-int4"])
def test_kv_refresh_equals_reference(case, compress):
    """kv_refresh=2 with W = 0: steps 1..3 displaced, K/V exchanged after step 2 only."""
    actual = case.jax(config(compress, warmup_steps=0, kv_refresh=2))
    expected = case.reference("displaced", 4, warmup=0, compress=compress, kv_refresh=2)
    error = relative_l2(actual, expected)
    assert error < CODEC_ROUNDING
    every_step = case.reference("displaced", 4, warmup=0, compress=compress)
    assert relative_l2(actual, every_step) > 5 * error

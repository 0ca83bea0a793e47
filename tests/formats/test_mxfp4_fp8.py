import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4jax import formats
from tests.conftest import assert_bitwise_equal


def _random_mxfp4(rng, rows, k, exp_lo, exp_hi):
    codes = rng.integers(0, 16, (rows, k)).astype(np.uint8)
    weight = np.asarray(formats.pack_e2m1(codes)).view(np.int8)
    scale = (rng.integers(exp_lo, exp_hi + 1, (rows, k // 32)) + 127).astype(np.uint8)
    return codes, weight, scale


def test_decode_mxfp4_by_hand():
    codes = np.array([[1, 15] + [0] * 30 + [7] + [0] * 31], np.uint8)  # 0.5, -6 | 6
    weight = np.asarray(formats.pack_e2m1(codes)).view(np.int8)
    scale = np.array([[127 + 3, 127 - 2]], np.uint8)
    y = np.asarray(formats.decode_mxfp4(weight, scale))
    assert y[0, 0] == 4.0 and y[0, 1] == -48.0 and y[0, 32] == 1.5 and np.count_nonzero(y) == 3


def test_e8m0_bytes_are_reinterpreted_not_cast():
    raw = np.array([127, 128, 120, 254], np.uint8)
    for stored in (raw, raw.view(np.int8), raw.view(ml_dtypes.float8_e8m0fnu)):
        assert_bitwise_equal(formats.e8m0_to_float(stored), np.array([1.0, 2.0, 2.0**-7, 2.0**127], np.float32), "e8m0")
    assert np.isnan(formats.e8m0_to_float(np.array([255], np.uint8)))[0]
    with pytest.raises(TypeError):
        formats.e8m0_to_float(np.array([1.0], np.float32))


def test_encode_mxfp4_round_trip_is_exact_on_representable_values(rng):
    codes, weight, scale = _random_mxfp4(rng, 16, 128, -6, 6)
    x = np.asarray(formats.decode_mxfp4(weight, scale))
    mx = formats.encode_mxfp4(x)
    assert_bitwise_equal(formats.decode_mxfp4(mx.weight, mx.scale), x, "decode(encode(x))")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(-30, 30), st.integers(0, 17))
def test_mxfp4_to_nvfp4_exact_when_claimed(seed, lo, span):
    rng = np.random.default_rng(seed)
    _, weight, scale = _random_mxfp4(rng, 8, 64, lo, lo + span)
    scale[0, 0], scale[-1, -1] = 127 + lo, 127 + lo + span  # pin the range
    t, report = formats.mxfp4_to_nvfp4(weight, scale)
    assert report.exact
    assert_bitwise_equal(t.dequantize(), formats.decode_mxfp4(weight, scale), "nvfp4 vs mxfp4")
    assert_bitwise_equal(t.values, weight.view(np.uint8), "codes kept")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.integers(18, 40))
def test_mxfp4_to_nvfp4_detects_inexact(seed, span):
    rng = np.random.default_rng(seed)
    codes, weight, scale = _random_mxfp4(rng, 4, 64, -10, -10)
    codes[:] = 1  # every block non-zero
    weight = np.asarray(formats.pack_e2m1(codes)).view(np.int8)
    scale[0, 0] = 127 - 10 + span
    with pytest.raises(ValueError, match=r"expert\.w1.*\[-10, "):
        formats.mxfp4_to_nvfp4(weight, scale, name="expert.w1")
    t, report = formats.mxfp4_to_nvfp4(weight, scale, strict=False)
    assert not report.exact and report.min_exponent == -10 and report.max_exponent == -10 + span
    ref = np.asarray(formats.decode_mxfp4(weight, scale))
    assert report.max_abs_error == pytest.approx(np.abs(np.asarray(t.dequantize()) - ref).max())


def test_all_zero_blocks_do_not_constrain_the_range(rng):
    codes, weight, scale = _random_mxfp4(rng, 2, 64, 0, 0)
    codes[1, 32:] = 0  # block (1, 1) all zero, with an absurd exponent
    codes[1, 32:] = np.where(rng.random(32) < 0.5, 8, 0)  # -0.0 counts as zero
    weight = np.asarray(formats.pack_e2m1(codes)).view(np.int8)
    scale[1, 1] = 250
    t, report = formats.mxfp4_to_nvfp4(weight, scale)
    assert report.exact and report.max_exponent == 0
    assert_bitwise_equal(t.dequantize(), formats.decode_mxfp4(weight, scale), "nvfp4 vs mxfp4")


def test_fp8_block_decode_by_hand_and_partial_blocks(rng):
    w = rng.standard_normal((200, 300)).astype(np.float32)
    q = formats.encode_fp8_block(w)
    assert q.scale.shape == (2, 3) and q.weight.dtype == jnp.float8_e4m3fn
    d = np.asarray(formats.decode_fp8_block(q.weight, q.scale))
    s = 2.0 ** (np.asarray(q.scale).astype(np.int32) - 127)
    want = np.asarray(q.weight).astype(np.float32) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:200, :300]
    assert_bitwise_equal(d, want.astype(np.float32), "decode")
    # scale is the power of two rounded up: every block's amax / s lies in (224, 448]
    blocks = np.abs(np.pad(w, ((0, 56), (0, 84)))).reshape(2, 128, 3, 128).max(axis=(1, 3))
    assert np.all(blocks / s <= 448) and np.all(blocks / s > 224)
    assert np.abs(d - w).max() <= np.max(s) * 16  # e4m3 half-ulp at the top binade
    with pytest.raises(ValueError, match=r"scales of shape \(2, 3\)"):
        formats.decode_fp8_block(q.weight, np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize("top", [448.0, 6.0, 2688.0, 1.0, 3.0 * 2.0**-120])
def test_ceil_log2_quotient_is_ceil_log2_of_the_rounded_quotient(rng, top):
    """The bit formula equals ceil_log2 of the correctly rounded quotient, on random values and on
    the edges: a = top * 2**k exactly and its float32 neighbours (where rounding could matter)."""
    from nvfp4jax.formats.e2m1 import exact_div
    from nvfp4jax.formats.e8m0 import ceil_log2, ceil_log2_quotient

    k = rng.integers(-60, 60, 3000).astype(np.float32)
    edge = (np.float32(top) * np.exp2(k)).astype(np.float32)
    a = np.concatenate([
        edge, np.nextafter(edge, np.float32(np.inf)), np.nextafter(edge, np.float32(0)),
        (np.abs(rng.standard_normal(20000)) * 10.0 ** rng.integers(-12, 12, 20000)).astype(np.float32),
    ])
    with np.errstate(all="ignore"):
        q = a / np.float32(top)
    a = a[np.isfinite(q) & (a >= 2.0**-126) & (q >= 2.0**-125) & (q < 2.0**100)]  # normal a and quotient
    want = ceil_log2(exact_div(jnp.asarray(a), jnp.float32(top)))
    assert_bitwise_equal(jax.jit(lambda x: ceil_log2_quotient(x, top))(a), want, f"top={top}")
    with pytest.raises(ValueError, match="positive normal"):
        ceil_log2_quotient(a, 0.0)

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nvfp4jax import formats
from tests.conftest import assert_bitwise_equal
from tests.formats.oracle import nvfp4_oracle


def _check_against_oracle(x: np.ndarray, per_row: bool, what: str):
    t = formats.quantize(x, per_row=per_row)
    codes, scales, g = nvfp4_oracle(x, per_row)
    assert_bitwise_equal(formats.unpack_e2m1(t.values), codes, f"{what} codes")
    assert_bitwise_equal(np.asarray(t.scales).view(np.uint8), scales.view(np.uint8), f"{what} scales")
    assert_bitwise_equal(t.global_scale, g, f"{what} global")


@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_matches_oracle_on_a_million_values(rng, per_row):
    x = (rng.standard_normal((1024, 1024)) * np.exp(rng.uniform(-4, 4, (1024, 1)))).astype(np.float32)
    # per-block outliers so block scales vary a lot
    x[rng.integers(0, 1024, 500), rng.integers(0, 1024, 500)] *= 50
    _check_against_oracle(x, per_row, f"{per_row=}")


def test_edge_cases_match_oracle(rng):
    rows = []
    rows.append(np.zeros(32))  # all zero
    rows.append(np.concatenate([np.zeros(16), rng.standard_normal(16)]))  # one all-zero block
    g = 6.0  # ties: a block with amax 6 has scale 1 under global 1 -> grid values and midpoints
    rows.append(np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -6] * 2))
    rows.append(np.array([g, -g] * 16))  # values at +-6 x scale
    rows.append(np.array([-0.0, 0.0] * 16))  # signed zeros
    rows.append(np.concatenate([[1e4], np.full(15, 1e-3), [3e-3], np.full(15, 1e-4)]))  # tiny blocks
    x = np.stack([np.asarray(r, np.float32) for r in rows])
    # a block whose E4M3 scale is subnormal: amax_b / 6 / global < 2**-6
    sub = np.concatenate([[2688.0], np.zeros(15), rng.uniform(-0.01, 0.01, 16)]).astype(np.float32)
    x = np.concatenate([x, sub[None]])
    for per_row in (False, True):
        _check_against_oracle(x, per_row, f"edge {per_row=}")
    t = formats.quantize(sub[None])
    assert float(t.scales.astype(jnp.float32)[0, 1]) < 2.0**-6, "test input must produce a subnormal E4M3 scale"


def test_huge_dynamic_range(rng):
    x = (rng.standard_normal((64, 256)) * 10.0 ** rng.integers(-20, 20, (64, 256 // 16)).repeat(16, 1)).astype(np.float32)
    for per_row in (False, True):
        _check_against_oracle(x, per_row, f"range {per_row=}")


def test_rejects_bad_k_and_non_finite():
    with pytest.raises(ValueError, match="multiple of 16"):
        formats.quantize(np.ones((4, 24), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 32), np.float32)
        x[1, 7] = bad
        with pytest.raises(ValueError, match=r"non-finite.*\(1, 7\)"):
            formats.quantize(x)


def test_bf16_input_quantizes_like_its_float32_value(rng):
    x = rng.standard_normal((8, 64)).astype(ml_dtypes.bfloat16)
    a, b = formats.quantize(jnp.asarray(x), per_row=True), formats.quantize(x.astype(np.float32), per_row=True)
    assert_bitwise_equal(a.values, b.values, "values")
    assert_bitwise_equal(a.global_scale, b.global_scale, "global")


def test_encode_e2m1_independent_of_ml_dtypes(rng):
    v = np.concatenate([rng.uniform(-8, 8, 100000), np.arange(-7, 7.01, 0.125)]).astype(np.float32)
    want = v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    assert_bitwise_equal(formats.encode_e2m1(v), want, "e2m1")
    assert_bitwise_equal(formats.decode_e2m1(np.arange(16, dtype=np.uint8)),
                         np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32), "decode")


_finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda b: 16 * b)), elements=_finite),
       st.booleans())
def test_round_trip_error_is_within_half_a_grid_step(x, per_row):
    t = formats.quantize(x, per_row=per_row)
    y = np.asarray(t.dequantize())
    scale = (np.asarray(t.scales.astype(jnp.float32)) * (np.asarray(t.global_scale)[..., None] if per_row else np.asarray(t.global_scale)))
    scale = np.repeat(scale, 16, axis=-1)
    mag = np.abs(x) / np.where(scale > 0, scale, 1)
    # grid step around |x|/scale: 0.5 below 2, 1 below 4, 2 above; saturation at 6 allowed up to the block max
    step = np.where(mag < 2, 0.5, np.where(mag < 4, 1.0, 2.0))
    bound = np.where(scale > 0, 0.5 * step * scale, np.abs(x))
    # s_b rounding may push amax_b slightly above 6 * scale: saturating costs at most |x| - 6*scale
    bound = np.maximum(bound, np.abs(x) - 6 * scale)
    err = np.abs(y - x)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-30), f"max excess {np.max(err - bound)}"


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 9).map(lambda n: 2 * n)), elements=st.integers(0, 15)))
def test_pack_unpack_inverse(codes):
    packed = formats.pack_e2m1(codes)
    assert_bitwise_equal(formats.unpack_e2m1(packed), codes, "unpack(pack)")
    assert_bitwise_equal(formats.pack_e2m1(formats.unpack_e2m1(packed)), packed, "pack(unpack)")
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4, "low nibble must hold the even element"


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 12))
def test_swizzle_inverse_and_atom_layout(rows, cols):
    s = (np.arange(rows * cols) % 251 + 1).astype(np.uint8).reshape(rows, cols)
    sw = np.asarray(formats.swizzle_scales(s))
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert sw.shape == (rp * cp,)
    assert_bitwise_equal(formats.unswizzle_scales(sw, rows, cols), s, "unswizzle(swizzle)")
    assert (sw != 0).sum() == rows * cols, "padding must be zero"
    # spot-check the documented offset formula
    r, c = rows - 1, cols - 1
    i, a, b, j, cc = r // 128, (r % 128) // 32, r % 32, c // 4, c % 4
    assert sw[(i * (cp // 4) + j) * 512 + b * 16 + a * 4 + cc] == s[r, c]


def test_swizzle_matches_the_reference_to_blocked_layout():
    # the layout cuBLAS / CUTLASS document for block-scaled MMA: view (128, 4) blocks as (4, 32, 4) -> (32, 4, 4)
    s = np.arange(256 * 8, dtype=np.int32).reshape(256, 8)
    blocks = s.reshape(2, 128, 2, 4).transpose(0, 2, 1, 3).reshape(-1, 4, 32, 4).transpose(0, 2, 1, 3)
    assert_bitwise_equal(formats.swizzle_scales(s), blocks.reshape(-1), "to_blocked")


def test_exact_div_corrects_a_reciprocal_multiply(rng):
    """XLA may turn a / b into a * (1/b) (not correctly rounded), a GPU quotient may be 2 ulp off;
    exact_div must still be IEEE-exact, also for divisors >= 2**126 (the scale of a is split in two
    factors there) and on exact ties (a / 4 of odd 25-bit integers)."""
    from nvfp4jax.formats.e2m1 import exact_div

    n = 400_000
    a = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    b[:1000] = np.float32(2.0**126) * rng.uniform(1, 3.9, 1000).astype(np.float32)  # exponent 126 and 127
    a[:1000] = rng.standard_normal(1000).astype(np.float32) * np.float32(1e25)
    a[1000:2000], b[1000:2000] = rng.integers(2**24, 2**25, 1000).astype(np.float32), 4.0
    want = (a / b).astype(np.float32)
    assert np.abs(want[:1000]).min() > 2.0**-78, "keep the huge-divisor quotients out of the subnormal range"
    guess = jnp.asarray(a) * (jnp.float32(1.0) / jnp.asarray(b))
    assert int((np.asarray(guess) != want).sum()) > 1000, "the inexact guess must actually be wrong somewhere"
    off = (want.view(np.int32) + rng.integers(-2, 3, n).astype(np.int32)).view(np.float32)  # up to 2 ulp off
    guess = jnp.where(jnp.arange(n) < 1000, off, guess)  # 1 / b is subnormal there, flushed: a zero guess is kept
    for name, g in (("reciprocal multiply", guess), ("2 ulp off", off), ("own quotient", None)):
        got = jax.jit(exact_div)(a, b) if g is None else jax.jit(lambda x, y, g: exact_div(x, y, g))(a, b, g)
        assert_bitwise_equal(got, want, name)
    assert_bitwise_equal(jax.jit(exact_div)(a, np.float32(2688.0)), a / np.float32(2688.0), "by a constant")


def test_tile_layout_moves_whole_tiles(rng):
    """``tile_weight``: values/scales ``[..., n/64, k/128, 64, 64 | 8]`` holding exactly the bytes of each
    64 x 128 tile; ``untile_weight`` inverts it; the logical shape and the dequantized values stay."""
    from nvfp4jax.formats.nvfp4 import TILE_K, TILE_ROWS, tile_weight, untile_weight

    t = formats.quantize(rng.standard_normal((3, 192, 384)).astype(np.float32))
    tt = tile_weight(t)
    assert tt.layout == "tiled" and tt.shape == t.shape == (3, 192, 384)
    assert tt.values.shape == (3, 3, 3, TILE_ROWS, TILE_K // 2) and tt.scales.shape == (3, 3, 3, TILE_ROWS, TILE_K // 16)
    v, s = np.asarray(t.values), np.asarray(t.scales).view(np.uint8)
    vt, st_ = np.asarray(tt.values), np.asarray(tt.scales).view(np.uint8)
    for e, i, j in ((0, 0, 0), (1, 2, 1), (2, 1, 2)):
        assert_bitwise_equal(vt[e, i, j], v[e, 64 * i:64 * i + 64, 64 * j:64 * j + 64], f"codes of tile {e, i, j}")
        assert_bitwise_equal(st_[e, i, j], s[e, 64 * i:64 * i + 64, 8 * j:8 * j + 8], f"scales of tile {e, i, j}")
    back = untile_weight(tt)
    assert back.layout == "rows"
    assert_bitwise_equal(back.values, t.values)
    assert_bitwise_equal(np.asarray(back.scales).view(np.uint8), s)
    assert_bitwise_equal(tt.dequantize(), t.dequantize())
    assert untile_weight(t) is t and not tt.per_row


@pytest.mark.parametrize("shape,per_row,match", [((96, 128), False, "64 rows x 128 K"), ((64, 64), False, "64 rows x 128 K"),
                                                 ((64, 128), True, "per-row"), ((128,), False, ">= 2 dims")])
def test_tile_weight_refuses_what_does_not_fit(rng, shape, per_row, match):
    from nvfp4jax.formats.nvfp4 import tile_weight, tileable

    t = formats.quantize(rng.standard_normal(shape).astype(np.float32), per_row=per_row)
    assert match in tileable(t)
    with pytest.raises(ValueError, match=match):
        tile_weight(t)
    with pytest.raises(ValueError, match="already"):
        tile_weight(tile_weight(formats.quantize(rng.standard_normal((64, 128)).astype(np.float32))))

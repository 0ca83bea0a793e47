"""The quantize kernel's division-free E2M1 path (``_cute.e2m1_code_of_quotient``), checked on the CPU.

The kernel computes the code of ``RN(x / d)`` as: ``y = RN(1 / d)`` once per block, then per value
``q0 = RN(|x| y)``, ``r = fma(-q0, d, |x|)``, ``q = fma(r, y, q0)`` (Markstein's correction) and a
comparison-free encoder (round by adding ``1.5 * 2**(22 + region)``, count the steps in the bits).
These tests emulate those PTX instructions one for one in NumPy (float32 multiply / add are IEEE
round-to-nearest there; ``fma`` is emulated exactly) and compare with ``div.rn`` (NumPy's float32
division) and with the design §3 oracle's E2M1 rounding (ml_dtypes), on every float32 near every
E2M1 midpoint and on adversarial divisors. The GPU test ``test_quantize.py`` runs the kernel itself.
"""

import ml_dtypes
import numpy as np

from nvfp4jax.formats import e2m1

MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
ROUND_HALF_BITS = 0x4AC00000  # float32 1.5 * 2**22 (_cute._ROUND_HALF_BITS)
QUOTIENT_MIN_DIVISOR = 2.0**-64


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def encode(q: np.ndarray) -> np.ndarray:
    """The encoder's PTX, instruction for instruction (``q >= 0``): region, C, q + C, step count."""
    with np.errstate(over="ignore"):
        e = (_bits(q) >> 23).astype(np.int64) - 127
        g = np.minimum(np.maximum(e, 0), 2).astype(np.uint32)
        c = _f32(np.uint32(ROUND_HALF_BITS) + g * np.uint32(0x800000))
        s = _bits(np.asarray(q, np.float32) + c)  # add.rn.f32
        k = np.uint32(ROUND_HALF_BITS) + g * np.uint32(0x7FFFFE)
        return np.minimum(s - k, np.uint32(7)).astype(np.uint8)


def oracle_code(q: np.ndarray) -> np.ndarray:
    """E2M1 magnitude code of ``q >= 0`` as the design §3 oracle rounds (ml_dtypes, RNE, saturating)."""
    q = np.minimum(np.asarray(q, np.float32), np.float32(6.0))
    return (q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x7).astype(np.uint8)


def fma32(a, b, c) -> np.ndarray:
    """float32 ``RN(a * b + c)`` exactly: the float64 product is exact, TwoSum keeps the sum's error,
    and a float64 sum landing exactly on a float32 midpoint is resolved by the error's sign."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))  # TwoSum: s + err == p + c exactly
    r = s.astype(np.float32)
    lo = np.where(r.astype(np.float64) > s, np.nextafter(r, np.float32(-np.inf)), r)
    hi = np.nextafter(lo, np.float32(np.inf))
    mid = (lo.astype(np.float64) + hi.astype(np.float64)) / 2  # exact in float64
    tie = (s == mid) & (err != 0)
    return np.where(tie, np.where(err > 0, hi, lo), r).astype(np.float32)


def quotient(x, d):
    """The kernel's ``q`` for ``|x| / d``: RN(1/d) once, then one multiply and two fma."""
    ax = np.abs(np.asarray(x, np.float32))
    d = np.asarray(d, np.float32)
    y = np.float32(1) / d
    q0 = ax * y
    r = fma32(-q0, d, ax)
    return np.abs(fma32(r, y, q0))


def test_fma_emulation_is_exact():
    """fma32 vs exact rational arithmetic on cases where a float64 sum double-rounds."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = (-(a.astype(np.float64) * b) * (1 + rng.integers(-3, 4, 2000) * 2.0**-24)).astype(np.float32)
    got = fma32(a, b, c)
    for i in range(len(a)):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        lo = np.float32(float(exact))
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(_bits(v)) & 1))
        assert got[i] == best, (a[i], b[i], c[i], got[i], best)


def _near(values, ulps):
    """Every float32 within ``ulps`` of each value (both sides), positive."""
    base = _bits(np.asarray(values, np.float32)).astype(np.int64)
    steps = np.arange(-ulps, ulps + 1, dtype=np.int64)
    return _f32((base[:, None] + steps[None, :]).ravel().astype(np.uint32))


def test_encoder_matches_the_oracle_near_every_midpoint():
    """All float32 within 2**16 ulps of each midpoint and region edge, plus tiny, large, zero."""
    edges = MIDPOINTS + (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0)
    q = np.concatenate([_near(edges, 1 << 16), np.float32([0.0, 2.0**-149, 2.0**-126, 1e-20, 0.2, 9.0, 1e6, 3e38])])
    q = q[q >= 0]
    got, want = encode(q), oracle_code(q)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mismatches, first q={q[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"
    # and the package's own encoder agrees with the oracle there (same rounding rule)
    assert np.array_equal(np.asarray(e2m1.encode_e2m1(q[:4096])) & 7, want[:4096])


def _divisors(rng):
    """Block divisors ``f32(e4m3 s) * g`` as the kernel forms them, g over the whole normal range above
    the fast path's bound, plus adversarial mantissas (all ones, 1 + 1 ulp) around powers of two."""
    s8 = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    g = np.float32(2.0) ** rng.uniform(-70, 120, 400).astype(np.float32)
    d = (s8[None, :] * g[:, None]).astype(np.float32).ravel()
    pow2 = np.float32(2.0) ** np.arange(-60, 120, 7).astype(np.float32)
    adv = np.concatenate([pow2, np.nextafter(pow2, np.float32(0)), np.nextafter(pow2, np.float32(np.inf)),
                          pow2 * np.float32(1.5), _f32(_bits(pow2) | np.uint32(0x7FFFFF))])
    d = np.concatenate([d, adv]).astype(np.float32)
    return d[np.isfinite(d) & (d >= QUOTIENT_MIN_DIVISOR)]


def test_quotient_is_correctly_rounded_near_midpoints():
    """q == RN(|x| / d) (div.rn) bitwise whenever |x| / d is within 64 ulps of an E2M1 midpoint."""
    rng = np.random.default_rng(2)
    d = _divisors(rng)
    d = d[rng.permutation(d.size)[:4000]]
    for t in MIDPOINTS:
        target = (np.float64(t) * d.astype(np.float64)).astype(np.float32)  # |x| near t * d
        x = (_bits(target).astype(np.int64)[:, None] + np.arange(-64, 65)[None, :]).astype(np.uint32)
        x = _f32(x)
        dd = np.broadcast_to(d[:, None], x.shape)
        ok = np.isfinite(x) & (x > 0)
        x, dd = x[ok], dd[ok]
        got = quotient(x, dd)
        want = np.abs(x) / dd
        bad = np.flatnonzero(_bits(got) != _bits(want))
        assert bad.size == 0, f"t={t}: {bad.size} differ, first x={x[bad[0]]!r} d={dd[bad[0]]!r}"


def test_whole_blocks_match_the_oracle():
    """Codes of random and adversarial blocks through the kernel's fast path == the oracle's codes
    (sign from x's sign bit, so -0.0 is code 8), for every block whose divisor takes the fast path."""
    rng = np.random.default_rng(3)
    special = np.float32([6.0, 5.0, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -0.25, -5.0, 0.0, -0.0, 1.0, 4.0, 2.0, 0.5])
    x = np.concatenate([rng.standard_normal((256, 64)) * 10.0 ** rng.uniform(-15, 30, (256, 1)),
                        rng.standard_t(2, (256, 64)),
                        np.tile(special, (16, 4)) * 2.0 ** rng.integers(-30, 30, (16, 1))]).astype(np.float32)
    x[::7, 5] = 0.0  # some all-but-one-zero rows would be rarer; a zero value in many blocks
    g = (np.abs(x).max(-1, keepdims=True) / np.float32(2688)).astype(np.float32)  # per row (amaxes >= MIN_AMAX)
    blocks = x.reshape(x.shape[0], -1, 16)
    amax_b = np.abs(blocks).max(-1, keepdims=True)
    s = (amax_b / np.float32(6) / g[:, :, None]).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    d = np.broadcast_to((s.astype(np.float32) * g[:, :, None]).astype(np.float32), blocks.shape)
    fast = d >= QUOTIENT_MIN_DIVISOR
    assert fast.mean() > 0.9
    xb, db = blocks[fast], d[fast]
    got = encode(quotient(xb, db)) | ((_bits(xb) >> 28) & 8).astype(np.uint8)
    want = (xb / db).astype(np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} differ, first x={xb[bad[0]]!r} d={db[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"


def test_encoder_exhaustive():
    """Every float32 in [0, 16) (2**30 values, ~30 s): the encoder is the oracle's E2M1 rounding."""
    for start in range(0, 0x41800000, 1 << 24):
        q = _f32(np.arange(start, min(start + (1 << 24), 0x41800000), dtype=np.uint32))
        assert np.array_equal(encode(q), oracle_code(q)), hex(start)

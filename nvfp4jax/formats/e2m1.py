"""E2M1 (FP4) codes: encode with round-to-nearest-even, decode, and pack pairs into bytes.

An E2M1 code is 4 bits: bit 3 is the sign, bits 0-2 index the magnitudes
``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Two codes share a byte, the **low nibble holding the even
element** (element 2k) and the high nibble element 2k+1 — the layout of both NVFP4 and the
official MXFP4 expert weights.

Everything here is vectorised ``jax.numpy`` and accepts NumPy arrays.
"""

from __future__ import annotations

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int8, UInt8

E2M1_MAX = 6.0
#: magnitude of code c (c = 0..7); codes 8..15 are the negated values.
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
#: value of every 4-bit code 0..15 (code 8 is -0.0).
E2M1_VALUES = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES]).astype(np.float32)

# Midpoints between consecutive magnitudes. A magnitude exactly on a midpoint rounds to the
# neighbour whose code is even (round-to-nearest-even on the mantissa bit): up when the upper
# code is even, down otherwise.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_ROUNDS_UP = tuple((i + 1) % 2 == 0 for i in range(7))


def encode_e2m1(x: Float[ArrayLike, "*shape"]) -> UInt8[Array, "*shape"]:
    """Round float32 ``x`` to the nearest E2M1 code (ties to even, saturating at +-6).

    The sign bit follows ``x``'s sign bit, so -0.0 and negatives that round to zero give code 8,
    as an IEEE cast does. NaN input is not representable; callers check for it first.
    """
    x = jnp.asarray(x, jnp.float32)
    mag = jnp.abs(x)
    code = jnp.zeros(x.shape, jnp.uint8)
    for mid, up in zip(_MIDPOINTS, _TIE_ROUNDS_UP):
        passed = mag >= mid if up else mag > mid
        code = code + passed.astype(jnp.uint8)
    sign = jnp.signbit(x).astype(jnp.uint8) << 3
    return code | sign


def _two_prod(x: Array, y: Array) -> tuple[Array, Array]:
    """Dekker's exact product: ``x * y == p + e`` exactly (no overflow/underflow).

    The halves come from ``lax.reduce_precision`` (a bit operation: ``x`` rounded to 12
    significant bits, so ``x - xh`` has at most 12 too) rather than Veltkamp's ``x * 4097``
    split: every partial product is then exact, so the result does not change when the compiler
    contracts a multiply and an add into an FMA, as XLA's GPU backend may (with the Newton step
    below, exact_div on an H100, jax 0.11.2: 0 of 1M quotients wrong; XLA's own: 300,951).
    """
    p = x * y
    xh = jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=11)
    yh = jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=11)
    xl, yl = x - xh, y - yh
    e = ((xh * yh - p) + xh * yl + xl * yh) + xl * yl
    return p, e


def _bits(x: Array) -> Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _float(bits: Array) -> Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def exact_div(a: ArrayLike, b: ArrayLike, _guess: Array | None = None) -> Array:
    """Correctly rounded (IEEE round-to-nearest-even) float32 ``a / b``, ``b`` broadcast to ``a``.

    XLA may rewrite ``a / broadcast(b)`` or a division by a constant into ``a * (1 / b)``, which is
    not correctly rounded (seen on jax 0.10 and, through optimization barriers, on 0.11). So the
    quotient is *verified*: after one Newton step on the exact residual (XLA's GPU division is not
    correctly rounded: ~30% of quotients 1 ulp and some 2 ulp off on an H100), among that
    quotient and its two float32 neighbours we keep the one with the smallest exact residual
    ``|a - q * b|`` (Dekker's exact product, computed on ``b`` scaled to [0.5, 1)), ties to the even
    significand. Exact for finite ``a``, normal ``b`` (XLA flushes subnormals anyway) with
    ``|a / b| < 2**115`` and no subnormal intermediates.

    Written with integer operations on the float bits (scaling, neighbours) rather than
    ``frexp``/``ldexp``/``nextafter``: the same values in that domain (and, unlike ``frexp``-based
    scaling, also for ``|b| >= 2**126``), a third fewer StableHLO ops before ``nextafter``'s own
    expansion; the tiny nvfp4-recipe forward (every linear quantizes) compiled on the dev CPU in 22 s
    instead of 29 s.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape)
    q = a / b if _guess is None else _guess
    bb = _bits(b)
    bs = _float((bb & jnp.int32(-0x7F800001)) | jnp.int32(126 << 23))  # b * 2**-k in [0.5, 1), exactly
    # a * 2**-k with 2**-k = 2**(126 - E) (E: b's biased exponent) as two exact power-of-two factors,
    # so that neither factor is subnormal when |b| >= 2**126
    shift = 126 - ((bb >> 23) & 0xFF)
    half = shift >> 1
    as_ = (a * _float((half + 127) << 23)) * _float((shift - half + 127) << 23)
    # one Newton step on the exact residual first: XLA's GPU quotient can be 2 ulp off
    q0 = q
    ok = jnp.isfinite(q0) & (q0 != 0)
    p, e = _two_prod(q0, bs)
    q = jnp.where(ok, q0 + ((as_ - p) - e) / bs, q0)
    p, e = _two_prod(q, bs)
    best, best_r = q, jnp.abs((as_ - p) - e)
    qb = _bits(q)
    for step in (-1, 1):  # the neighbours in magnitude (q is finite and nonzero where it is used)
        cand = _float(qb + step)
        p, e = _two_prod(cand, bs)
        r = jnp.abs((as_ - p) - e)
        # a NaN residual (a neighbour beyond the finite range) compares false: never taken
        better = (r < best_r) | ((r == best_r) & ((_bits(best) & 1) == 1))
        best, best_r = jnp.where(better, cand, best), jnp.where(better, r, best_r)
    return jnp.where(ok, best, q0)


_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e4m3_to_float(v: Array) -> Array:
    """float32 value of each ``float8_e4m3fn`` element (other dtypes: a plain ``astype``).

    A 256-entry table indexed by the raw byte, not a ``convert``: XLA (``xla_allow_excess_precision``,
    on by default) may drop an ``f32 -> e4m3 -> f32`` convert pair inside one program, which on an
    H100 (jax 0.11.2) silently skipped the E4M3 rounding of NVFP4 block scales (~5% of E2M1 codes
    wrong). A table lookup keeps the rounding.
    """
    v = jnp.asarray(v)
    if v.dtype != jnp.float8_e4m3fn:
        return v.astype(jnp.float32)
    return jnp.asarray(_E4M3_VALUES)[jax.lax.bitcast_convert_type(v, jnp.uint8).astype(jnp.int32)]


def decode_e2m1(codes: UInt8[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    """Value (float32) of each 4-bit code (only the low nibble is read)."""
    return jnp.asarray(E2M1_VALUES)[jnp.asarray(codes).astype(jnp.int32) & 0xF]


def pack_e2m1(codes: UInt8[ArrayLike, "*rows k"]) -> UInt8[Array, "*rows k_half"]:
    """Pack codes pairwise along the last axis: byte = code[2k] | code[2k+1] << 4."""
    codes = jnp.asarray(codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dimension, got shape {codes.shape}")
    codes = codes.astype(jnp.uint8) & 0xF
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: UInt8[ArrayLike, "*rows k_half"] | Int8[ArrayLike, "*rows k_half"]) -> UInt8[Array, "*rows k"]:
    """Inverse of :func:`pack_e2m1` (accepts uint8 or the int8 view of official checkpoints)."""
    packed = jnp.asarray(packed)
    if packed.dtype not in (jnp.uint8, jnp.int8):
        raise TypeError(f"packed E2M1 must be uint8 or int8, got {packed.dtype}")
    packed = packed.view(jnp.uint8) if packed.dtype == jnp.int8 else packed
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])

"""E8M0 scale bytes: an unsigned biased exponent, value ``2 ** (byte - 127)`` (255 is NaN).

Checkpoints store E8M0 scales as raw bytes. They are always reinterpreted as exponents,
never numerically cast (a numeric cast of the byte 0x7F to float8 or uint8 destroys the scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int32, UInt8

E8M0_BIAS = 127
E8M0_NAN = 255


def as_e8m0_bytes(scale: ArrayLike) -> UInt8[Array, "*shape"]:
    """View E8M0 scales as uint8 bytes (from uint8, int8 or float8_e8m0fnu storage) without casting."""
    scale = jnp.asarray(scale)
    if scale.dtype == jnp.uint8:
        return scale
    if scale.dtype in (jnp.int8, jnp.float8_e8m0fnu):
        return scale.view(jnp.uint8)
    raise TypeError(f"E8M0 scales must be stored as uint8, int8 or float8_e8m0fnu bytes, got {scale.dtype}")


def e8m0_exponent(scale: ArrayLike) -> Int32[Array, "*shape"]:
    """Unbiased exponent of each E8M0 byte."""
    return as_e8m0_bytes(scale).astype(jnp.int32) - E8M0_BIAS


def e8m0_to_float(scale: ArrayLike) -> Float[Array, "*shape"]:
    """``2 ** (byte - 127)`` as float32, built from the exponent bits (exact).

    Byte 255 gives NaN. Byte 0 (2**-127) gives 0.0: it is a float32 subnormal, and XLA flushes
    subnormals to zero on CPU and GPU anyway.
    """
    b = as_e8m0_bytes(scale)
    value = jax.lax.bitcast_convert_type(b.astype(jnp.uint32) << 23, jnp.float32)
    return jnp.where(b == E8M0_NAN, jnp.nan, value)


def floor_log2(v: ArrayLike) -> Int32[Array, "*shape"]:
    """Exact ``floor(log2(v))`` of positive finite float32 values (``jnp.log2`` is not exact)."""
    _, e = jnp.frexp(jnp.asarray(v, jnp.float32))
    return e.astype(jnp.int32) - 1


def ceil_log2(v: ArrayLike) -> Int32[Array, "*shape"]:
    """Exact ``ceil(log2(v))`` of positive finite float32 values."""
    m, e = jnp.frexp(jnp.asarray(v, jnp.float32))
    return jnp.where(m == 0.5, e - 1, e).astype(jnp.int32)


def ceil_log2_quotient(a: ArrayLike, top: float) -> Int32[Array, "*shape"]:
    """Exact ``ceil(log2(a / top))`` for positive normal float32 ``a``, a positive normal constant ``top``
    and a normal quotient, without dividing.

    It equals ``ceil_log2`` of the correctly rounded quotient: with ``a = ma * 2**ea`` and
    ``top = mt * 2**et`` (significands in [1, 2)), ``ma / mt`` lies in (0.5, 2) and rounds above 1
    exactly when ``ma > mt`` (both are multiples of 2**-23, so ``ma > mt`` means
    ``ma >= mt + 2**-23 > mt * (1 + 2**-24)``, past the midpoint above 1). So the answer is
    ``ea - et + (ma > mt)``, read off the bits. (A verified division costs ~140 XLA ops; the
    power-of-two scales of the model's quantisation simulations take one per block row.)
    """
    bits = jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.float32), jnp.int32)
    t = int(np.float32(top).view(np.int32))
    if not (np.float32(top) > 0 and np.isfinite(np.float32(top)) and t >> 23 > 0):
        raise ValueError(f"ceil_log2_quotient needs a positive normal float32 divisor, got {top}")
    et, mt = t >> 23, t & 0x7FFFFF
    return ((bits >> 23) - et + ((bits & 0x7FFFFF) > mt).astype(jnp.int32)).astype(jnp.int32)


def pow2(exponent: ArrayLike) -> Float[Array, "*shape"]:
    """``2.0 ** exponent`` exactly, as float32."""
    e = jnp.asarray(exponent, jnp.int32)
    return jnp.ldexp(jnp.ones(e.shape, jnp.float32), e)


def exponent_to_e8m0(exponent: ArrayLike) -> UInt8[Array, "*shape"]:
    """Encode unbiased exponents (must lie in [-127, 127]) as E8M0 bytes."""
    e = jnp.asarray(exponent, jnp.int32)
    return (jnp.clip(e, -E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).astype(jnp.uint8)

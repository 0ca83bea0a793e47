"""E8M0 scale bytes: an unsigned biased exponent, value ``2 ** (byte - 127)`` (255 is NaN).

Checkpoints store E8M0 scales as raw bytes. They are always reinterpreted as exponents,
never numerically cast (a numeric cast of the byte 0x7F to float8 or uint8 destroys the scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def pow2(exponent: ArrayLike) -> Float[Array, "*shape"]:
    """``2.0 ** exponent`` exactly, as float32."""
    e = jnp.asarray(exponent, jnp.int32)
    return jnp.ldexp(jnp.ones(e.shape, jnp.float32), e)


def exponent_to_e8m0(exponent: ArrayLike) -> UInt8[Array, "*shape"]:
    """Encode unbiased exponents (must lie in [-127, 127]) as E8M0 bytes."""
    e = jnp.asarray(exponent, jnp.int32)
    return (jnp.clip(e, -E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).astype(jnp.uint8)

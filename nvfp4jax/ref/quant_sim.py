"""The model's own quantisation simulations (QAT fidelity, spec §3.8) and the Walsh-Hadamard transform.

These are part of the model's definition, present in every precision recipe: FP8 on the
non-rope KV channels (block 64) and FP4 + Hadamard on indexer queries and keys (block 32).
Scales are powers of two rounded *up*.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from nvfp4jax.formats.e2m1 import decode_e2m1, e4m3_to_float, encode_e2m1
from nvfp4jax.formats.e8m0 import ceil_log2_quotient, pow2


def _scale_exponent(amax: Array, floor: float, top: float) -> Array:
    """``ceil(log2(max(amax, floor) / top))``, exactly. Dividing by ``2**e`` is then the exact product
    with ``2**-e`` (``e`` stays within [-126, 126] for these floors and float32 ``amax``)."""
    return ceil_log2_quotient(jnp.maximum(amax, jnp.float32(floor)), top)


def fp8_blocks(x: Float[Array, "*rows dim"], block: int = 64):
    """The FP8 simulation's stored form: per ``block`` channels the E4M3 codes of ``x / s`` (``[*rows,
    dim // block, block]``) and the exponent ``e`` of ``s = 2^e = 2^ceil(log2(max(amax, 1e-4) / 448))``
    (int32, ``[*rows, dim // block, 1]``). The KV cache stores exactly these (``state.KVRows``)."""
    xf = x.astype(jnp.float32)
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    e = _scale_exponent(jnp.max(jnp.abs(b), axis=-1, keepdims=True), 1e-4, 448.0)
    return jnp.clip(b * pow2(-e), -448.0, 448.0).astype(jnp.float8_e4m3fn), e


def fp8_simulate(x: Float[Array, "*rows dim"], block: int = 64) -> Float[Array, "*rows dim"]:
    """Per ``block`` channels: ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``, ``x <- e4m3(x / s) * s``."""
    codes, e = fp8_blocks(x, block)
    return (e4m3_to_float(codes) * pow2(e)).reshape(x.shape).astype(x.dtype)


def fp4_simulate(x: Float[Array, "*rows dim"], block: int = 32) -> Float[Array, "*rows dim"]:
    """Per ``block`` channels: ``s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))``, ``x <- e2m1(x / s) * s``."""
    xf = x.astype(jnp.float32)
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    e = _scale_exponent(jnp.max(jnp.abs(b), axis=-1, keepdims=True), 6.0 * 2.0**-126, 6.0)
    q = decode_e2m1(encode_e2m1(b * pow2(-e)))
    return (q * pow2(e)).reshape(xf.shape).astype(x.dtype)


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester Walsh-Hadamard matrix of order ``n`` (a power of two), entries +-1."""
    if n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(x: Float[Array, "*rows dim"]) -> Float[Array, "*rows dim"]:
    """``x @ H_n / sqrt(n)`` (orthonormal, no random signs), float32 math, result in ``x.dtype``."""
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n) / np.sqrt(n), jnp.float32)
    return jnp.matmul(x.astype(jnp.float32), h, precision="highest").astype(x.dtype)

"""FP8 e4m3 weights with one E8M0 scale per 128x128 block (the official V4 linears).

``W[o, i] = float32(weight[o, i]) * 2 ** (scale_byte[o // 128, i // 128] - 127)``, with
``scale`` of shape ``[ceil(out / 128), ceil(in / 128)]`` (edge blocks may be partial).

Encoding follows the official ``act_quant``/weight recipe: per block
``s = 2 ** ceil(log2(max(amax, 1e-4) / 448))`` (a power of two rounded **up**), then
``weight = e4m3_rne(W / s)``.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Float8e4m3fn, UInt8

from nvfp4jax.formats.e2m1 import e4m3_to_float
from nvfp4jax.formats.e8m0 import (
    as_e8m0_bytes,
    ceil_log2_quotient,
    e8m0_to_float,
    exponent_to_e8m0,
    pow2,
)

FP8_BLOCK = 128
E4M3_MAX = 448.0


class FP8BlockTensor(eqx.Module):
    """FP8 e4m3 values with E8M0 (raw byte) scales per 128x128 block."""

    weight: Float8e4m3fn[Array, "out in"]
    scale: UInt8[Array, "out_blocks in_blocks"]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape


def _expand_blocks(s: Array, shape: tuple[int, int]) -> Array:
    s = jnp.repeat(jnp.repeat(s, FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)
    return s[: shape[0], : shape[1]]


def fp8_block_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))


def decode_fp8_block(weight: ArrayLike, scale: ArrayLike) -> Float[Array, "out in"]:
    """Dequantize to float32; ``scale`` is E8M0 (uint8/int8/float8_e8m0fnu bytes)."""
    w = jnp.asarray(weight)
    if w.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"FP8 block weights must be float8_e4m3fn, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"FP8 block weights must be 2-D, got shape {w.shape}")
    b = as_e8m0_bytes(scale)
    if b.shape != fp8_block_scale_shape(w.shape):
        raise ValueError(
            f"FP8 weight of shape {w.shape} needs scales of shape {fp8_block_scale_shape(w.shape)}, got {b.shape}"
        )
    return e4m3_to_float(w) * _expand_blocks(e8m0_to_float(b), w.shape)


def encode_fp8_block(w: Float[ArrayLike, "out in"]) -> FP8BlockTensor:
    """Quantize a 2-D float tensor to FP8 e4m3 with power-of-two E8M0 block scales."""
    w = jnp.asarray(w).astype(jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"FP8 block encoding takes a 2-D tensor, got shape {w.shape}")
    nb = fp8_block_scale_shape(w.shape)
    padded = jnp.pad(w, ((0, nb[0] * FP8_BLOCK - w.shape[0]), (0, nb[1] * FP8_BLOCK - w.shape[1])))
    amax = jnp.abs(padded.reshape(nb[0], FP8_BLOCK, nb[1], FP8_BLOCK)).max(axis=(1, 3))
    exponent = ceil_log2_quotient(jnp.maximum(amax, jnp.float32(1e-4)), E4M3_MAX)  # in [-22, 120]
    scale = exponent_to_e8m0(exponent)
    inv = _expand_blocks(pow2(-exponent), w.shape)  # w / 2**e is exactly w * 2**-e
    q = jnp.clip(w * inv, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return FP8BlockTensor(q, scale)

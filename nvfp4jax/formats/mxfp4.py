"""MXFP4 (E2M1 pairs + one E8M0 scale per 32 along K) and its exact conversion to NVFP4.

Official V4 routed experts: ``weight`` int8 ``[out, in/2]`` (two E2M1 codes per byte, low nibble
= even element) and ``scale`` E8M0 ``[out, in/32]``: ``W = e2m1 * 2 ** (byte - 127)``.

**MXFP4 -> NVFP4 exactly.** Keep the E2M1 codes, give both 16-halves of a 32-block the scale
``2 ** (e_b - G)`` and set the global scale to ``2 ** G``. E4M3 holds every power of two from
``2 ** -9`` (subnormal) to ``2 ** 8``, so this is exact iff all exponents ``e_b`` of blocks that
hold a non-zero value lie in ``[G - 9, G + 8]``: possible iff ``max e_b - min e_b <= 17``; we
take ``G = max e_b - 8``. Exactness is then *proved* by comparing both dequantizations bitwise.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int8, UInt8

from nvfp4jax.formats.e2m1 import (
    decode_e2m1,
    encode_e2m1,
    exact_div,
    pack_e2m1,
    unpack_e2m1,
)
from nvfp4jax.formats.e8m0 import (
    as_e8m0_bytes,
    e8m0_exponent,
    e8m0_to_float,
    exponent_to_e8m0,
    floor_log2,
)
from nvfp4jax.formats.nvfp4 import NVFP4Tensor, quantize

MX_BLOCK = 32
#: exponents of the powers of two that E4M3 represents exactly
E4M3_POW2_MIN, E4M3_POW2_MAX = -9, 8


class MXFP4Tensor(eqx.Module):
    """MXFP4: packed E2M1 codes (int8 view, as in checkpoints) and E8M0 scale bytes per 32."""

    weight: Int8[Array, "*rows k_half"]
    scale: UInt8[Array, "*rows k_blocks"]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], 2 * self.weight.shape[-1])


def _check(weight: Array, scale: Array) -> None:
    if weight.shape[-1] * 2 != scale.shape[-1] * MX_BLOCK or weight.shape[:-1] != scale.shape[:-1]:
        raise ValueError(
            f"MXFP4 weight {weight.shape} (packed pairs) needs scales of shape "
            f"{(*weight.shape[:-1], weight.shape[-1] * 2 // MX_BLOCK)}, got {scale.shape}"
        )


def decode_mxfp4(weight: ArrayLike, scale: ArrayLike) -> Float[Array, "*rows k"]:
    """Dequantize MXFP4 to float32 (``weight`` int8 or uint8 packed pairs, ``scale`` E8M0 bytes)."""
    w, s = jnp.asarray(weight), as_e8m0_bytes(scale)
    _check(w, s)
    vals = decode_e2m1(unpack_e2m1(w))
    blocks = vals.reshape(*vals.shape[:-1], vals.shape[-1] // MX_BLOCK, MX_BLOCK) * e8m0_to_float(s)[..., None]
    return blocks.reshape(vals.shape)


def encode_mxfp4(x: Float[ArrayLike, "*rows k"]) -> MXFP4Tensor:
    """OCP MX encoding: scale ``2 ** (floor(log2(amax_b)) - 2)`` per 32-block, E2M1 RNE saturating.

    All-zero blocks get the scale byte 127 (1.0).
    """
    x = jnp.asarray(x).astype(jnp.float32)
    if x.shape[-1] % MX_BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {MX_BLOCK}, got shape {x.shape}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    exponent = jnp.where(amax > 0, floor_log2(jnp.where(amax > 0, amax, 1.0)) - 2, 0)
    scale = exponent_to_e8m0(exponent)
    codes = encode_e2m1(exact_div(blocks, e8m0_to_float(scale)[..., None])).reshape(x.shape)
    return MXFP4Tensor(pack_e2m1(codes).view(jnp.int8), scale)


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What :func:`mxfp4_to_nvfp4` did with one tensor."""

    exact: bool
    min_exponent: int | None  # over blocks holding a non-zero value; None if the tensor is all zero
    max_exponent: int | None
    global_exponent: int
    max_abs_error: float  # 0.0 when exact

    def describe(self) -> str:
        span = "all-zero" if self.min_exponent is None else f"block exponents [{self.min_exponent}, {self.max_exponent}]"
        kind = "exact" if self.exact else f"NOT exact (max abs error {self.max_abs_error:.3e})"
        return f"{kind}: {span}, global 2^{self.global_exponent}; E4M3 powers of two span 18 binades"


def mxfp4_to_nvfp4(weight: ArrayLike, scale: ArrayLike, *, strict: bool = True, name: str = "tensor") -> tuple[NVFP4Tensor, ConversionReport]:
    """Convert MXFP4 to NVFP4 (per-tensor global), exactly when the exponents allow.

    Returns the tensor and a :class:`ConversionReport`. When the block exponents of non-zero blocks
    span more than 17 binades the conversion cannot be exact: with ``strict`` this raises
    ``ValueError`` naming ``name`` and the exponent range; otherwise the tensor is re-quantized
    from its dequantized values (nearest NVFP4) and the report says so.
    """
    w, s = jnp.asarray(weight), as_e8m0_bytes(scale)
    _check(w, s)
    codes = unpack_e2m1(w)
    nonzero = jnp.any((codes.reshape(*codes.shape[:-1], codes.shape[-1] // MX_BLOCK, MX_BLOCK) & 0x7) != 0, axis=-1)
    exps = np.asarray(e8m0_exponent(s))[np.asarray(nonzero)]
    if exps.size == 0:
        lo = hi = None
        g_exp = 0
    else:
        lo, hi = int(exps.min()), int(exps.max())
        g_exp = hi - E4M3_POW2_MAX
    reference = decode_mxfp4(w, s)
    fits = lo is None or lo - g_exp >= E4M3_POW2_MIN
    if fits:
        # all-zero blocks may have any exponent: give them scale 0 so nothing can overflow
        e = e8m0_exponent(s) - g_exp
        block_scale = jnp.where(nonzero, jnp.ldexp(jnp.float32(1.0), jnp.clip(e, E4M3_POW2_MIN, E4M3_POW2_MAX)), 0.0)
        scales = jnp.repeat(block_scale, 2, axis=-1).astype(jnp.float8_e4m3fn)
        out = NVFP4Tensor(w.view(jnp.uint8) if w.dtype == jnp.int8 else w, scales, jnp.float32(2.0**g_exp))
        fits = bool(jnp.array_equal(out.dequantize(), reference))  # the proof, bit for bit
    if fits:
        return out, ConversionReport(True, lo, hi, g_exp, 0.0)
    report_exp = (lo, hi)
    if strict:
        raise ValueError(
            f"{name}: MXFP4 -> NVFP4 cannot be exact: block exponents span [{report_exp[0]}, {report_exp[1]}] "
            f"({report_exp[1] - report_exp[0] + 1} binades), E4M3 holds powers of two over 18"
        )
    out = quantize(reference)
    err = float(jnp.max(jnp.abs(out.dequantize() - reference)))
    g = int(np.round(np.log2(float(out.global_scale)))) if float(out.global_scale) > 0 else 0
    return out, ConversionReport(False, lo, hi, g, err)

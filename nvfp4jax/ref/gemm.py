"""Reference NVFP4 quantize (optionally fused with RMSNorm) and NVFP4 GEMM.

These are the CPU path and the oracles of ``kernels/quantize.py`` and ``kernels/gemm.py``
(same names, same signatures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nvfp4jax.formats.nvfp4 import (
    NVFP4Tensor,
    global_scale_from_amax,
    quantize_with_global,
)


def rms_norm(x: Float[Array, "*rows dim"], weight: Float[Array, " dim"] | None, eps: float) -> Float[Array, "*rows dim"]:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, cast back to ``x.dtype`` (spec §2.5)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(eps))
    if weight is not None:
        y = y * jnp.broadcast_to(weight.astype(jnp.float32), y.shape)
    return y.astype(x.dtype)


def quantize_nvfp4(
    x: Float[Array, "rows k"], norm_weight: Float[Array, " k"] | None = None, eps: float = 1e-6
) -> NVFP4Tensor:
    """Per-row NVFP4 quantization of activations (design §3), optionally after RMSNorm.

    With ``norm_weight`` the row is first normalised by :func:`rms_norm` (output in ``x.dtype``,
    usually BF16) and that rounded row is quantized, exactly as an unfused norm followed by
    quantize. No finiteness check (this runs under jit); callers validate inputs earlier.
    """
    if x.ndim != 2:
        raise ValueError(f"quantize_nvfp4 takes [rows, k], got shape {x.shape}")
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    xf = x.astype(jnp.float32)
    return quantize_with_global(xf, global_scale_from_amax(jnp.max(jnp.abs(xf), axis=-1)))


def _dequant_unscaled(t: NVFP4Tensor) -> Array:
    """``e2m1 * e4m3`` in float32 without the global scale (exact: fits BF16 too)."""
    return NVFP4Tensor(t.values, t.scales, jnp.ones((), jnp.float32), t.layout).dequantize()


def nvfp4_linear(x: Float[Array, "m k"], w: NVFP4Tensor, out_dtype=jnp.bfloat16) -> Float[Array, "m n"]:
    """Recipe ``nvfp4``'s linear: ``nvfp4_gemm(quantize_nvfp4(x), w)``, activations quantized per row."""
    return nvfp4_gemm(quantize_nvfp4(x), w, out_dtype)


def nvfp4_gemm(
    x: NVFP4Tensor | Float[Array, "m k"], w: NVFP4Tensor, out_dtype=jnp.bfloat16
) -> Float[Array, "m n"]:
    """``Y = X @ W^T`` with ``W`` NVFP4 ``[n, k]`` and ``X`` NVFP4 (per-row global) or BF16 ``[m, k]``.

    Operands are dequantized exactly (value x block scale) and multiplied with float32
    accumulation; the global scales multiply the float32 accumulator (``acc * gx[m] * gw``)
    before the cast to ``out_dtype``. This is the math of the sm_90a kernel up to summation order.
    """
    if len(w.shape) != 2:
        raise ValueError(f"nvfp4_gemm weight must be 2-D [n, k], got {w.shape}")
    if isinstance(x, NVFP4Tensor):
        xd, gx = _dequant_unscaled(x), x.global_scale
        if gx.shape != (x.shape[0],):
            raise ValueError(f"activation global scale must be per row {(x.shape[0],)}, got {gx.shape}")
    else:
        xd, gx = x.astype(jnp.float32), None
    if xd.ndim != 2 or xd.shape[1] != w.shape[1]:
        raise ValueError(f"nvfp4_gemm: x {xd.shape} and w {w.shape} disagree on k")
    acc = jnp.dot(xd, _dequant_unscaled(w).T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if gx is not None:
        acc = acc * gx[:, None]
    return (acc * w.global_scale).astype(out_dtype)

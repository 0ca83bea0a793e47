"""NVFP4 activation quantize (optionally fused with RMSNorm) as an sm_90a CuTeDSL kernel.

Semantics are those of :func:`nvfp4jax.ref.gemm.quantize_nvfp4` (design §3): per row,
``global = amax / (6 * 448)`` (1 where amax < ``MIN_AMAX``, ~3.2e-35); per 16-element block
``s = e4m3_rne(min(amax_b / 6 / global, 448))``; ``q = e2m1_rne(x / (f32(s) * global))``.

Bitwise contract:

* ``norm_weight=None``: values, scales and global scales are **bit-identical** to design §3
  (verified on an H100 against the NumPy/ml_dtypes oracle, every V4 K, m up to 4096). The global
  and block scales use IEEE ``div.rn.f32`` (checked in the PTX by the compile test) and the hardware
  ``cvt.rn.satfinite.e4m3x2.f32`` (RNE; the input is already clamped to 448); a row with amax below
  ``formats.nvfp4.MIN_AMAX`` gets global scale 1 (all codes 0), as the format says. The values' codes
  are those of ``RN(x / d)`` (``d`` = the block's E4M3 scale x global): per block one ``div.rn`` for
  ``RN(1 / d)``, per value Markstein's fma correction (correctly rounded quotient) and a
  comparison-free E2M1 encoder (:func:`nvfp4jax.kernels._cute.e2m1_code_of_quotient`, ~15 SASS
  instructions per value instead of ~32 with a ``div.rn`` and seven comparisons); blocks whose divisor
  is below 2**-64 (block amax below ~3e-19) take ``div.rn`` per value. Both halves are checked on
  the CPU against ``div.rn`` and the oracle's rounding (``tests/kernels/test_quantize_math.py``: every
  float32 in [0, 16) through the encoder; quotients near every E2M1 midpoint over adversarial
  divisors), the kernel on a GPU on exact ties (``test_quantize_bitwise_adversarial``). The XLA
  reference agrees wherever XLA keeps its divisions exact; on jax 0.11.2 it does not (its global
  scale is 1 ulp off on ~20% of rows), so there the kernel, not the reference, matches the oracle.
* with ``norm_weight``: the normalised row ``bf16(x * rsqrt(mean(x^2) + eps) * w)`` is computed
  in float32 like the reference, but ``rsqrt`` is the hardware ``rsqrt.approx.f32`` (rel. error
  ~2^-22.9) and ``sum(x^2)`` is summed in a different order than XLA. A normalised element
  therefore can differ from the reference by one BF16 ulp when its float32 value sits next to
  a BF16 rounding boundary, and a block containing such an element can quantize differently.
  Everything after the normalised BF16 row is bit-exact. The GPU test bounds the mismatch.

Layout: one CTA per row; each thread owns whole 16-element blocks (strided by the CTA size)
held in registers, so x is read from HBM once. Outputs are written straight from registers.

Decoded output (:func:`quantize_nvfp4_decoded`, the W4A4 recipe's prefill on ``gemm_ws``): the same codes
and scales, written as BF16 ``e2m1 * e4m3 * 2**-DECODE_SHIFT`` by the GEMMs' own decoder
(:func:`nvfp4jax.kernels._cute.dequant_nvfp4_chunk`), i.e. ``gemm_ws.dequant_rows`` of the NVFP4 result,
without writing the packed codes and reading them back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import BFloat16, Float32, Int32, Uint8, Uint32
from cutlass.jax import cutlass_call

from nvfp4jax.formats.nvfp4 import BLOCK, MIN_AMAX, NVFP4Tensor
from nvfp4jax.kernels._cute import (FP4_MAX, FP8_MAX, QUOTIENT_MIN_DIVISOR, cta_reduce, dequant_nvfp4_chunk, e2m1_code,
                                    e2m1_code_of_quotient)

MAX_THREADS = 256


class QuantizeNvfp4Sm90:
    """Per-row NVFP4 quantization of a ``[rows, k]`` BF16 matrix; ``k`` is a compile-time constant.
    ``decoded``: ``mValues`` is BF16 ``[rows, k]`` and receives the decoded values instead of the codes."""

    def __init__(self, k: int, fused_norm: bool, decoded: bool = False):
        self.k = k
        self.fused_norm = fused_norm
        self.decoded = decoded
        self.num_blocks = k // BLOCK
        self.threads = _warps(self.num_blocks) * 32
        self.num_warps = self.threads // 32
        self.blocks_per_thread = math.ceil(self.num_blocks / self.threads)

    @staticmethod
    def can_implement(k: int) -> bool:
        return k > 0 and k % BLOCK == 0

    @cute.jit
    def __call__(self, stream: cuda.CUstream, mX, mW, mEps, mValues, mScales, mGlobal):
        self.kernel(mX, mW, mEps, mValues, mScales, mGlobal).launch(
            grid=[mX.shape[0], 1, 1], block=[self.threads, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW, mEps, mValues: cute.Tensor, mScales: cute.Tensor, mGlobal: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        row, _, _ = cute.arch.block_idx()
        smem = cutlass.utils.SmemAllocator()
        sBuf = smem.allocate_tensor(Float32, cute.make_layout(self.num_warps + 1))

        # [16, blocks] views of this row: block j is column j.
        gX = cute.zipped_divide(mX[row, None], (BLOCK,))
        gV = cute.zipped_divide(mValues[row, None], (BLOCK if self.decoded else BLOCK // 2,))
        bpt = self.blocks_per_thread
        tXrX = cute.make_rmem_tensor((BLOCK, bpt), Float32)
        tXrX.fill(0.0)
        xb = cute.make_rmem_tensor((BLOCK,), BFloat16)
        for i in cutlass.range_constexpr(bpt):
            j = tidx + i * self.threads
            if j < self.num_blocks:
                cute.autovec_copy(gX[None, j], xb)
                tXrX[None, i].store(xb.load().to(Float32))

        if cutlass.const_expr(self.fused_norm):
            gW = cute.zipped_divide(mW, (BLOCK,))
            sumsq = Float32(0.0)
            for i in cutlass.range_constexpr(bpt):
                for e in cutlass.range_constexpr(BLOCK):
                    sumsq = sumsq + tXrX[e, i] * tXrX[e, i]
            sumsq = cta_reduce(sumsq, sBuf, self.num_warps, False)
            rstd = cute.math.rsqrt(sumsq / Float32(self.k) + mEps[0])
            wb = cute.make_rmem_tensor((BLOCK,), BFloat16)
            for i in cutlass.range_constexpr(bpt):
                j = tidx + i * self.threads
                if j < self.num_blocks:
                    cute.autovec_copy(gW[None, j], wb)
                    y = tXrX[None, i].load() * rstd * wb.load().to(Float32)
                    tXrX[None, i].store(y.to(BFloat16).to(Float32))  # the unfused norm's BF16 output

        # block amaxes first (one max per value), the row's amax from them
        amax_b = cute.make_rmem_tensor((bpt,), Float32)
        amax_b.fill(0.0)
        amax = Float32(0.0)
        for i in cutlass.range_constexpr(bpt):
            for e in cutlass.range_constexpr(BLOCK):
                amax_b[i] = cute.arch.fmax(amax_b[i], cute.arch.fmax(tXrX[e, i], -tXrX[e, i]))
            amax = cute.arch.fmax(amax, amax_b[i])
        amax = cta_reduce(amax, sBuf, self.num_warps, True)
        g = Float32(1.0)
        if amax >= Float32(MIN_AMAX):  # below: the global scale would be subnormal, the row counts as zero
            g = amax / Float32(FP4_MAX * FP8_MAX)
        if tidx == 0:
            mGlobal[row] = g

        s8 = cute.make_rmem_tensor((2,), cutlass.Float8E4M3FN)
        sf = cute.make_rmem_tensor((2,), Float32)
        packed = cute.make_rmem_tensor((BLOCK // 2,), Uint8)
        decoded = cute.make_rmem_tensor((BLOCK,), BFloat16)
        for i in cutlass.range_constexpr(bpt):
            j = tidx + i * self.threads
            if j < self.num_blocks:
                s = cute.arch.fmin((amax_b[i] / Float32(FP4_MAX)) / g, Float32(FP8_MAX))
                sf[0] = s
                sf[1] = s
                s8.store(sf.load().to(cutlass.Float8E4M3FN))
                denom = s8.load().to(Float32)[0] * g
                if denom >= Float32(QUOTIENT_MIN_DIVISOR):  # every block with amax >= ~3e-19
                    inv = Float32(1.0) / denom  # div.rn once per block; values: Markstein-corrected products
                    for p in cutlass.range_constexpr(BLOCK // 2):
                        c0 = e2m1_code_of_quotient(tXrX[2 * p, i], denom, inv)
                        c1 = e2m1_code_of_quotient(tXrX[2 * p + 1, i], denom, inv)
                        packed[p] = Uint8(c0 | (c1 << Uint32(4)))
                else:
                    safe = denom
                    if denom == Float32(0.0):
                        safe = Float32(1.0)
                    for p in cutlass.range_constexpr(BLOCK // 2):
                        c0 = e2m1_code(tXrX[2 * p, i] / safe)
                        c1 = e2m1_code(tXrX[2 * p + 1, i] / safe)
                        byte = c0 | (c1 << 4)
                        if denom == Float32(0.0):
                            byte = Int32(0)
                        packed[p] = Uint8(byte)
                scale_bytes = cute.recast_tensor(s8, Uint8)
                if cutlass.const_expr(self.decoded):
                    dequant_nvfp4_chunk(packed, scale_bytes, decoded)
                    cute.autovec_copy(decoded, gV[None, j])
                else:
                    cute.autovec_copy(packed, gV[None, j])
                mScales[row, j] = scale_bytes[0]


def _warps(num_blocks: int) -> int:
    """Warps per CTA: one block per thread up to ``MAX_THREADS`` threads."""
    return max(1, min(MAX_THREADS // 32, math.ceil(num_blocks / 32)))


def supports(x, norm_weight=None) -> str | None:
    """None when the kernel runs ``quantize_nvfp4(x, norm_weight)``, else why not."""
    if x.ndim != 2:
        return f"the quantize kernel takes [rows, k], got shape {x.shape}"
    if x.dtype != jnp.bfloat16:
        return f"the quantize kernel takes bfloat16 x, got {x.dtype}"
    if not QuantizeNvfp4Sm90.can_implement(x.shape[1]):
        return f"k must be a positive multiple of {BLOCK}, got shape {x.shape}"
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or norm_weight.dtype != jnp.bfloat16):
        return f"norm_weight must be bfloat16 [{x.shape[1]}], got {norm_weight.dtype} {norm_weight.shape}"
    return None


@functools.cache
def _kernel(k: int, fused_norm: bool, decoded: bool = False) -> QuantizeNvfp4Sm90:
    return QuantizeNvfp4Sm90(k, fused_norm, decoded)


def _quantize_call(x, norm_weight, eps: float, decoded: bool):
    """The kernel's (values, scale bytes, global scales): values uint8 codes ``[rows, k/2]``, or with
    ``decoded`` BF16 ``[rows, k]``; checked first (``ValueError`` naming the wrapper)."""
    reason = supports(x, norm_weight)
    if reason is not None:
        name = "quantize_nvfp4_decoded" if decoded else "quantize_nvfp4"
        raise ValueError(f"{name} kernel: {reason}")
    rows, k = x.shape
    values = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16) if decoded else jax.ShapeDtypeStruct((rows, k // 2), jnp.uint8)
    outs = (values, jax.ShapeDtypeStruct((rows, k // BLOCK), jnp.uint8), jax.ShapeDtypeStruct((rows,), jnp.float32))
    if rows == 0:
        return tuple(jnp.zeros(o.shape, o.dtype) for o in outs)
    fused = norm_weight is not None
    eps_arr = jnp.full((1,), eps, jnp.float32) if fused else None
    return cutlass_call(_kernel(k, fused, decoded), output_shape_dtype=outs)(x, norm_weight, eps_arr)


def quantize_nvfp4(
    x: Float[Array, "rows k"], norm_weight: Float[Array, " k"] | None = None, eps: float = 1e-6
) -> NVFP4Tensor:
    """Per-row NVFP4 quantization of BF16 activations, optionally after RMSNorm (sm_90a kernel).

    Same signature and semantics as :func:`nvfp4jax.ref.gemm.quantize_nvfp4`; see the module
    docstring for what is bit-identical. ``x``: BF16 ``[rows, k]`` with ``k % 16 == 0``;
    ``norm_weight``: BF16 ``[k]``. Returns values uint8 ``[rows, k/2]``, scales e4m3
    ``[rows, k/16]`` and float32 global scales ``[rows]``.
    """
    values, scales, gscale = _quantize_call(x, norm_weight, eps, False)
    return NVFP4Tensor(values, jax.lax.bitcast_convert_type(scales, jnp.float8_e4m3fn), gscale)


def quantize_nvfp4_decoded(
    x: Float[Array, "rows k"], norm_weight: Float[Array, " k"] | None = None, eps: float = 1e-6
) -> tuple[Float[Array, "rows k"], Float[Array, "rows k/16"], Float[Array, " rows"]]:
    """:func:`quantize_nvfp4` with the values written decoded: ``(xd, scales, global_scale)`` where ``xd``
    is BF16 ``[rows, k]`` equal bit for bit to ``gemm_ws.dequant_rows`` of the NVFP4 result (``e2m1 *
    e4m3 * 2**-DECODE_SHIFT``; ``xd * 2**DECODE_SHIFT * global_scale[:, None]`` are the NVFP4 numbers),
    ``scales`` the E4M3 block scales and ``global_scale`` float32 ``[rows]``, as :func:`quantize_nvfp4`
    gives them. For the W4A4 recipe's prefill on the warp-specialized GEMM, which reads X as BF16: one
    pass writing 2 bytes per value instead of a quantize writing 0.5625 and a ``dequant_rows`` reading
    those and writing 2."""
    xd, scales, gscale = _quantize_call(x, norm_weight, eps, True)
    return xd, jax.lax.bitcast_convert_type(scales, jnp.float8_e4m3fn), gscale

"""Device helpers shared by the CuTeDSL kernels (device code only, never ops).

Everything here is ``@cute.jit`` code called from inside a ``@cute.kernel``:

* warp / CTA reductions (butterfly shuffles, one shared-memory slot per warp);
* the exact E2M1 encoder of design §3 (ties to even, saturating, sign from the sign bit);
* the exact E2M1 x E4M3 -> BF16 decoder used by the GEMM (no tables: bit moves and one
  hardware FP8 conversion).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32

WARP = 32
FP4_MAX = 6.0
FP8_MAX = 448.0


@cute.jit
def warp_reduce_max(val: Float32) -> Float32:
    for i in cutlass.range_constexpr(5):
        val = cute.arch.fmax(val, cute.arch.shuffle_sync_bfly(val, offset=1 << i))
    return val


@cute.jit
def warp_reduce_sum(val: Float32) -> Float32:
    for i in cutlass.range_constexpr(5):
        val = val + cute.arch.shuffle_sync_bfly(val, offset=1 << i)
    return val


@cute.jit
def cta_reduce(val: Float32, sBuf: cute.Tensor, num_warps: cutlass.Constexpr, is_max: cutlass.Constexpr) -> Float32:
    """Reduce ``val`` over the CTA; every thread gets the result. ``sBuf`` holds ``num_warps + 1`` floats.

    The partials are combined in warp order by one warp, so the result is deterministic.
    """
    val = warp_reduce_max(val) if cutlass.const_expr(is_max) else warp_reduce_sum(val)
    if cutlass.const_expr(num_warps > 1):
        warp = cute.arch.warp_idx()
        lane = cute.arch.lane_idx()
        if lane == 0:
            sBuf[warp] = val
        cute.arch.sync_threads()
        if warp == 0:
            part = Float32(0.0)
            if lane < num_warps:
                part = sBuf[lane]
            part = warp_reduce_max(part) if cutlass.const_expr(is_max) else warp_reduce_sum(part)
            if lane == 0:
                sBuf[num_warps] = part
        cute.arch.sync_threads()
        val = sBuf[num_warps]
        cute.arch.sync_threads()  # sBuf may be reused by the next reduction
    return val


@cute.jit
def e2m1_code(q: Float32) -> Int32:
    """E2M1 code of ``q`` (round to nearest, ties to even, saturating at +-6).

    Midpoints between the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 are .25, .75, 1.25, 1.75, 2.5,
    3.5, 5; a tie goes to the even code, so the comparison is ``>=`` where the upper code is
    even and ``>`` otherwise. The sign bit (bit 3) is copied from ``q``'s IEEE sign bit, so
    -0.0 gives code 8, as :func:`nvfp4jax.formats.e2m1.encode_e2m1` does.
    """
    m = cute.arch.fmax(q, -q)  # |q| (q is never NaN here)
    code = Int32(0)
    code = code + Int32(m > Float32(0.25))
    code = code + Int32(m >= Float32(0.75))
    code = code + Int32(m > Float32(1.25))
    code = code + Int32(m >= Float32(1.75))
    code = code + Int32(m > Float32(2.5))
    code = code + Int32(m >= Float32(3.5))
    code = code + Int32(m > Float32(5.0))
    sign = Int32((q.bitcast(Uint32) >> Uint32(31)) << Uint32(3))
    return code | sign


@cute.jit
def e2m1x4_to_e4m3x4(packed: Uint32) -> tuple:
    """Four packed E2M1 codes per 16 bits -> E4M3 bytes of ``value * 2**-6``, exactly.

    An E2M1 code ``s e1 e0 m`` placed into an E4M3 byte as ``s 0 0 e1 e0 m 0 0`` is the E2M1
    value times 2**-6 (E4M3's bias 7 vs E2M1's bias 1; the E2M1 subnormal 0.5 lands on the
    E4M3 subnormal 2**-7). ``packed`` holds 8 codes (4 bytes, low nibble = even element);
    returns two words whose bytes are the E4M3 images of elements (0, 2, 4, 6) and (1, 3, 5, 7).
    """
    lo = packed & Uint32(0x0F0F0F0F)
    hi = (packed >> Uint32(4)) & Uint32(0x0F0F0F0F)
    lo = ((lo & Uint32(0x07070707)) << Uint32(2)) | ((lo & Uint32(0x08080808)) << Uint32(4))
    hi = ((hi & Uint32(0x07070707)) << Uint32(2)) | ((hi & Uint32(0x08080808)) << Uint32(4))
    return lo, hi


@cute.jit
def dequant_nvfp4_chunk(tPrP: cute.Tensor, tPrS: cute.Tensor, tPrD: cute.Tensor):
    """Exact NVFP4 -> BF16 decode of one chunk held in registers: ``e2m1 * e4m3`` (no global scale).

    ``tPrP``: uint8 ``[kc/2]`` packed codes; ``tPrS``: uint8 ``[kc/16]`` E4M3 scale bytes;
    ``tPrD``: BF16 ``[kc]`` destination in natural K order. The product has at most 6
    significant bits and lies in [2^-10, 2688], so the float32 multiply and the BF16 cast are
    exact. Cost per 8 values: ~10 integer ops, 4 ``cvt.f16x2.e4m3x2``, 8 ``cvt.f32.f16``,
    8 ``mul`` and 4 ``cvt.bf16x2.f32``.
    """
    kc = cute.size(tPrD)
    words = cute.recast_tensor(tPrP, Uint32)
    scales = cute.recast_tensor(tPrS, cutlass.Float8E4M3FN).load().to(Float32)
    e4m3 = cute.make_rmem_tensor((2,), Uint32)
    vals = cute.make_rmem_tensor((8,), Float32)
    for w in cutlass.range_constexpr(kc // 8):
        lo, hi = e2m1x4_to_e4m3x4(words[w])
        e4m3[0] = lo
        e4m3[1] = hi
        # elements in the order 0, 2, 4, 6, 1, 3, 5, 7; times 2^6 undoes the E4M3 bias shift
        f = cute.recast_tensor(e4m3, cutlass.Float8E4M3FN).load().to(Float32) * (scales[w // 2] * Float32(64.0))
        for j in cutlass.range_constexpr(4):
            vals[2 * j] = f[j]
            vals[2 * j + 1] = f[4 + j]
        out = vals.load().to(cutlass.BFloat16)
        for j in cutlass.range_constexpr(8):
            tPrD[w * 8 + j] = out[j]

"""Device helpers shared by the CuTeDSL kernels (device code only, never ops).

Everything here is ``@cute.jit`` code called from inside a ``@cute.kernel``:

* warp / CTA reductions (butterfly shuffles, one shared-memory slot per warp);
* the exact E2M1 encoder of design §3 (ties to even, saturating, sign from the sign bit);
* the exact E2M1 x E4M3 -> BF16 decoder used by the GEMM (no tables, no conversion
  instructions: bit moves and BF16x2 multiplies, in inline PTX).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

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


#: ``e2m1_code_of_quotient``'s fast path needs the block divisor at least this large (then
#: ``1 / d`` is a normal float and, wherever the quotient is near an E2M1 rounding midpoint, so are
#: the quotient and the exact remainder of the correction step); smaller divisors take ``div.rn``.
QUOTIENT_MIN_DIVISOR = 2.0**-64
#: float32 bits of 1.5 * 2**22: adding it rounds a value in [0, 2**21) to a multiple of 0.5 (its ulp)
_ROUND_HALF_BITS = 0x4AC00000


@dsl_user_op
def e2m1_code_of_quotient(x: Float32, d: Float32, y: Float32, *, loc=None, ip=None) -> Uint32:
    """E2M1 code (sign bit 3) of ``RN(x / d)``, exactly as :func:`e2m1_code` of ``x / d`` with ``div.rn``,
    for ``d >= QUOTIENT_MIN_DIVISOR`` and ``y = RN(1 / d)`` (one ``div.rn`` per block, not per value).

    Quotient (Markstein's correction): ``q0 = RN(|x| y)`` is within one ulp of ``|x| / d``; the
    remainder ``r = |x| - q0 d`` is then exact in one ``fma``, and ``RN(q0 + r y)`` is the correctly
    rounded quotient (Markstein 1990; Muller et al., Handbook of Floating-Point Arithmetic, the
    theorem on fma-based division correction). Only quotients near the E2M1 midpoints
    (0.25 .. 5) need to be exact, and there everything is normal for ``d >= 2**-64``; a tiny quotient
    only has to stay below 0.25, which any 1-ulp result does.

    Code (no comparisons): with ``step`` = the E2M1 spacing of the quotient's binade (0.5 below 2,
    1 in [2, 4), 2 from 4: region ``g = clamp(exponent, 0, 2)``), adding ``C = 1.5 * 2**(22 + g)``
    (whose ulp is ``step``) rounds ``q`` to a multiple of ``step`` with ties to the even multiple,
    which is E2M1's round-to-nearest-even; ``bits(q + C) - bits(C)`` counts the steps, and the code
    is that count ``+ 2g``, saturated at 7 (= 6.0). ``tests/kernels/test_quantize_math.py`` emulates
    both halves on the CPU: the encoder against the oracle's E2M1 rounding on every float32 in
    [0, 16), the quotient against ``div.rn`` near every midpoint over adversarial divisors. 17 PTX
    instructions (~15 SASS); the comparison encoder after a ``div.rn`` was ~32 SASS instructions.
    """
    return _asm_u32(
        [x.bitcast(Uint32, loc=loc, ip=ip), d.bitcast(Uint32, loc=loc, ip=ip), y.bitcast(Uint32, loc=loc, ip=ip)],
        "{\n\t.reg .b32 ax, q0, r, q, e, g, c, k, s, sg;\n\t"
        "and.b32 ax, $1, 0x7FFFFFFF;\n\t"
        "mul.rn.f32 q0, ax, $3;\n\t"
        "neg.f32 r, q0;\n\t"
        "fma.rn.f32 r, r, $2, ax;\n\t"
        "fma.rn.f32 q, r, $3, q0;\n\t"
        "and.b32 q, q, 0x7FFFFFFF;\n\t"  # a tiny quotient of the wrong sign (never near a midpoint)
        "shr.u32 e, q, 23;\n\t"
        "sub.s32 e, e, 127;\n\t"
        "max.s32 e, e, 0;\n\t"
        "min.s32 g, e, 2;\n\t"
        f"mad.lo.u32 c, g, 0x800000, {_ROUND_HALF_BITS:#x};\n\t"
        "add.rn.f32 s, q, c;\n\t"
        f"mad.lo.u32 k, g, 0x7FFFFE, {_ROUND_HALF_BITS:#x};\n\t"  # bits(C) - 2g
        "sub.u32 s, s, k;\n\t"
        "min.u32 s, s, 7;\n\t"
        "shr.u32 sg, $1, 28;\n\t"
        "and.b32 sg, sg, 8;\n\t"
        "or.b32 $0, s, sg;\n\t}",
        loc, ip)


#: The decoded operands are ``e2m1 * e4m3 * 2**-DECODE_SHIFT`` (exact in BF16); the GEMM epilogue
#: multiplies by ``2**DECODE_SHIFT`` per NVFP4 operand (a power of two: exact in float32).
DECODE_SHIFT = 8
_BF16X2_2_119 = 0x7B007B00  # BF16 2**119 in both halves
PAIR_SPREAD = 0x1040  # p * 0x1040 == (p << 6) | (p << 12) for p with bits only in 0..3 and 16..19
PAIR_MASK = 0x81C081C0  # sign bits 15/31, exponent-low + mantissa-top bits 6..8 / 22..24


def pair_selector(byte: int) -> int:
    """``prmt`` selector: out byte 0 = lo byte ``byte``, 2 = hi byte ``byte``, 1 and 3 = 0 (sign
    replication of a ``lo`` byte, whose top bit is 0)."""
    return (8 | byte) << 12 | (4 + byte) << 8 | (8 | byte) << 4 | byte


def _asm_u32(args, ptx: str, loc=None, ip=None) -> Uint32:
    """One inline-PTX block with a single .b32 result ``$0`` and .b32 operands ``$1..``; pure."""
    return Uint32(llvm.inline_asm(
        T.i32(), [Uint32(a).ir_value(loc=loc, ip=ip) for a in args], ptx, "=r" + ",r" * len(args),
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def e4m3_scale_bf16x2(scale_byte: Uint32, *, loc=None, ip=None) -> Uint32:
    """An E4M3 scale byte ``s`` -> BF16x2 ``(s * 2**118, s * 2**118)``, exactly, with no conversions.

    The byte ``S EEEE MMM`` placed into BF16 as ``S 000 EEEE MMM 0000`` is ``s * 2**-120`` (biases 7
    vs 127; an E4M3 subnormal lands on a BF16 subnormal with the same ratio); two exact multiplies
    by ``2**119`` give ``s * 2**118`` (<= 448 * 2**118 < BF16 max; >= 2**-9 * 2**118, normal).
    """
    return _asm_u32(
        [scale_byte],
        "{\n\t.reg .b32 t, u, c;\n\t"
        f"mov.b32 c, {_BF16X2_2_119:#x};\n\t"
        "mul.lo.u32 t, $1, 0x10001;\n\t"  # the byte (zero-extended) into bytes 0 and 2
        "and.b32 u, t, 0x00800080;\n\t"
        "and.b32 t, t, 0x007F007F;\n\t"
        "shl.b32 t, t, 4;\n\t"
        "shl.b32 u, u, 8;\n\t"
        "or.b32 t, t, u;\n\t"
        "mul.rn.bf16x2 t, t, c;\n\t"
        "mul.rn.bf16x2 $0, t, c;\n\t}",
        loc, ip)


@dsl_user_op
def e2m1_pair_bf16x2(lo: Uint32, hi: Uint32, byte: cutlass.Constexpr, scale: Uint32, *, loc=None, ip=None) -> Uint32:
    """Elements ``2*byte`` and ``2*byte + 1`` of a packed word as BF16x2 ``e2m1 * s * 2**-8``, exactly.

    ``lo`` / ``hi``: the word's low / high nibbles (``& 0x0F0F0F0F``, ``>> 4 & 0x0F0F0F0F``), ``scale``:
    :func:`e4m3_scale_bf16x2` of the block. ``prmt`` puts code ``2*byte`` in bits 0..3 and code
    ``2*byte + 1`` in bits 16..19 (the other bytes 0: replicated sign bits of ``lo`` bytes, which are
    0). An E2M1 code ``s e1 e0 m`` moved to BF16 bits ``s 0000000 e1 e0 m 000000`` is ``e2m1 * 2**-126``
    (biases 1 vs 127; the E2M1 subnormal 0.5 lands on the BF16 subnormal 2**-127): one multiply
    ``* 0x1040`` (= ``(p << 6) | (p << 12)``, no overlapping bits) and one mask do both halves. The
    BF16 product with ``s * 2**118`` is ``e2m1 * s * 2**-8``: at most 6 significant bits, in
    [2**-18, 10.5], so exact. 3 integer ops + 1 ``mul.bf16x2`` per pair; no conversion instructions.
    """
    return _asm_u32(
        [lo, hi, scale],
        "{\n\t.reg .b32 p;\n\t"
        f"prmt.b32 p, $1, $2, {pair_selector(byte):#x};\n\t"
        f"mul.lo.u32 p, p, {PAIR_SPREAD:#x};\n\t"
        f"and.b32 p, p, {PAIR_MASK:#x};\n\t"
        "mul.rn.bf16x2 $0, p, $3;\n\t}",
        loc, ip)


@cute.jit
def dequant_nvfp4_chunk(tPrP: cute.Tensor, tPrS: cute.Tensor, tPrD: cute.Tensor):
    """Exact NVFP4 -> BF16 decode of one chunk held in registers: ``e2m1 * e4m3 * 2**-DECODE_SHIFT``.

    ``tPrP``: uint8 ``[kc/2]`` packed codes; ``tPrS``: uint8 ``[kc/16]`` E4M3 scale bytes;
    ``tPrD``: BF16 ``[kc]`` destination in natural K order (the caller's epilogue multiplies by
    ``2**DECODE_SHIFT``). Bit moves and BF16x2 multiplies only (:func:`e2m1_pair_bf16x2`): per 8
    values 15 integer ops and 4 ``mul.bf16x2``, plus 6 + 2 per 16-value block for the scale. The
    previous decoder spent 2 conversions per value (``cvt.f16x2.e4m3x2``, ``cvt.f32.f16``,
    ``cvt.bf16x2.f32``; 16 per clock per SM on sm_90); on an H100 removing them made prefill GEMMs
    6-7% faster and left decode unchanged (decode waits on memory). ``kc`` must be a multiple of 16
    (whole scale blocks; ``GemmNvfp4Sm90.can_implement`` keeps NVFP4 chunks >= 16).
    """
    kc = cute.size(tPrD)
    if cutlass.const_expr(kc % 16 != 0):
        raise ValueError(f"dequant_nvfp4_chunk decodes whole 16-value blocks, got a chunk of {kc}")
    words = cute.recast_tensor(tPrP, Uint32)
    out = cute.recast_tensor(tPrD, Uint32)
    for b in cutlass.range_constexpr(kc // 16):
        scale = e4m3_scale_bf16x2(Uint32(tPrS[b]))
        for h in cutlass.range_constexpr(2):
            w = words[2 * b + h]
            lo = w & Uint32(0x0F0F0F0F)
            hi = (w >> Uint32(4)) & Uint32(0x0F0F0F0F)
            for j in cutlass.range_constexpr(4):
                out[(2 * b + h) * 4 + j] = e2m1_pair_bf16x2(lo, hi, j, scale)

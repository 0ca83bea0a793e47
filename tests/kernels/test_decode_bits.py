"""CPU check of the GEMM's NVFP4 -> BF16 decoder arithmetic (``kernels._cute``), exhaustively.

The decoder is inline PTX (``prmt``, ``mul.lo``, ``and``, ``mul.rn.bf16x2``); here each instruction
is modelled in NumPy with the module's own constants, for every E2M1 code pair of a byte and every
E4M3 scale byte, and the result must equal ``e2m1 * e4m3 * 2**-DECODE_SHIFT`` bit for bit. The GPU
GEMM tests check the hardware does what the model says (e.g. that BF16 subnormal inputs of
``mul.bf16x2`` are not flushed).
"""

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("cutlass")
from nvfp4jax.formats.e2m1 import E2M1_VALUES  # noqa: E402
from nvfp4jax.kernels import _cute  # noqa: E402


def prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    """PTX ``prmt.b32`` default mode: byte i = source byte ``sel`` nibble i (0-3: a, 4-7: b); nibble
    bit 3 set: that byte's sign bit replicated."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = np.where(byte & 0x80, 0xFF, 0).astype(a.dtype)
        out |= byte << (8 * i)
    return out


def bf16_halves(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    as_bf16 = lambda h: (h.astype(np.uint16)).view(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    return as_bf16(v & 0xFFFF), as_bf16(v >> 16)


def mul_bf16x2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact products (the decoder's are), checked representable, repacked as BF16x2 bits."""
    out = np.zeros_like(a)
    for half, (x, y) in enumerate(zip(bf16_halves(a), bf16_halves(b))):
        p = x * y
        q = p.astype(ml_dtypes.bfloat16)
        assert np.array_equal(q.astype(np.float64), p), "a decoder product is not exact in BF16"
        out |= q.view(np.uint16).astype(np.uint32) << (16 * half)
    return out


def test_decoder_model_is_exact_for_every_code_pair_and_scale():
    scale_bytes = np.arange(256, dtype=np.uint32)
    scale_vals = scale_bytes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    keep = np.isfinite(scale_vals)  # 0x7F / 0xFF are NaN: never written by the quantizer
    scale_bytes, scale_vals = scale_bytes[keep], scale_vals[keep]
    # e4m3_scale_bf16x2: mul.lo 0x10001; sign/magnitude bits moved; two multiplies by 2**119
    t = scale_bytes * 0x10001
    t = ((t & 0x007F007F) << 4) | ((t & 0x00800080) << 8)
    c = np.full_like(t, _cute._BF16X2_2_119)
    scale = mul_bf16x2(mul_bf16x2(t, c), c)
    lo_s, hi_s = bf16_halves(scale)
    assert np.array_equal(lo_s, scale_vals * 2.0**118) and np.array_equal(hi_s, lo_s)

    codes = np.arange(256, dtype=np.uint32)  # one byte: element 2j (low nibble), 2j+1 (high nibble)
    for byte in range(4):
        word = codes << (8 * byte)  # the byte at position ``byte`` of a word, other bytes 0
        noise = np.uint32(0xA5) * ((np.arange(256, dtype=np.uint32) % 3) + 1)
        word |= (noise << (8 * ((byte + 1) % 4))) & ~np.uint32(0xFF << (8 * byte))  # other bytes busy
        lo, hi = word & 0x0F0F0F0F, (word >> 4) & 0x0F0F0F0F
        p = prmt(lo, hi, _cute.pair_selector(byte))
        p = (p * _cute.PAIR_SPREAD) & _cute.PAIR_MASK
        for s_bits, s_val in zip(scale[:: 7], scale_vals[:: 7]):
            out = mul_bf16x2(p, np.full_like(p, s_bits))
            even, odd = bf16_halves(out)
            want_even = E2M1_VALUES[codes & 0xF].astype(np.float64) * s_val * 2.0**-_cute.DECODE_SHIFT
            want_odd = E2M1_VALUES[codes >> 4].astype(np.float64) * s_val * 2.0**-_cute.DECODE_SHIFT
            np.testing.assert_array_equal(even, want_even)
            np.testing.assert_array_equal(odd, want_odd)
            # signed zeros too (code 8 is -0; scale bytes >= 0x80 are negative)
            np.testing.assert_array_equal(np.signbit(even), np.signbit(want_even))
            np.testing.assert_array_equal(np.signbit(odd), np.signbit(want_odd))

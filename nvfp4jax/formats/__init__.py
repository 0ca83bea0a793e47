"""Exact number formats: NVFP4, MXFP4, FP8 e4m3 with E8M0 block scales, and conversions.

All functions are vectorised ``jax.numpy`` and accept NumPy arrays (checkpoint loading).
"""

from nvfp4jax.formats.e2m1 import (
    E2M1_VALUES,
    decode_e2m1,
    encode_e2m1,
    pack_e2m1,
    unpack_e2m1,
)
from nvfp4jax.formats.e8m0 import (
    as_e8m0_bytes,
    e8m0_exponent,
    e8m0_to_float,
    exponent_to_e8m0,
)
from nvfp4jax.formats.fp8 import FP8BlockTensor, decode_fp8_block, encode_fp8_block
from nvfp4jax.formats.mxfp4 import (
    ConversionReport,
    MXFP4Tensor,
    decode_mxfp4,
    encode_mxfp4,
    mxfp4_to_nvfp4,
)
from nvfp4jax.formats.nvfp4 import (
    NVFP4Tensor,
    dequantize,
    quantize,
    quantize_dequantize,
    quantize_with_global,
    swizzle_scales,
    unswizzle_scales,
)

__all__ = [
    "E2M1_VALUES", "ConversionReport", "FP8BlockTensor", "MXFP4Tensor", "NVFP4Tensor",
    "as_e8m0_bytes", "decode_e2m1", "decode_fp8_block", "decode_mxfp4", "dequantize", "e8m0_exponent",
    "e8m0_to_float", "encode_e2m1", "encode_fp8_block", "encode_mxfp4", "exponent_to_e8m0",
    "mxfp4_to_nvfp4", "pack_e2m1", "quantize", "quantize_dequantize", "quantize_with_global",
    "swizzle_scales", "unpack_e2m1",
]

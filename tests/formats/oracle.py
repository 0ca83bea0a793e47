"""An independent NVFP4 oracle in NumPy, built on ml_dtypes' float4_e2m1fn / float8_e4m3fn casts."""

import ml_dtypes
import numpy as np


def nvfp4_oracle(x: np.ndarray, per_row: bool):
    """Return (codes uint8 [..., K], scales e4m3 [..., K/16], global f32) per design §3."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1) if per_row else np.abs(x).max()
    # documented exception: amax below 2688 * 2**-126 (a subnormal global scale) counts as zero
    g = np.where(amax >= np.float32(6 * 448 * 2.0**-126), amax / np.float32(6 * 448), np.float32(1)).astype(np.float32)
    gb = g[..., None, None] if per_row else g
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    amax_b = np.abs(blocks).max(axis=-1, keepdims=True)
    s = (amax_b / np.float32(6) / gb).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    denom = (s.astype(np.float32) * gb).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (blocks / np.where(denom > 0, denom, np.float32(1))).astype(np.float32)
    codes = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    codes = np.where(denom > 0, codes, 0).astype(np.uint8)
    return codes.reshape(x.shape), s[..., 0], np.asarray(g, np.float32)

"""NVFP4: E2M1 values, one E4M3 scale per 16 elements along K, and an FP32 global scale.

A tensor ``W[..., K]`` (K the reduction dim, contiguous) is stored as

* ``values``  uint8 ``[..., K/2]``: packed E2M1 codes, low nibble = even element;
* ``scales``  float8_e4m3fn ``[..., K/16]``: block scales in logical row-major order;
* ``global_scale`` float32: ``[]`` for a per-tensor scale (weights), ``[rows...]`` with one per
  row (activations: ``values.shape[:-1]``), or ``[stack...]`` for a stack of per-tensor-scaled
  matrices (stacked experts: ``values.shape[:-2]``) — the global scale broadcasts over trailing axes,

and means ``W = e2m1(values) * float32(scales) * global_scale``.

Quantization (design §3), all in float32:

    global = amax(|x|) / (6 * 448)                       (1.0 where amax < 2688 * 2**-126, i.e. 0)
    s_b    = e4m3_rne(amax_b / 6 / global)               per 16-element block b
    q      = e2m1_rne(x / (float32(s_b) * global))       ties to even, saturating at +-6
    a block whose s_b is 0 (all zero, or underflowed) is stored as zeros.

The sm_100 block-scaled MMA reads scales in 128x4 atoms; :func:`swizzle_scales` produces that
layout (padding with zeros) and :func:`unswizzle_scales` inverts it.

Kernel tile layout (``layout="tiled"``, made by :func:`tile_weight`, undone by :func:`untile_weight`):
the sm_90a GEMM kernels read a weight in tiles of ``TILE_ROWS`` (64) rows x ``TILE_K`` (128) K,
and a tile's bytes are contiguous: ``values [..., n/64, k/128, 64, 64]`` and ``scales [..., n/64,
k/128, 64, 8]`` with ``values_t[..., i, j, r, b] = values[..., 64 i + r, 64 j + b]`` (same for the
scales with 8 bytes per tile row); the global scale is unchanged. Same bytes, another order: in the
row-major layout a K tile is 64 pieces of 64 B (codes) and 8 B (scales) 512+ bytes apart
(``benchmarks/hbm_patterns.py``, H200: a load-only kernel with the GEMM's grid reads Flash ``wq_b``
in 16.6 us row-major, 10.7 us tiled, 9.2 us for a plain stream of the codes alone; the GEMM itself,
bounded elsewhere, went from 16.1 to 15.9 us), and the layout is the place for any in-tile order a
kernel wants. Leading (stack / expert) axes are kept, so a tiled stack still slices and shards
along them, and along whole tiles of n and k.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Float8e4m3fn, UInt8

from nvfp4jax.formats.e2m1 import (
    E2M1_MAX,
    decode_e2m1,
    e4m3_to_float,
    encode_e2m1,
    exact_div,
    pack_e2m1,
    unpack_e2m1,
)

BLOCK = 16
E4M3_MAX = 448.0
TILE_ROWS, TILE_K = 64, 128  # the kernel tile layout (module docstring)
LAYOUTS = ("rows", "tiled")


class NVFP4Tensor(eqx.Module):
    """An NVFP4 tensor (a pytree: stacks and slices like any other array container).

    The logical shape is ``values.shape[:-1] + (2 * values.shape[-1],)``; it is derived, so a stack
    of tensors (layers scanned over) keeps a consistent shape.
    """

    values: UInt8[Array, "*rows k_half"]
    scales: Float8e4m3fn[Array, "*rows k_blocks"]
    global_scale: Float[Array, "*global_rows"]
    #: ``rows`` (row-major, as above) or ``tiled`` (the kernel tile layout, module docstring)
    layout: str = eqx.field(default="rows", static=True)

    @property
    def shape(self) -> tuple[int, ...]:
        v = self.values.shape
        if self.layout == "tiled":
            return (*v[:-4], v[-4] * TILE_ROWS, v[-3] * TILE_K)
        return (*v[:-1], 2 * v[-1])

    @property
    def per_row(self) -> bool:
        """True when the global scale is one per row (activations) rather than per tensor."""
        return self.layout == "rows" and self.global_scale.ndim == self.values.ndim - 1 and self.global_scale.ndim > 0

    def dequantize(self, dtype=jnp.float32) -> Array:
        return dequantize(self, dtype)


def _broadcast_global(g: Array, ndim: int) -> Array:
    """Align a global scale with an array of ``ndim`` axes by appending unit axes."""
    return g.reshape(g.shape + (1,) * (ndim - g.ndim))


def _check_k(shape: tuple[int, ...]) -> None:
    if len(shape) < 1 or shape[-1] % BLOCK:
        raise ValueError(
            f"NVFP4 needs the last (reduction) dimension to be a multiple of {BLOCK}, got shape {shape}; "
            "pad K with zeros before quantizing"
        )


def _check_finite(x: Array) -> None:
    if isinstance(x, jax.core.Tracer):
        return  # under jit the values are unknown; callers validate inputs before tracing
    if not bool(jnp.all(jnp.isfinite(x))):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(x)))[0])
        raise ValueError(f"cannot quantize non-finite input to NVFP4 (first at index {bad})")


#: below this amax the global scale ``amax / 2688`` would be a float32 subnormal (flushed to zero by
#: XLA): such tensors (or rows) are treated as all-zero, with global scale 1.0
MIN_AMAX = float(E2M1_MAX * E4M3_MAX * 2.0**-126)


def global_scale_from_amax(amax: Float[ArrayLike, "*rows"]) -> Float[Array, "*rows"]:
    """``amax / (6 * 448)``, or 1.0 where amax is 0 or below :data:`MIN_AMAX` (~3.2e-35)."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax >= MIN_AMAX, exact_div(amax, jnp.float32(E2M1_MAX * E4M3_MAX)), jnp.float32(1.0))


def quantize_with_global(x: Float[ArrayLike, "*rows k"], global_scale: Float[ArrayLike, "*g"]) -> NVFP4Tensor:
    """Quantize ``x`` under a given global scale (``[]`` or one per row of ``x``)."""
    x = jnp.asarray(x).astype(jnp.float32)
    _check_k(x.shape)
    g = jnp.asarray(global_scale, jnp.float32)
    g_b = _broadcast_global(g, x.ndim + 1)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax_b = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    s = jnp.minimum(exact_div(exact_div(amax_b, jnp.float32(E2M1_MAX)), g_b), jnp.float32(E4M3_MAX))
    s = s.astype(jnp.float8_e4m3fn)
    denom = e4m3_to_float(s) * g_b
    safe = jnp.where(denom > 0, denom, jnp.float32(1.0))
    codes = jnp.where(denom > 0, encode_e2m1(exact_div(blocks, safe)), jnp.uint8(0))
    return NVFP4Tensor(pack_e2m1(codes.reshape(x.shape)), s[..., 0], g)


def quantize(x: Float[ArrayLike, "*rows k"], *, per_row: bool = False) -> NVFP4Tensor:
    """Quantize to NVFP4 with a per-tensor (weights) or per-row (activations) global scale.

    ``x`` is read as float32 (BF16 inputs convert exactly). Raises ``ValueError`` for a last
    dimension that is not a multiple of 16 and, when ``x`` is concrete, for NaN/Inf input.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    _check_k(x.shape)
    _check_finite(x)
    amax = jnp.max(jnp.abs(x), axis=-1) if per_row else jnp.max(jnp.abs(x))
    return quantize_with_global(x, global_scale_from_amax(amax))


def tileable(t: NVFP4Tensor) -> str | None:
    """None when :func:`tile_weight` can arrange ``t``, else why not."""
    if t.layout != "rows":
        return f"already in layout {t.layout!r}"
    if t.values.ndim < 2:
        return f"a tiled weight has >= 2 dims, got shape {t.shape}"
    if t.global_scale.ndim > t.values.ndim - 2:
        return "per-row global scales (activations) are not tiled"
    n, k = t.shape[-2:]
    if n % TILE_ROWS or k % TILE_K:
        return f"tiles are {TILE_ROWS} rows x {TILE_K} K, got a [{n}, {k}] matrix"
    return None


def tile_weight(t: NVFP4Tensor) -> NVFP4Tensor:
    """``t`` (row-major) in the kernel tile layout (module docstring); a ``ValueError`` if it cannot be."""
    reason = tileable(t)
    if reason is not None:
        raise ValueError(f"tile_weight: {reason}")
    *lead, n, k = t.shape

    def arrange(a: Array, per_tile: int) -> Array:
        a = a.reshape(*lead, n // TILE_ROWS, TILE_ROWS, k // TILE_K, per_tile)
        return jnp.swapaxes(a, -3, -2)

    return NVFP4Tensor(arrange(t.values, TILE_K // 2), arrange(t.scales, TILE_K // BLOCK), t.global_scale, "tiled")


def untile_weight(t: NVFP4Tensor) -> NVFP4Tensor:
    """``t`` in the row-major layout (returned as is when it already is)."""
    if t.layout == "rows":
        return t
    if t.layout != "tiled":
        raise ValueError(f"unknown NVFP4 layout {t.layout!r}; one of {LAYOUTS}")
    *lead, n, k = t.shape

    def arrange(a: Array) -> Array:
        return jnp.swapaxes(a, -3, -2).reshape(*lead, n, -1)

    return NVFP4Tensor(arrange(t.values), arrange(t.scales), t.global_scale)


def to_layout(t: NVFP4Tensor, layout: str) -> NVFP4Tensor:
    """``t`` in ``layout``: ``rows`` untiles; ``tiled`` tiles where :func:`tileable` allows and keeps
    ``t`` otherwise (per-row activations, shapes off the tile grid, already tiled)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown NVFP4 layout {layout!r}; one of {LAYOUTS}")
    if layout == "rows":
        return untile_weight(t)
    return tile_weight(t) if tileable(t) is None else t


def dequantize(t: NVFP4Tensor, dtype=jnp.float32) -> Array:
    """``e2m1 * e4m3 * global`` in float32, then cast to ``dtype`` (row-major, whatever ``t.layout``)."""
    t = untile_weight(t)
    vals = decode_e2m1(unpack_e2m1(t.values))
    k = vals.shape[-1]
    blocks = vals.reshape(*vals.shape[:-1], k // BLOCK, BLOCK) * e4m3_to_float(t.scales)[..., None]
    return (blocks * _broadcast_global(t.global_scale, blocks.ndim)).reshape(vals.shape).astype(dtype)


def quantize_dequantize(x: Float[ArrayLike, "*rows k"], *, per_row: bool = False) -> Float[Array, "*rows k"]:
    """NVFP4 round trip in float32 (the simulation of NVFP4 numerics)."""
    return dequantize(quantize(x, per_row=per_row))


# --------------------------------------------------------------------------- sm_100 scale layout
ATOM_ROWS, ATOM_COLS = 128, 4


def swizzle_scales(scales: ArrayLike) -> Array:
    """Row-major ``[rows, k_blocks]`` scales -> the sm_100 block-scaled MMA layout (flat, 1-D).

    Rows are padded to a multiple of 128 and scale columns to a multiple of 4 with zeros. Atom
    ``(i, j)`` covers rows ``128i .. 128i+127`` and columns ``4j .. 4j+3`` and occupies 512
    consecutive entries at offset ``(i * n_col_atoms + j) * 512``; inside it, row ``r = 32*a + b``
    (``a`` in 0..3, ``b`` in 0..31) and column ``c`` sit at ``b*16 + a*4 + c``.
    """
    s = jnp.asarray(scales)
    if s.ndim != 2:
        raise ValueError(f"swizzle_scales takes a 2-D [rows, k_blocks] array, got shape {s.shape}")
    rows, cols = s.shape
    rp, cp = -(-rows // ATOM_ROWS) * ATOM_ROWS, -(-cols // ATOM_COLS) * ATOM_COLS
    s = jnp.pad(s, ((0, rp - rows), (0, cp - cols)))
    # [i, a, b, j, c] -> [i, j, b, a, c]
    s = s.reshape(rp // ATOM_ROWS, 4, 32, cp // ATOM_COLS, ATOM_COLS).transpose(0, 3, 2, 1, 4)
    return s.reshape(-1)


def unswizzle_scales(swizzled: ArrayLike, rows: int, cols: int) -> Array:
    """Inverse of :func:`swizzle_scales`: back to row-major ``[rows, cols]`` (padding dropped)."""
    s = jnp.asarray(swizzled)
    rp, cp = -(-rows // ATOM_ROWS) * ATOM_ROWS, -(-cols // ATOM_COLS) * ATOM_COLS
    if s.shape != (rp * cp,):
        raise ValueError(f"expected {rp * cp} swizzled scales for a [{rows}, {cols}] matrix, got shape {s.shape}")
    s = s.reshape(rp // ATOM_ROWS, cp // ATOM_COLS, 32, 4, ATOM_COLS).transpose(0, 3, 2, 1, 4)
    return s.reshape(rp, cp)[:rows, :cols]

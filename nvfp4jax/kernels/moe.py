"""Routed experts on sm_90a: grouped NVFP4 GEMMs with a fused gate+up SwiGLU epilogue.

Same signature and math as :func:`nvfp4jax.ref.moe.moe_experts` (spec §4); one call per MoE layer:

1. grouping (XLA): the ``tokens x k`` (token, expert) pairs are sorted by expert (stable, so rows of
   one expert keep token order), giving per-expert row counts and a **tile table** -- one int32 row
   ``(expert, first row, rows)`` per CTA column, at most ``rows // tile_t + min(experts, rows)``
   entries; unused entries have 0 rows and their CTAs exit at once. No padding rows are stored.
2. activations: ``x`` quantized per token (recipe ``nvfp4``: the quantize kernel) or BF16.
3. L1 (grouped GEMM kernel, ``gate_up``): each CTA takes 64 rows of ``w1`` and the same 64 rows of
   ``w3`` of one expert (wgmma M = 128) against that expert's token rows, gathered from ``x`` through
   the sorted order inside the kernel (``gather``). Epilogue: gate and up rounded to BF16 (the
   reference's GEMM outputs), ``min(gate, limit)``, ``clip(up, +-limit)``, ``silu(gate) * up *
   routing weight``, BF16 ``h [rows, inter]``. Decode-sized calls split K over several CTAs for
   bandwidth; the SwiGLU then runs in XLA on the summed float32 partials (a few KB).
4. ``h`` requantized per row (recipe ``nvfp4``) by the quantize kernel -- a separate pass because a
   row's global scale needs the amax of the whole ``inter``-wide row, which spans 32-48 CTAs.
5. L2 (grouped GEMM kernel): ``y [rows, dim]`` BF16 (or split-K float32 partials summed in XLA).
6. combine (XLA): each token's k rows gathered back and summed in float32 (the shared expert is
   added by the model).

Calls with at least 64 rows per expert (:func:`ws_grouped_auto`: V4-Flash from T = 2689, V4-Pro from
T = 4033; from 65 in session 12, from 64 since session 13) run both GEMMs on the warp-specialized
prefill kernel instead (:func:`grouped_gemm_ws`, :mod:`nvfp4jax.kernels.gemm_ws`;
``$NVFP4JAX_GEMM_PREFILL=one-warpgroup`` keeps them here): the L1 input is gathered into expert order
first (BF16 X by an XLA gather, ``rows x dim``; NVFP4 X decoded and gathered in one pass by
``gemm_ws.dequant_rows``), since that kernel TMA-loads whole boxes of consecutive rows; recipe
``nvfp4``'s ``h`` is quantized straight to its decoded BF16 form for L2 there
(``quantize.quantize_nvfp4_decoded``: the same numbers without the codes' round trip; its GPU tests
passed on an H200, session 10). H200, T = 16384: V4-Pro NVFP4 26.9 ms there (session 11: W by TMA,
256-row tiles with a tail, :func:`ws_tail_auto`; 32.6 without the tail, 36.3 with W to registers) against
46.3 ms here (session 7's run, same kind of card); V4-Flash 11.2 / 11.0 ms NVFP4 / W4A16 (session 11)
against 18.3 / 15.4; V4-Flash T = 8192 5.7 vs 10.4 ms, T = 4096 4.5 vs 5.5 ms (NVFP4, session 12,
:data:`WS_GROUPED_MIN_PER_EXPERT`).

Calls of up to 1024 rows do step 1 and the gathers of the routing weights and of the combine's inverse
permutation in one kernel (:mod:`nvfp4jax.kernels.group`, same bits as :func:`group_rows_xla`; 13-19 us
less per call at T = 1 on an H200: session 8 against session 7's run); ``$NVFP4JAX_MOE_GROUP=xla`` keeps
the XLA grouping.

What stays in XLA, by measurement (H100, ``benchmarks/RESULTS.md``): the sort/bincount/tile table and
the combine touch ``tokens x k`` indices and ``tokens x k x dim`` BF16 values. In a V4-Flash layer at
T = 1 they take ~20 us of a 106 us call (the GEMMs ~80 us), at T = 16384 routing plus grouping in XLA
is ~0.9 ms of ~20 ms: the grouped GEMMs are the lever, so these stay XLA for now.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from cutlass.jax import TensorSpec, cutlass_call

from nvfp4jax.formats.nvfp4 import NVFP4Tensor
from nvfp4jax.kernels import gemm as kg, gemm_ws, group
from nvfp4jax.kernels.quantize import quantize_nvfp4, quantize_nvfp4_decoded
from nvfp4jax.ref.moe import swiglu


CTAS_PER_SM_ENV = "NVFP4JAX_MOE_CTAS_PER_SM"
#: L2's decode tiles (up to 64 rows per expert): weight rows per CTA, "auto" (the default), "64" or "128".
#: Every L2 CTA reads its expert's whole ``h`` rows once, ``dim / tile_w`` CTAs per expert: at V4-Pro T = 4096
#: (64 rows per expert) that is 384 x 112 x 64 x 3072 x 2 bytes = 17 GB of BF16 ``h`` (W4A16) through L2 and
#: registers against 4.8 GB of W2; 128 rows per CTA halves it. H200, session 13 (``moe_variants.py``, 64 vs
#: 128, NVFP4 / W4A16): 1.06 / 1.10x at V4-Flash T = 2048, 1.06 / 1.11x at V4-Pro T = 4096, 0.99-1.04x at T = 2,
#: 8, 16, 64, 512 (both models), Pro T = 1 1.03 / 1.01x, but Flash T = 1 0.97 / 0.97x (6 experts x 32 CTAs of
#: 128 rows: 192 CTAs for 132 SMs). ``auto``: 128 where that leaves at least :data:`L2_WIDE_MIN_CTAS` CTAs.
L2_TILE_W_ENV = "NVFP4JAX_MOE_L2_TILE_W"
L2_WIDE_MIN_CTAS = 2 * kg.NUM_SMS


def l2_decode_tile_w(n_out: int, tiles: int) -> int:
    """``$NVFP4JAX_MOE_L2_TILE_W`` (read at trace time; unset or empty: ``auto``), checked against ``n_out``;
    ``auto`` is 128 when ``n_out`` is a multiple of it and ``n_out / 128 x tiles`` (the token tiles) CTAs
    are at least :data:`L2_WIDE_MIN_CTAS`, else 64."""
    value = os.environ.get(L2_TILE_W_ENV, "") or "auto"
    if value == "auto":
        return 128 if n_out % 128 == 0 and n_out // 128 * tiles >= L2_WIDE_MIN_CTAS else 64
    if value not in ("64", "128"):
        raise ValueError(f"{L2_TILE_W_ENV}={value!r}; choose auto, 64 or 128")
    if n_out % int(value):
        raise ValueError(f"{L2_TILE_W_ENV}={value}: L2's {n_out} output columns are not a multiple of it")
    return int(value)


def choose_grouped_config(rows: int, experts: int, n_out: int, k: int, act_nvfp4: bool, *, gate_up: bool,
                          swiglu_limit: float | None) -> kg.GemmConfig:
    """Tiles for a grouped GEMM with ``rows`` (token, expert) rows over ``experts`` experts.

    The token tile follows the expected rows per active expert (uniform routing): decode-style
    tiles (K 128, tokens 16..64) with a K split up to ~16 CTAs per SM while that many could be active
    (``$NVFP4JAX_MOE_CTAS_PER_SM``, read at trace time, for an A/B: the dense GEMM measured one wave
    of 4 per SM faster; here 4 per SM measured no faster at T = 64 and slower at Pro T = 1, 172 vs 148
    us on an H200, session 7); prefill-style 128 x 128 x 64 tiles once an expert has more
    than 64 rows. Decode tiles take 128 weight rows per CTA for L1 (64 of W1, 64 of W3) and
    :func:`l2_decode_tile_w` (64 or 128) for L2.
    """
    per_expert = rows_per_expert(rows, experts)
    tile_w = 128 if gate_up or n_out % 128 == 0 else 64
    if per_expert <= 64:
        tile_t, tile_k = max(16, -(-per_expert // 16) * 16), 128
        if not gate_up:
            tile_w = l2_decode_tile_w(n_out, num_tiles(rows, experts, tile_t))
    else:
        tile_t, tile_k = 128, 64
    ctas = (n_out // tile_w) * num_tiles(rows, experts, tile_t)
    k_tiles = k // tile_k
    split = 1
    per_sm = int(os.environ.get(CTAS_PER_SM_ENV, "16") or 16)
    while ctas * split * 2 <= per_sm * kg.NUM_SMS and k_tiles % (2 * split) == 0 and 2 * split * tile_t * 16 <= k:
        split *= 2
    cfg = kg.GemmConfig(tile_w, tile_t, tile_k, split, act_nvfp4, grouped=True, gather=gate_up, gate_up=gate_up,
                        swiglu_limit=swiglu_limit if gate_up and split == 1 else None)
    cfg = kg.with_env_prefetch(cfg, ctas, k_tiles)  # $NVFP4JAX_GEMM_PREFETCH (default 1: unchanged)
    cfg = kg.with_env_w_regs(cfg)  # decode tiles: W into wgmma's A registers ($NVFP4JAX_GEMM_W_REGS=0: off)
    if gate_up and cfg.split == 1:  # the prefetch may have dropped the split: keep the fused SwiGLU
        cfg = dataclasses.replace(cfg, swiglu_limit=swiglu_limit)
    return cfg


def rows_per_expert(rows: int, experts: int) -> int:
    """Expected rows per active expert under uniform routing: what the token tile is chosen by."""
    return -(-rows // min(experts, rows))


def num_tiles(rows: int, experts: int, tile_t: int) -> int:
    """Upper bound of sum over experts of ceil(rows_e / tile_t): rows // tile_t + (experts with rows)."""
    return rows // tile_t + min(experts, rows)


def tile_table(sizes: Int[Array, " experts"], tile_t: int, tiles: int) -> Int[Array, "tiles 3"]:
    """``(expert, first row, rows)`` per CTA column for rows grouped by expert (``sizes`` per expert).

    Tiles are in expert order; entries past the last tile are ``(experts - 1, 0, 0)``.
    """
    experts = sizes.shape[0]
    per = (sizes + tile_t - 1) // tile_t
    ends = jnp.cumsum(per)
    row0 = jnp.cumsum(sizes) - sizes
    j = jnp.arange(tiles, dtype=jnp.int32)
    # compare_all: one fused comparison; the default binary-search loop launched ~27 tiny kernels (~25 us
    # of a T = 1 MoE call on an H100)
    ex = jnp.searchsorted(ends, j, side="right", method="compare_all").astype(jnp.int32)
    e = jnp.minimum(ex, experts - 1)
    local = j - (ends - per)[e]
    count = jnp.clip(sizes[e] - local * tile_t, 0, tile_t)
    count = jnp.where(ex < experts, count, 0)
    first = jnp.where(count > 0, row0[e] + local * tile_t, 0)
    return jnp.stack([e, first, count], axis=1).astype(jnp.int32)


def _weight_args(w: NVFP4Tensor) -> tuple:
    """Kernel arguments of a stack of expert weights, in the tile layout (``kg.as_tiled``)."""
    w = kg.as_tiled(w)
    return w.values, jax.lax.bitcast_convert_type(w.scales, jnp.uint8), w.global_scale


def grouped_gemm(x: NVFP4Tensor | Array, rows: Int[Array, " rows"] | None, sizes: Int[Array, " experts"],
                 w: NVFP4Tensor, w3: NVFP4Tensor | None = None, route_w: Float[Array, " rows"] | None = None,
                 swiglu_limit: float | None = None, tiles: tuple[int, Array] | None = None) -> Array:
    """Grouped ``Y[r] = X[rows[r]] @ W[e(r)]^T`` for rows sorted by expert (``sizes`` rows per expert).

    ``rows`` (gather map) is None when ``x`` is already in row order. Without ``w3``: BF16
    ``[rows, n]``. With ``w3`` (the gate+up pass), ``route_w`` and ``swiglu_limit``: BF16
    ``h = silu(min(gate, limit)) * clip(up, +-limit) * route_w`` ``[rows, inter]``, in the kernel's
    epilogue, or in XLA after a split-K reduction. ``tiles``: ``(tile_t, table)``, a tile table already
    built for the token tile ``tile_t`` (:func:`group.group_rows`), else it is built here from ``sizes``.
    """
    experts, n, k = w.shape
    act_nvfp4 = isinstance(x, NVFP4Tensor)
    r = rows.shape[0] if rows is not None else x.shape[0]
    gate_up = w3 is not None
    n_out = 2 * n if gate_up else n
    if uses_ws(r, experts, n_out):
        return grouped_gemm_ws(x, rows, sizes, w, w3, route_w, swiglu_limit)  # builds its own tile table
    cfg = choose_grouped_config(r, experts, n_out, k, act_nvfp4, gate_up=gate_up, swiglu_limit=swiglu_limit)
    if rows is None:
        cfg = dataclasses.replace(cfg, gather=False)
    if tiles is None:
        tiles = tile_table(sizes, cfg.tile_t, num_tiles(r, experts, cfg.tile_t))
    elif tiles[0] != cfg.tile_t:
        raise ValueError(f"grouped_gemm: a tile table for {tiles[0]}-row tiles, the kernel uses {cfg.tile_t}")
    else:
        tiles = tiles[1]
    xs = (x.values, jax.lax.bitcast_convert_type(x.scales, jnp.uint8), x.global_scale) if act_nvfp4 else (x, None, None)
    w3s = _weight_args(w3) if gate_up else (None, None, None)
    if cfg.swiglu_limit is not None:
        out = jax.ShapeDtypeStruct((r, n), jnp.bfloat16)
        spec = TensorSpec(mode=(1, 0))
    elif cfg.split > 1:
        out = jax.ShapeDtypeStruct((cfg.split, r, n_out), jnp.float32)
        spec = TensorSpec(mode=(2, 1, 0))
    else:
        out = jax.ShapeDtypeStruct((r, n_out), jnp.float32 if gate_up else jnp.bfloat16)
        spec = TensorSpec(mode=(1, 0))
    y = cutlass_call(_kernel(cfg), output_shape_dtype=out, output_spec=spec)(
        *xs, *_weight_args(w), *w3s, rows, tiles, route_w
    )
    if cfg.swiglu_limit is not None:
        return y
    if cfg.split > 1:
        y = jnp.sum(y, axis=0)
    if not gate_up:
        return y.astype(jnp.bfloat16)
    # kernel rows of a CTA: 64 gate rows then the same 64 up rows
    y = y.reshape(r, n // 64, 2, 64).astype(jnp.bfloat16)
    gate, up = y[:, :, 0].reshape(r, n), y[:, :, 1].reshape(r, n)
    h = swiglu(gate, up, swiglu_limit) * route_w[:, None]
    return h.astype(jnp.bfloat16)


def ws_tile(per_expert: int) -> int:
    """The warp-specialized kernel's token tile for ``per_expert`` rows per expert: 128 for up to 128 rows,
    else 256 (fewer tiles per expert; a K tile of a 256-row tile cost 1.2x one of a 128-row tile on an
    H200, ``gemm_ws.TILE_CYCLES``, so 2 x 256 beats 3-4 x 128 for V4-Flash's ~384 rows per expert)."""
    return min((256, 128), key=lambda t: -(-per_expert // t) * gemm_ws.TILE_CYCLES[t])


#: ``auto``: grouped calls with at least this many expected rows per expert go to gemm_ws. H200, session 12
#: (``benchmarks/moe_variants.py``, default vs ``NVFP4JAX_GEMM_PREFILL=ws``, NVFP4 / W4A16): V4-Flash
#: T = 4096 (96 rows per expert, 128-row tiles) 5504 -> 4492 / 4780 -> 4359 us, T = 8192 (192 rows, 256-row
#: tiles) 10376 -> 5739 / 8924 -> 5544 us; V4-Pro T = 8192 (128 rows) 27596 -> 24000 / 24525 -> 23282 us.
#: Until session 11 the rule was 256 rows per expert (session 8's T = 16384 V4-Flash run with 128-row tiles
#: and W to registers), 65 in session 12. Session 13, decode tiles vs gemm_ws
#: (``$NVFP4JAX_MOE_WS_MIN_ROWS``; NVFP4 / W4A16): V4-Pro T = 4096 (64 rows per expert) 17604 -> 15687 /
#: 20396 -> 15452 us (1.12 / 1.32x; 1.06 / 1.18x against the decode tiles with 128-row L2 tiles), but
#: V4-Flash T = 2048 (48 rows) 0.95 / 1.04x (0.90 / 0.95x against 128-row L2 tiles).
WS_GROUPED_MIN_PER_EXPERT = 64
#: ``$NVFP4JAX_MOE_WS_MIN_ROWS`` (read at trace time): the expected rows per expert from which grouped calls go
#: to gemm_ws, in place of :data:`WS_GROUPED_MIN_PER_EXPERT` (for an A/B; 48 and 17 timed in session 13).
WS_MIN_ROWS_ENV = "NVFP4JAX_MOE_WS_MIN_ROWS"


def ws_min_rows() -> int:
    """:data:`WS_MIN_ROWS_ENV` (unset or empty: :data:`WS_GROUPED_MIN_PER_EXPERT`), a positive integer."""
    value = os.environ.get(WS_MIN_ROWS_ENV, "") or str(WS_GROUPED_MIN_PER_EXPERT)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{WS_MIN_ROWS_ENV}={value!r}; give a positive number of rows per expert")
    return int(value)


def ws_grouped_auto(rows: int, experts: int) -> bool:
    """The grouped GEMMs' rule for ``$NVFP4JAX_GEMM_PREFILL=auto``: the warp-specialized kernel from
    :func:`ws_min_rows` (:data:`WS_GROUPED_MIN_PER_EXPERT`) expected rows per expert (uniform routing),
    measured faster than the one-warpgroup kernel at every such call timed (1.05-1.81x, session 12; 1.12 /
    1.32x at V4-Pro's 64 rows per expert, session 13; T = 16384 since session 8)."""
    return rows_per_expert(rows, experts) >= ws_min_rows()


def uses_ws(rows: int, experts: int, n_out: int) -> bool:
    """Whether a grouped GEMM of ``rows`` rows over ``experts`` experts runs on the warp-specialized
    kernel (:func:`grouped_gemm_ws`): :func:`gemm.uses_ws_prefill` with the rows per expert (from
    :func:`ws_min_rows` rows where that is lower than ``gemm.WS_MIN_M``)."""
    return kg.uses_ws_prefill(rows_per_expert(rows, experts), n_out, jnp.bfloat16,
                              auto=ws_grouped_auto(rows, experts), min_m=min(ws_min_rows(), kg.WS_MIN_M))


WS_TAIL_ENV = "NVFP4JAX_MOE_WS_TAIL"  # "auto" (default), "0" or "64": gemm_ws.PrefillConfig.tail
#: Time of one CTA column of the kernel built with the tail relative to one without (same rows or fewer):
#: 3 pipeline stages instead of 4 with W by TMA. H200, session 11, T = 16384, W by TMA: V4-Flash 13.77 vs
#: 11.20 ms with the tail and without, the same 2 tiles per expert (1.23); V4-Pro 26.86 vs 32.64 ms at
#: 1.00 vs 1.48 tiles per expert (expected_tiles: 0.82 x 1.48 = 1.22).
WS_TAIL_COST = 1.22


def expected_tiles(rows: int, experts: int, capacity: int) -> float:
    """Expected tile-table entries per expert, ``E[ceil(r / capacity)]``, for ``r ~ Binomial(rows,
    1 / experts)``: the rows one expert gets under uniform routing (``rows`` = tokens x k). Exact sum over
    +-10 standard deviations of the mean (Python floats, at trace time)."""
    p = 1.0 / experts
    mean, sd = rows * p, math.sqrt(rows * p * (1.0 - p))
    lo, hi = max(0, int(mean - 10 * sd)), min(rows, int(mean + 10 * sd) + 1)
    log_c = math.lgamma(rows + 1)
    total = 0.0
    for r in range(lo, hi + 1):
        log_p = log_c - math.lgamma(r + 1) - math.lgamma(rows - r + 1) + r * math.log(p)
        total += math.exp(log_p + (rows - r) * math.log1p(-p)) * -(-r // capacity)
    return total


def ws_tail_auto(rows: int, experts: int) -> bool:
    """Whether 256-row tiles take a tail (``$NVFP4JAX_MOE_WS_TAIL=auto``): where the tiles it saves under
    uniform routing outweigh :data:`WS_TAIL_COST` on every tile, ``WS_TAIL_COST x E[ceil(r / 320)] <
    E[ceil(r / 256)]``. Both session-11 measurements follow this model (V4-Pro at T = 16384: 1.48 -> 1.00
    tiles per expert, 18% faster; V4-Flash: 2 tiles either way, 23% slower). It picks the tail for V4-Pro
    at T = 16384, 20000 and 32768 (not 24576, 65536) and V4-Flash at 12288, 24576, 49152, 65536 (not
    16384, 32768): measured only at T = 16384, the rest is the model's extrapolation. Real routings are
    not uniform: a skewed one changes the counts, not what a tile costs."""
    return WS_TAIL_COST * expected_tiles(rows, experts, 256 + gemm_ws.TAIL) < expected_tiles(rows, experts, 256)


def choose_grouped_prefill_config(rows: int, experts: int, act_nvfp4: bool, *, gate_up: bool,
                                  swiglu_limit: float | None) -> gemm_ws.PrefillConfig:
    """Config of the warp-specialized kernel for ``rows`` rows over ``experts`` experts: token tile
    :func:`ws_tile` of the expected rows per expert (uniform routing). 256-row tiles take up to 64 rows
    more in a second wgmma (``PrefillConfig.tail``; 3 stages with W by TMA) where :func:`ws_tail_auto` says,
    or as ``$NVFP4JAX_MOE_WS_TAIL`` (read at trace time: ``auto``, ``0``, ``64``) says: at V4-Pro's
    T = 16384 (256 +- 16 rows per expert, uniform routing) 49% of the experts otherwise get a second
    256-row tile for ~13 rows, decoding their W again (1.48 tiles per expert; 1.00 with the tail). H200,
    session 11: 26.9 vs 32.6 ms (NVFP4)."""
    tile_t = ws_tile(rows_per_expert(rows, experts))
    tail = os.environ.get(WS_TAIL_ENV, "") or "auto"
    if tail not in ("auto", "0", str(gemm_ws.TAIL)):
        raise ValueError(f"{WS_TAIL_ENV}={tail!r}; choose auto, 0 or {gemm_ws.TAIL}")
    cfg = gemm_ws.PrefillConfig(tile_t=tile_t, x_scaled=act_nvfp4, grouped=True, gate_up=gate_up,
                                swiglu_limit=swiglu_limit if gate_up else None)
    cfg = gemm_ws.with_env_options(cfg)
    # (two producers: with_env_options has split a 256-row tile into 128 + a 128-row tail already)
    if (cfg.tile_t, cfg.tail) == (256, 0) and not cfg.persistent and (
            ws_tail_auto(rows, experts) if tail == "auto" else tail != "0"):
        cfg = dataclasses.replace(cfg, tail=gemm_ws.TAIL)
        while not gemm_ws.can_implement(cfg) and cfg.stages > 2:  # the tail's stages: 3 fit with W by TMA
            cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg


def grouped_gemm_ws(x: NVFP4Tensor | Array, rows: Int[Array, " rows"] | None, sizes: Int[Array, " experts"],
                    w: NVFP4Tensor, w3: NVFP4Tensor | None = None, route_w: Float[Array, " rows"] | None = None,
                    swiglu_limit: float | None = None, gx: Float[Array, " rows"] | None = None) -> Array:
    """:func:`grouped_gemm` on the warp-specialized prefill kernel (:mod:`nvfp4jax.kernels.gemm_ws`; where
    :func:`uses_ws` says), same arguments and result.

    That kernel reads X with TMA, whole ``[tile_t, 64]`` boxes of consecutive rows, so the L1 input is
    gathered into expert order first (``x[rows]``: ``rows x dim`` values, once per call, instead of the
    in-kernel gather of :mod:`gemm`); NVFP4 X is decoded to BF16 once, gathered in the same pass
    (:func:`gemm_ws.dequant_rows` with ``rows``), and its per-row global scales go to the epilogue. Always a
    BF16 result (no K split: prefill tiles fill the GPU).
    ``gx``: ``x`` is an NVFP4 X already decoded (``quantize.quantize_nvfp4_decoded``, in row order) and these
    are its per-row global scales.
    """
    experts, n, _ = w.shape
    if gx is not None and (isinstance(x, NVFP4Tensor) or rows is not None):
        raise ValueError("grouped_gemm_ws: per-row global scales go with a decoded BF16 x in row order")
    act_nvfp4 = isinstance(x, NVFP4Tensor)
    gate_up = w3 is not None
    r = x.shape[0] if rows is None else rows.shape[0]
    cfg = choose_grouped_prefill_config(r, experts, act_nvfp4 or gx is not None, gate_up=gate_up,
                                        swiglu_limit=swiglu_limit)
    if act_nvfp4:  # decoded (and gathered into expert order) in one pass
        x, gx = gemm_ws.dequant_rows(x, rows), x.global_scale if rows is None else x.global_scale[rows]
    elif rows is not None:
        x = x[rows]
    per_tile = gemm_ws.rows_per_tile(cfg)
    tiles = tile_table(sizes, per_tile, num_tiles(r, experts, per_tile))
    w3s = _weight_args(w3) if gate_up else (None, None, None)
    out = jax.ShapeDtypeStruct((r, n), jnp.bfloat16)
    return cutlass_call(gemm_ws.kernel_for(cfg), output_shape_dtype=out)(
        x, gx, *_weight_args(w), *w3s, tiles, route_w if gate_up else None)


@functools.cache
def _kernel(cfg: kg.GemmConfig) -> kg.GemmNvfp4Sm90:
    if not kg.GemmNvfp4Sm90.can_implement(cfg):
        raise ValueError(f"grouped GEMM: no kernel for {cfg}")
    return kg.GemmNvfp4Sm90(cfg)


def supports(x, weights, expert_ids, w1, w3, w2) -> str | None:
    """None when the kernel runs this call, else why not (the op then uses the reference)."""
    if not all(isinstance(w, NVFP4Tensor) for w in (w1, w3, w2)):
        return "routed experts are not NVFP4 (recipe bf16)"
    experts, inter, dim = w1.shape
    if w3.shape != w1.shape or w2.shape != (experts, dim, inter):
        return f"expert shapes w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} disagree"
    if any(w.global_scale.shape != (experts,) for w in (w1, w3, w2)):
        return "expert weights need one global scale per expert"
    if dim % 128 or inter % 128:
        return f"grouped GEMM needs dim % 128 == 0 and inter % 128 == 0, got dim {dim}, inter {inter}"
    if x.dtype != jnp.bfloat16:
        return f"MoE kernel takes bfloat16 activations, got {x.dtype}"
    return None


def moe_experts(
    x: Float[Array, "tokens dim"],
    weights: Float[Array, "tokens k"],
    expert_ids: Int[Array, "tokens k"],
    w1: NVFP4Tensor,
    w3: NVFP4Tensor,
    w2: NVFP4Tensor,
    *,
    swiglu_limit: float,
    quantize_activations: bool,
) -> Float[Array, "tokens dim"]:
    """Routed-expert output ``sum_k y_k`` (float32) per token; see the module docstring.

    Same contract as :func:`nvfp4jax.ref.moe.moe_experts` with NVFP4 experts (``[experts, inter,
    dim]`` w1/w3, ``[experts, dim, inter]`` w2, one global scale per expert), BF16 ``x``.
    """
    reason = supports(x, weights, expert_ids, w1, w3, w2)
    if reason is not None:
        raise ValueError(f"moe_experts kernel: {reason}")
    t, k = expert_ids.shape
    experts, _, dim = w1.shape
    if x.shape != (t, dim) or weights.shape != (t, k):
        raise ValueError(f"moe_experts: x {x.shape}, weights {weights.shape}, expert_ids {expert_ids.shape}, dim {dim}")
    if t == 0:
        return jnp.zeros((0, dim), jnp.float32)
    r, inter = t * k, w1.shape[1]
    tiles = None
    if group.applies(r, experts) and not uses_ws(r, experts, 2 * inter):
        # the grouping in one kernel launch; the tile table is built for the GEMMs' token tile
        tile_t = choose_grouped_config(r, experts, 2 * inter, dim, quantize_activations, gate_up=True,
                                       swiglu_limit=swiglu_limit).tile_t
        order, rows, sizes, route_w, table, inverse = group.group_rows(
            expert_ids, weights, experts, tile_t, num_tiles(r, experts, tile_t))
        tiles = (tile_t, table)
    else:
        order, rows, sizes, route_w, inverse = group_rows_xla(expert_ids, weights, experts)
    xa = quantize_nvfp4(x) if quantize_activations else x
    h = grouped_gemm(xa, rows, sizes, w1, w3, route_w, swiglu_limit, tiles=tiles)
    if quantize_activations and uses_ws(r, experts, dim):
        # L2 on gemm_ws reads X as BF16: quantize h straight to its decoded form (no codes, no dequant_rows)
        hd, _, gh = quantize_nvfp4_decoded(h)
        y = grouped_gemm_ws(hd, None, sizes, w2, gx=gh)
    else:
        y = grouped_gemm(quantize_nvfp4(h) if quantize_activations else h, None, sizes, w2, tiles=tiles)
    return y.astype(jnp.float32)[inverse].reshape(t, k, dim).sum(axis=1)


def group_rows_xla(expert_ids: Int[Array, "tokens k"], weights: Float[Array, "tokens k"], experts: int):
    """``(order, rows, sizes, route_w, inverse)``: the (token, expert) rows sorted by expert (stable),
    each sorted row's token (the L1 gather map), rows per expert, the routing weights in sorted order
    and the sorted position of every row (for the combine). :func:`group.group_rows` computes the same
    (plus the tile table) in one kernel."""
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
    route_w = weights.reshape(-1).astype(jnp.float32)[order]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    return order, order // k, sizes, route_w, inverse

"""NVFP4 GEMM ``Y = X @ W^T`` as an sm_90a CuTeDSL kernel (wgmma, in-kernel exact dequantization).

Math (that of :func:`nvfp4jax.ref.gemm.nvfp4_gemm`): ``W`` NVFP4 ``[n, k]`` with a per-tensor
global scale; ``X`` NVFP4 ``[m, k]`` with per-row global scales (recipe ``nvfp4``) or BF16
(recipe ``nvfp4-w4a16``). Both operands are decoded in registers to BF16 -- exact, since
``e2m1 * e4m3`` has at most 6 significant bits and lies in BF16's range; the decoder
(:func:`nvfp4jax.kernels._cute.dequant_nvfp4_chunk`, bit moves and BF16x2 multiplies, no conversion
instructions) yields ``e2m1 * e4m3 * 2**-8`` -- written to swizzled shared memory and multiplied by
wgmma with float32 accumulation. The epilogue applies ``acc * gx[m] * gw`` times ``2**8`` per NVFP4
operand (exact) in float32 and casts to BF16. The result equals the reference up to the float32
summation order.

Swap-AB: the kernel computes ``Y^T = W X^T``: weight rows are wgmma's M (64 per instruction,
``tile_w`` per CTA) and tokens are its N (``tile_t`` = 16..256), so decode (m = 1..64) still fills
the tensor core's M with weights and reads every weight byte exactly once. The same kernel with
a large token tile serves prefill.

Pipeline: one warpgroup (128 threads) per CTA; two shared-memory stages. While wgmma works on
stage s, the threads issue the 128-bit global loads of the next K tile into registers, then wait
for the previous wgmma, decode and store into stage s^1 (``fence.proxy.async`` + barrier).
TMA is not used: the operands must pass through registers to be decoded anyway. Decode shapes
also split K over ``split`` CTAs (``grid.z``); each writes float32 partials ``[split, m, n]`` that
XLA sums and casts (one small fused reduction) so that enough CTAs stream weights to fill HBM.

Grouped modes (the MoE GEMMs of :mod:`nvfp4jax.kernels.moe`, same kernel class): ``grouped``
takes ``W [experts, n, k]`` and a tile table with one int32 row ``(expert, first row, rows)`` per
CTA column (``grid.y``), so a CTA multiplies one expert's weights by a run of rows sorted by
expert; CTAs whose row has 0 rows exit at once. ``gather``: output row r reads X row ``rows[r]``
(the L1 input is the per-token activation, never copied per (token, expert)). ``gate_up``: a CTA's
128 weight rows are 64 rows of ``W1`` and the same 64 rows of ``W3``, so gate and up of a row land
in the same thread (wgmma M blocks 0 and 1); with ``swiglu_limit`` the epilogue rounds both to
BF16 (as the reference does), clamps them and writes ``silu(gate) * up * routing weight`` as BF16.

Weight layout: ``W`` arrives in the kernel tile layout of :mod:`nvfp4jax.formats.nvfp4`
(``[(experts,) n/64, k/128, 64, 64]`` codes, ``[..., 64, 8]`` scale bytes: each 64-row x 128-K tile
contiguous); :func:`nvfp4_gemm` / the MoE wrapper rearrange a row-major weight inside the call
(:func:`as_tiled`), which models avoid by loading their weights tiled (``ops.prepare_weights``).
Thread ``t`` of a pass owns one tile row and one 32-value chunk (:func:`thread_coords`): a warp's
128-bit loads cover 512 contiguous bytes, and a quarter warp's 16-byte shared stores hit 8 distinct
bank groups of the swizzled stage.

Limits: ``n % tile_w == 0`` (64 or 128), ``k % (tile_k * split) == 0`` (tile_k 64 or 128), any m;
the load passes of a thread block tile the token rows exactly (``can_implement``).

Measured (H200, session 4, ``benchmarks/RESULTS.md``): decode still streams weights at ~1.1-1.2 TB/s
(Flash wq_b m = 1: 15.9 us for 18.9 MB; XLA BF16 24.9 us). What it is not: the access pattern (a
load-only kernel with the row-major pattern took 16.4 us, with the tile layout 10.7 us, yet the
GEMM went 16.1 -> 15.9 us with the tile layout), loads in flight (register prefetch P = 2, 3 and a
cp.async ring: no gain), the decode's conversions (removed in session 3, no gain at m = 1). Nsight
Compute (``benchmarks/ncu_gemm.py``, H200) shows the SM's L1/shared pipe 76-79% busy, issue slots
38% busy, 23.5% achieved occupancy (31% theoretical, bounded by the 40 KB of BF16 stages), stalls
mostly on L1TEX scoreboards; shared-store bank conflicts (8.8 wavefronts per warp store) were
found there and removed (18.4 -> 17.8 us under ncu's locked clocks). Every weight byte is written
to and read back from shared memory as BF16 (4x its HBM size) before wgmma reads it.

Register-A path (``GemmConfig.w_regs``, the default for decode tiles of 64 or 128 weight rows x 128 K:
dense, and both MoE GEMMs; ``NVFP4JAX_GEMM_W_REGS=0`` at trace time turns it off): each thread decodes
the weight bytes of its own wgmma A fragment (2 rows per 64-row block x 32 K values, loaded as 16-byte
chunks exactly as above) straight into the fragment's registers, so W never touches shared memory (X
alone is staged: 4 KB per stage at 16 tokens) -- no W stores and no W stage reads. Occupancy does not
improve: 96 registers x 128 threads also allow 5 CTAs per SM, as the 40 KB stages did. The fragment's K
order inside a tile is a permutation of the natural one (:func:`permuted_column`), which X's
stage follows. wgmma(i) must complete before the A registers of tile i + 1 are written (ptxas
serializes every wgmma otherwise, C7513), so the overlap inside a CTA is loads-with-MMA only.
Measured (H200, session 6): the GPU tests pass with it; W4A16 decode 4-19% faster than the
shared-memory path on every V4 shape timed (Flash wq_b m = 1 14.8 vs 15.4 us); Nsight Compute on Flash
wq_b m = 1: L1/TEX throughput 56% (was 76-79%), DRAM 22%, achieved occupancy 21% -- the kernel is now
latency-bound (too few bytes in flight per SM), not L1-bound. SASS then: 384 instructions per K tile
per warp (m = 1 W4A16), ~185 of them the W decode and ~80 X's stage (16-bit stores, 4 wavefronts
each). Since: X staged as BF16 pairs (32-bit stores) in the thread order of :func:`w_regs_x_coords`
(one wavefront per store), in one stage buffer (addresses loop-invariant), W rows sliced once before
the K loop: 298 per tile (W4A16), 336 (W4A4, was 447); registers 96 (W4A16) / 80 (W4A4, was 96),
MoE L1 166, L2 80 (ptxas: no spills). Measured (H200, session 7): the GPU tests pass; Flash wq_b m = 1
W4A16 12.8 us (was 14.8; 1.99x XLA BF16, 44% of copy BW), Pro wq_b 33.9 us (was 38.8); MoE decode 9-13%
faster. The W decode (~185) is near its floor on sm_90 (4 integer/BF16 ops per BF16 pair, 8 per scale).

Prefetch option (``GemmConfig.prefetch = P`` in 2..4, env ``NVFP4JAX_GEMM_PREFETCH``; H200, session
4: correct -- the quick GEMM and MoE GPU tests pass at P = 2 -- and no faster): the register path
with P register buffers, so P K tiles of loads are in flight per CTA while one is decoded
(:meth:`GemmNvfp4Sm90.mainloop_prefetch`). Registers (ptxas, sm_90a, m = 1): 48-56 by default,
70-79 with P = 2, 95-127 with P = 3. ``choose_config`` / ``moe.choose_grouped_config`` apply it to
decode configs (token tile <= 64), with a K split leaving each CTA >= 2P tiles, and P = 2 to
prefill configs (128 x 128 x 64: 245-250 registers, no spills at P = 2). (Session 3's cp.async ring
of raw K tiles, the other attempt at more bytes in flight, measured no faster and was removed.)

Why prefetch measured no faster is open. Session 9 saw in the SASS that every K tile of both paths ends
its shared-memory writes with ``fence.proxy.async`` (``MEMBAR.ALL.CTA``), which waits for the global
loads in flight, the prefetched tiles' too, and built a path without it: X staged G K tiles at a time,
then an inner K loop of W loads P tiles ahead, decode and wgmma with no fence or barrier
(``NVFP4JAX_GEMM_X_RESIDENT=1``). On an H200 (session 10) it was 8-25% slower on 28 of 30 decode cells
(Flash wq_b m = 1: 14.9 us at P = 2 and 20.6 at P = 4 vs 13.5; its 128-166 registers cost CTAs per SM),
so removing the fence did not pay for what the path cost, and it was removed (the table:
``benchmarks/RESULTS.md``, session 10).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
import cuda.bindings.driver as cuda
from cutlass import BFloat16, Float32, Int32, Uint8, Uint32
from cutlass.cute.nvgpu import OperandMajorMode, warpgroup
from cutlass.cute.nvgpu.warpgroup import OperandSource
from cutlass.jax import TensorSpec, cutlass_call
from cutlass.utils import LayoutEnum

from nvfp4jax.formats.nvfp4 import BLOCK, TILE_K, TILE_ROWS, NVFP4Tensor, tile_weight
from nvfp4jax.kernels._cute import DECODE_SHIFT, dequant_nvfp4_chunk, e2m1_pair_bf16x2, e4m3_scale_bf16x2

THREADS = 128
NUM_SMS = 132  # H100 SXM; only used to pick the K split
SMEM_LIMIT = 113 * 1024  # per CTA so that two fit in an SM (228 KB, 1 KB reserved per CTA)
PREFETCH_ENV = "NVFP4JAX_GEMM_PREFETCH"
W_REGS_ENV = "NVFP4JAX_GEMM_W_REGS"  # "0": decode configs stage W in shared memory (default: A registers)
DECODE_CTAS_PER_SM = 4  # decode K split target (choose_config)
PREFILL_ENV = "NVFP4JAX_GEMM_PREFILL"  # one of PREFILL_MODES (uses_ws_prefill); unset: auto
PREFILL_MODES = ("auto", "ws", "ws-persistent", "one-warpgroup")
#: auto: dense calls of at least this many rows go to gemm_ws. H200, session 9 (benchmarks/RESULTS.md): with
#: 256-token tiles at m = 4096 (gemm_ws.TILE_CYCLES) gemm_ws / one-warpgroup time is 0.58-0.77 (W4A4) and
#: 0.61-0.68 (W4A16) for Flash wq_a, wq_b, wo_b, shared w1/w3 at m = 4096, 0.57-0.79 / 0.61-0.67 at 16384.
WS_DENSE_MIN_M = 4096
#: auto, below WS_DENSE_MIN_M: dense calls of at least WS_DENSE_MID_M rows with ``m * n >= WS_DENSE_MID_MN``
#: (enough output tiles for the machine) go to gemm_ws too. H200, session 13 (``gemm-mid``, both kernels side
#: by side on Flash wq_a, wq_b, wo_b, shared w1/w3 at m = 128-2048): gemm_ws was faster in every call with
#: m * n >= 2^21 (time one-warpgroup / gemm_ws, W4A4 1.12-1.90, W4A16 1.08-1.91; wq_b m = 128: 1.23 / 1.08)
#: and slower in every call with m * n <= 2^20 (0.47-0.87 / 0.37-0.82); none measured in between.
WS_DENSE_MID_M = 128
WS_DENSE_MID_MN = 1 << 21
#: no call below this many rows (per expert, for the grouped ones) goes to gemm_ws: the decode tiles take them
#: (the grouped GEMMs pass their own: ``moe.ws_min_rows``, 64 by default since session 13)
WS_MIN_M = 65


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    tile_w: int  # weight rows per CTA (wgmma M): 64 or 128
    tile_t: int  # tokens per CTA (wgmma N): 16..256, multiple of 16
    tile_k: int  # K per pipeline stage: 64 or 128
    split: int  # K split over grid.z (float32 partial outputs when > 1)
    act_nvfp4: bool  # X is NVFP4 (else BF16)
    grouped: bool = False  # W is [experts, n, k]; CTAs take (expert, first row, rows) from a tile table
    gather: bool = False  # grouped: output row r reads X row rows[r] (else X row r)
    gate_up: bool = False  # grouped L1: rows 0..63 of a CTA from W1, 64..127 from W3 (tile_w 128)
    swiglu_limit: float | None = None  # gate_up with split 1: SwiGLU x routing weight epilogue (BF16 h)
    prefetch: int = 1  # register path: K tiles of loads in flight per CTA (2-4: opt-in, GPU-tested, no faster)
    w_regs: bool = False  # W decoded straight into wgmma's A registers (choose_config's default for decode
    # tiles; with it, prefetch = raw register buffers of W/X loads in flight, see mainloop_w_regs)


def _chunk(rows: int, tile_k: int, elems: int) -> tuple[int, int]:
    """(rows per pass, K elements per thread chunk) for 128 threads covering a [rows, tile_k] tile."""
    chunk = elems
    while (THREADS * chunk // tile_k > rows or rows % (THREADS * chunk // tile_k)) and chunk > 8:
        chunk //= 2
    return THREADS * chunk // tile_k, chunk


def x_stages(cfg: GemmConfig) -> int:
    """BF16 X stages: two (the shared-memory path writes tile i + 1 while wgmma(i) reads tile i), one
    with W in registers (wgmma(i - 1) completes before any warp writes tile i, see mainloop_w_regs)."""
    return 1 if cfg.w_regs else 2


def smem_bytes(cfg: GemmConfig) -> int:
    """Shared memory of a CTA: the BF16 stages of the W (two, unless in registers) and X tiles."""
    return 2 * ((0 if cfg.w_regs else 2 * cfg.tile_w) + x_stages(cfg) * cfg.tile_t) * cfg.tile_k


def rows_by_quarter_warp(tile_k: int, rows_pp: int) -> bool:
    """Whether the 8 threads of a quarter warp take 8 consecutive rows at one K chunk (else the plain
    row-major order ``row = t // per_row``), see :func:`thread_coords`.

    Only K tiles of 128 need it: a BF16 stage row is then two 128-byte swizzle atoms, and the plain
    order put 2 rows x 4 chunks 32 K apart in a quarter warp -- chunks 64 K apart land in the same
    banks: 2-way conflicts on every 16-byte store (ncu, H200, decode: 8.8 wavefronts per 512-byte warp
    store instead of 4; L1 78% busy). With K tiles of 64 a stage row is one atom, the plain order is
    conflict-free (the swizzle XORs the chunk with ``row % 8``, a permutation of a row's 8 chunks, and a
    quarter warp's whole rows of 4-chunk halves stay apart), and it reads whole rows from global memory,
    which matters when X is BF16 (16 KB per 128-token tile): with the 8-row order (06f6340 .. session 6)
    each quarter warp read 16 bytes of 8 rows, 2x the cache lines per load, and the MoE's prefill ran
    slower on an H200 in both recipes (T = 16384 Flash: W4A16 24.4 vs 15.5 ms, NVFP4 20.1 vs 18.5 ms,
    session 6 vs 4; the prefill tiles' SASS is otherwise instruction for instruction the same). Prefill
    tiles are back on the plain order: confirmed on an H200 in session 7 (W4A16 15.4 ms, NVFP4 18.3 ms)."""
    return rows_pp % 8 == 0 and tile_k > 64


def thread_coords(tidx, per_row: int, rows_pp: int, tile_k: int):
    """(row in the pass, chunk in the row) that thread ``tidx`` loads, decodes and stores.

    With :func:`rows_by_quarter_warp`, the 8 threads of a quarter warp take 8 consecutive rows at the
    same K chunk: their 16-byte shared-memory stores then hit 8 different 16-byte bank groups of the
    128-byte-swizzled BF16 stage (the swizzle XORs the chunk with ``row % 8``) and a warp still reads 8
    whole tile rows of W (512 contiguous bytes); else the plain order ``row = t // per_row``."""
    if rows_by_quarter_warp(tile_k, rows_pp):
        return (tidx // (8 * per_row)) * 8 + tidx % 8, (tidx // 8) % per_row
    return tidx // per_row, tidx % per_row


def store_copy(tile_k: int, rows_pp: int, chunk: int):
    """Tiled copy registers -> shared memory of a BF16 stage ``[rows, tile_k]``, thread t owning (row, chunk)
    as :func:`thread_coords` says (16-byte stores)."""
    per_row = tile_k // chunk
    atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16, num_bits_per_copy=128)
    if rows_by_quarter_warp(tile_k, rows_pp):  # t = row % 8 + 8 chunk + 8 per_row (row // 8)
        threads = cute.make_layout(((8, rows_pp // 8), per_row), stride=((1, 8 * per_row), 8))
    else:
        threads = cute.make_layout((rows_pp, per_row), stride=(per_row, 1))
    return cute.make_tiled_copy_tv(atom, threads, cute.make_layout((1, chunk)))


def load_w_chunk(gW, row, kt, tile_k: int, w_chunk: int, w_part, codes, scales):
    """128-bit loads of one thread's chunk of W: row ``row``, chunk ``w_part`` of K tile ``kt`` (``tile_k``
    wide, ``w_chunk`` values per chunk) into ``codes`` / ``scales``; ``gW`` = (codes, scales) views
    ``[1, 1, 1, chunk bytes, n/64, k/128, 64, chunks per tile row]`` of the tile layout. W is tile-major
    (``TILE_ROWS`` x ``TILE_K`` tiles, contiguous): row ``R``'s K chunk ``c`` sits in tile
    ``(R // 64, c // per_tile)`` at ``(R % 64, c % per_tile)``, so the 128 threads of a pass read one
    contiguous run of codes (and one of scales). Python or DSL integers, called inside a kernel."""
    per_tile = TILE_K // w_chunk
    chunk = kt * (tile_k // w_chunk) + w_part
    kb, c = chunk // per_tile, chunk % per_tile
    rb, r = row // TILE_ROWS, row % TILE_ROWS
    cute.autovec_copy(gW[0][0, 0, 0, None, rb, kb, r, c], codes)
    cute.autovec_copy(gW[1][0, 0, 0, None, rb, kb, r, c], scales)


def w_regs_x_coords(tidx, x_chunk: int):
    """``w_regs`` path: (row in the pass, chunk) of X that thread ``tidx`` loads and stages (K tile 128,
    ``x_chunk`` = rows per pass = 8, 16 or 32).

    A warp takes 8 rows (lane % 8) x the 4 lane groups ``q`` (lane // 8) of one chunk position ``j``
    inside the 32-K groups (chunk ``q * 32 / x_chunk + j``); warps split ``j`` and 8-row blocks. Under
    :func:`permuted_column` a pair store then lands in bank ``4 * ((t' % 8) ^ row % 8) + q`` of the
    128-byte-swizzled stage (``t'`` the pair's byte index, the same across a warp): 32 distinct banks,
    one wavefront per 32-bit warp store. The plain order had 2 per store, the quarter-warp order of
    :func:`thread_coords` 4 (and 16-bit stores; ncu, H200: 4.5 wavefronts per shared store, 67% of
    them "excessive"). Checked on the CPU with the swizzle's bank model
    (``tests/kernels/test_compile.py::test_w_regs_x_stage_is_bank_conflict_free``)."""
    per_q = 32 // x_chunk
    w, lane = tidx // 32, tidx % 32
    return (w // per_q) * 8 + lane % 8, (lane // 8) * per_q + w % per_q


def permuted_column(kk):
    """``w_regs`` path: the A / X stage column of the even K index ``kk`` (and ``kk + 1`` the next) in a
    128-K tile. Lane ``q = kk // 32`` holds K ``32q .. 32q + 31``; the pair of byte ``t = kk % 32 // 2``
    goes to k step ``t // 2``, column half ``t % 2``, columns ``2q, 2q + 1`` of it (wgmma's A fragment).
    Python ints or DSL integers."""
    t = (kk % 32) // 2
    return (t // 2) * 16 + (t % 2) * 8 + (kk // 32) * 2


def fragment_word(t: int, r: int, mb: int, blocks: int) -> int:
    """``w_regs`` path: the BF16x2 word of a thread's A fragment (``blocks`` 64-row M blocks) that holds the
    pair of code byte ``t`` (0..15 of its 32-value chunk) of row half ``r`` in M block ``mb``."""
    return r + 2 * (t % 2) + 4 * mb + 4 * blocks * (t // 2)


class GemmNvfp4Sm90:
    """``Y^T[n, m] = W[n, k] X[m, k]^T`` with NVFP4 W (and NVFP4 or BF16 X); see the module docstring."""

    def __init__(self, cfg: GemmConfig):
        self.cfg = cfg
        self.w_rows_pp, self.w_chunk = _chunk(cfg.tile_w, cfg.tile_k, 32)
        if cfg.act_nvfp4:
            self.x_rows_pp, self.x_chunk = _chunk(cfg.tile_t, cfg.tile_k, 32)
        else:
            self.x_rows_pp, self.x_chunk = _chunk(cfg.tile_t, cfg.tile_k, 8)

    @staticmethod
    def can_implement(cfg: GemmConfig) -> bool:
        if cfg.tile_w not in (64, 128) or cfg.tile_k not in (64, 128) or cfg.tile_t % 16 or not 16 <= cfg.tile_t <= 256:
            return False
        if cfg.gate_up and (not cfg.grouped or cfg.tile_w != 128):
            return False
        if (cfg.gather or cfg.swiglu_limit is not None) and not cfg.grouped:
            return False
        if cfg.swiglu_limit is not None and (not cfg.gate_up or cfg.split != 1):
            return False
        if smem_bytes(cfg) > SMEM_LIMIT or not 1 <= cfg.prefetch <= 4:
            return False
        if cfg.w_regs and cfg.tile_k != TILE_K:
            return False
        chunks = [_chunk(cfg.tile_w, cfg.tile_k, 32)]
        chunks.append(_chunk(cfg.tile_t, cfg.tile_k, 32 if cfg.act_nvfp4 else 8))
        # every row of the tile is loaded: whole passes of r rows (a 48-token tile with 32-row
        # passes once left 16 rows of shared memory unwritten)
        return all(c >= (16 if i == 0 or cfg.act_nvfp4 else 8) and r <= rows and rows % r == 0
                   for i, ((r, c), rows) in enumerate(zip(chunks, (cfg.tile_w, cfg.tile_t))))

    @cute.jit
    def __call__(self, stream: cuda.CUstream, mXv, mXs, mXg, mWv, mWs, mWg, mW3v, mW3s, mW3g, mRows, mTiles,
                 mRouteW, mY):
        """Dense: ``W [n, k]``, ``Y^T [n, m]`` (or ``[n, m, split]`` float32 partials).

        Grouped: ``W [experts, n, k]`` (and ``W3`` for gate_up), ``mTiles [tiles, 3]`` int32 rows of
        ``(expert, first output row, row count)``, ``mRows [rows]`` the X row of each output row
        (gather), ``mRouteW [rows]`` float32 routing weights (SwiGLU epilogue); ``Y^T [n_out, rows]``.
        """
        cfg = self.cfg
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1), (64, cfg.tile_t),
            OperandSource.RMEM if cfg.w_regs else OperandSource.SMEM,
        )
        tile_mnk = (cfg.tile_w, cfg.tile_t, cfg.tile_k)
        sA_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, tile_mnk, BFloat16, 2)
        sB_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, tile_mnk, BFloat16, x_stages(cfg))
        # with W in registers the A stage is 16 bytes (unused): shared memory holds X only
        a_elems = 8 if cfg.w_regs else cute.cosize(sA_layout)

        @cute.struct
        class SharedStorage:
            sA: cute.struct.Align[cute.struct.MemRange[BFloat16, a_elems], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sB_layout)], 1024]

        self.shared_storage = SharedStorage
        if cutlass.const_expr(cfg.grouped):
            n = mWv.shape[1]
            if cutlass.const_expr(cfg.gate_up):
                n = 2 * n
            grid = [n * TILE_ROWS // cfg.tile_w, mTiles.shape[0], cfg.split]
        else:
            grid = [mWv.shape[0] * TILE_ROWS // cfg.tile_w, (mXv.shape[0] + cfg.tile_t - 1) // cfg.tile_t, cfg.split]
        self.kernel(mXv, mXs, mXg, mWv, mWs, mWg, mW3v, mW3s, mW3g, mRows, mTiles, mRouteW, mY,
                    tiled_mma, sA_layout, sB_layout).launch(grid=grid, block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mXv: cute.Tensor, mXs, mXg, mWv: cute.Tensor, mWs: cute.Tensor, mWg: cute.Tensor,
               mW3v, mW3s, mW3g, mRows, mTiles, mRouteW, mY: cute.Tensor, tiled_mma: cute.TiledMma,
               sA_layout: cute.ComposedLayout, sB_layout: cute.ComposedLayout):
        cfg = self.cfg
        _, bt, _ = cute.arch.block_idx()
        m = mXv.shape[0]
        # this CTA's rows of X^T: output rows [start, start + count) of expert e
        e = Int32(0)
        start = bt * cfg.tile_t
        count = cutlass.min(m - start, cfg.tile_t)
        if cutlass.const_expr(cfg.grouped):
            e = mTiles[bt, 0]
            start = mTiles[bt, 1]
            count = mTiles[bt, 2]
        if count > 0:
            self.body(mXv, mXs, mXg, mWv, mWs, mWg, mW3v, mW3s, mW3g, mRows, mRouteW, mY, tiled_mma,
                      sA_layout, sB_layout, e, start, count)

    @cute.jit
    def body(self, mXv, mXs, mXg, mWv, mWs, mWg, mW3v, mW3s, mW3g, mRows, mRouteW, mY, tiled_mma: cute.TiledMma,
             sA_layout: cute.ComposedLayout, sB_layout: cute.ComposedLayout, e, start, count):
        cfg = self.cfg
        tidx, _, _ = cute.arch.thread_idx()
        bw, _, bz = cute.arch.block_idx()
        k_tiles = mWs.shape[cute.rank(mWs) - 3] * TILE_K // cfg.tile_k // cfg.split
        kt0 = bz * k_tiles

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        sB = storage.sB.get_tensor(sB_layout.outer, swizzle=sB_layout.inner)

        # ---- per-thread global sources and register staging -------------------------------
        # W in the tile layout [n/64, k/128, 64, 64 | 8] (formats.nvfp4.tile_weight); views
        # [1, 1, 1, chunk/2 | chunk/16, n/64, k/128, 64, chunks per tile row]: a thread's bytes of (row, chunk)
        wv, ws = mWv, mWs
        if cutlass.const_expr(cfg.grouped):
            wv, ws = mWv[e, None, None, None, None], mWs[e, None, None, None, None]
        w3v, w3s = wv, ws
        if cutlass.const_expr(cfg.gate_up):
            w3v, w3s = mW3v[e, None, None, None, None], mW3s[e, None, None, None, None]
        w_per_row = cfg.tile_k // self.w_chunk
        w_rows_cta = cfg.tile_w // 2 if cutlass.const_expr(cfg.gate_up) else cfg.tile_w
        if cutlass.const_expr(cfg.w_regs):
            # the A fragment's rows: warp w holds rows 16w + lane/4 and + 8 of each 64-row M block,
            # K columns of lane % 4
            w_row_in_pass, w_part = (tidx // 32) * 16 + (tidx % 32) // 4, tidx % 4
        else:
            w_row_in_pass, w_part = thread_coords(tidx, w_per_row, self.w_rows_pp, cfg.tile_k)
        w_row0 = bw * w_rows_cta + w_row_in_pass
        gW = (cute.local_tile(wv, (1, 1, 1, self.w_chunk // 2), (None,) * 4),
              cute.local_tile(ws, (1, 1, 1, self.w_chunk // BLOCK), (None,) * 4))
        gW3 = (cute.local_tile(w3v, (1, 1, 1, self.w_chunk // 2), (None,) * 4),
               cute.local_tile(w3s, (1, 1, 1, self.w_chunk // BLOCK), (None,) * 4))
        w_passes = cfg.tile_w // self.w_rows_pp
        tWrP = cute.make_rmem_tensor((self.w_chunk // 2, w_passes), Uint8)
        tWrS = cute.make_rmem_tensor((self.w_chunk // BLOCK, w_passes), Uint8)
        tWrD = cute.make_rmem_tensor((self.w_chunk, w_passes), BFloat16)

        x_per_row = cfg.tile_k // self.x_chunk
        if cutlass.const_expr(cfg.w_regs):
            x_row_in_tile, x_part = w_regs_x_coords(tidx, self.x_chunk)
        else:
            x_row_in_tile, x_part = thread_coords(tidx, x_per_row, self.x_rows_pp, cfg.tile_k)
        x_passes = cfg.tile_t // self.x_rows_pp
        tXrD = cute.make_rmem_tensor((self.x_chunk, x_passes), BFloat16)
        # the X row each pass reads (rows past count re-read the tile's last row; zeroed later)
        x_rows = cute.make_rmem_tensor((x_passes,), Int32)
        for p in cutlass.range_constexpr(x_passes):
            pos = start + cutlass.min(x_row_in_tile + p * self.x_rows_pp, count - 1)
            if cutlass.const_expr(cfg.gather):
                pos = mRows[pos]
            x_rows[p] = pos
        if cutlass.const_expr(cfg.act_nvfp4):
            gX = (cute.local_tile(mXv, (1, self.x_chunk // 2), (None, None)),
                  cute.local_tile(mXs, (1, self.x_chunk // BLOCK), (None, None)))
            tXrP = cute.make_rmem_tensor((self.x_chunk // 2, x_passes), Uint8)
            tXrS = cute.make_rmem_tensor((self.x_chunk // BLOCK, x_passes), Uint8)
        else:
            gX = (cute.local_tile(mXv, (1, self.x_chunk), (None, None)), None)
            tXrP = tXrD
            tXrS = tXrD

        store_x = store_copy(cfg.tile_k, self.x_rows_pp, self.x_chunk).get_slice(tidx)
        tBsB = store_x.partition_D(sB)
        thr_mma = tiled_mma.get_slice(tidx)
        tCsB = thr_mma.partition_B(sB)
        tCrB = tiled_mma.make_fragment_B(tCsB)

        acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((cfg.tile_w, cfg.tile_t)), Float32)
        acc.fill(0.0)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)

        if cutlass.const_expr(cfg.w_regs):
            self.mainloop_w_regs(kt0, k_tiles, count, gW, gW3, w_row0, w_part, tWrP, tWrS, gX, x_rows, x_part,
                                 x_row_in_tile, tXrP, tXrS, tXrD, sB, tCrB, acc, tiled_mma, thr_mma)
        else:
            sA = storage.sA.get_tensor(sA_layout.outer, swizzle=sA_layout.inner)
            store_w = store_copy(cfg.tile_k, self.w_rows_pp, self.w_chunk).get_slice(tidx)
            tAsA = store_w.partition_D(sA)  # (CPY, passes, 1, stage)
            tCsA = thr_mma.partition_A(sA)
            tCrA = tiled_mma.make_fragment_A(tCsA)

            if cutlass.const_expr(cfg.prefetch > 1):
                self.mainloop_prefetch(kt0, k_tiles, count, gW, gW3, w_row0, w_part, gX, x_rows, x_part, x_row_in_tile,
                                       tWrD, tXrD, tAsA, tBsB, tCrA, tCrB, acc, tiled_mma)
            else:
                # Tile i's operands are loaded into registers one iteration ahead, while wgmma(i-1) runs;
                # stage i % 2 is rewritten only after wgmma(i-2), its last reader, has completed.
                self.load_tile(kt0, gW, gW3, tWrP, tWrS, w_row0, w_part, gX, tXrP, tXrS, tXrD, x_rows, x_part)
                for i in cutlass.range(k_tiles, unroll=1):
                    stage = i % 2
                    self.stage_tile(stage, (tWrP, tWrS, tWrD), (tXrP, tXrS, tXrD), tAsA, tBsB, x_row_in_tile, count)
                    if i + 1 < k_tiles:
                        self.load_tile(kt0 + i + 1, gW, gW3, tWrP, tWrS, w_row0, w_part, gX, tXrP, tXrS, tXrD, x_rows,
                                       x_part)
                    self.issue_mma(stage, tCrA, tCrB, acc, tiled_mma)
        warpgroup.wait_group(0)
        self.epilogue(acc, thr_mma, mXg, mWg, mW3g, mRows, mRouteW, mY, e, start, count)

    @cute.jit
    def mainloop_prefetch(self, kt0, k_tiles, count, gW, gW3, w_row0, w_part, gX, x_rows, x_part, x_row_in_tile,
                          tWrD, tXrD, tAsA, tBsB, tCrA, tCrB, acc, tiled_mma: cute.TiledMma):
        """K loop of the register path with ``prefetch = P`` tiles of loads in flight per CTA.

        ``P`` register buffers (raw W codes/scales; X codes/scales, or BF16 X); tile i lives in
        buffer ``i % P`` -- static, because the loop advances P tiles per trip and unrolls them.
        Tile i is decoded into BF16 stage ``i % 2`` (after wgmma(i-2), its last reader, completed:
        ``wait_group(1)``), then its buffer is refilled with tile ``i + P`` before wgmma(i) is
        issued, so P tiles' loads are in flight while a tile is decoded. With P = 1 this is the
        default loop; decode CTAs (48-56 registers, 40 KB of shared memory: 5 per SM) have the
        registers for P <= 4 without losing occupancy.
        """
        P = self.cfg.prefetch
        bufs = self.raw_buffers(P, tXrD)
        for j in cutlass.range_constexpr(P):
            wp, ws, xp, xs, xd = bufs[j]
            if j < k_tiles:
                self.load_tile(kt0 + j, gW, gW3, wp, ws, w_row0, w_part, gX, xp, xs, xd, x_rows, x_part)
        for i0 in cutlass.range(0, k_tiles, P, unroll=1):
            for j in cutlass.range_constexpr(P):
                wp, ws, xp, xs, xd = bufs[j]
                i = i0 + j
                if i < k_tiles:
                    stage = i % 2
                    self.stage_tile(stage, (wp, ws, tWrD), (xp, xs, xd), tAsA, tBsB, x_row_in_tile, count)
                    if i + P < k_tiles:
                        self.load_tile(kt0 + i + P, gW, gW3, wp, ws, w_row0, w_part, gX, xp, xs, xd, x_rows, x_part)
                    self.issue_mma(stage, tCrA, tCrB, acc, tiled_mma)

    def raw_buffers(self, count: int, tXrD) -> list:
        """``count`` register buffers ``(W codes, W scales, X codes, X scales, X BF16)`` of one K tile's
        loads, shaped as ``body`` shapes its own (``tWrP``...): NVFP4 X shares the decoded temporary
        ``tXrD``; BF16 X is loaded straight into its buffer (codes and scales alias it)."""
        cfg = self.cfg
        w_passes = cfg.tile_w // self.w_rows_pp
        x_passes = cfg.tile_t // self.x_rows_pp
        bufs = []
        for _ in range(count):
            wp = cute.make_rmem_tensor((self.w_chunk // 2, w_passes), Uint8)
            ws = cute.make_rmem_tensor((self.w_chunk // BLOCK, w_passes), Uint8)
            if cutlass.const_expr(cfg.act_nvfp4):
                xp = cute.make_rmem_tensor((self.x_chunk // 2, x_passes), Uint8)
                xs = cute.make_rmem_tensor((self.x_chunk // BLOCK, x_passes), Uint8)
                xd = tXrD
            else:
                xd = cute.make_rmem_tensor((self.x_chunk, x_passes), BFloat16)
                xp, xs = xd, xd
            bufs.append((wp, ws, xp, xs, xd))
        return bufs

    @cute.jit
    def mainloop_w_regs(self, kt0, k_tiles, count, gW, gW3, w_row0, q, tWrP, tWrS, gX, x_rows, x_part, x_row_in_tile,
                        tXrP, tXrS, tXrD, sB, tCrB, acc, tiled_mma: cute.TiledMma, thr_mma):
        """K loop with W decoded straight into wgmma's A registers (``w_regs``; K tile 128).

        Thread ``(warp w, lane l)`` holds, in each 64-row M block (one, or two with ``tile_w`` 128: for
        gate_up W1's and W3's rows), A rows ``16w + l/4`` and ``+ 8`` (row halves r = 0, 1) and,
        per k16 step, K columns ``2q, 2q+1, 8+2q, 9+2q`` (q = l % 4). It loads its rows' natural
        32-value chunk ``q`` of the tile row (16 code bytes, 2 scale bytes; a warp reads 512
        contiguous bytes per row half) and puts the BF16 pair of byte ``t`` into k step ``t // 2``,
        column half ``t % 2`` -- so the CTA's K order inside a tile is permuted: A column
        ``s = 16 (t//2) + 8 (t%2) + 2q + e`` holds K index ``32q + 2t + e``. A sum over K does not
        care, as long as X's stage uses the same order (:meth:`stage_x_permuted`). The A fragment of tile i
        is decoded only after wgmma(i - 1) completed (``wait_group(0)``): ptxas serializes every wgmma
        (C7513) when the A registers of one are written while another is in flight, which a second
        register buffer would do. What overlaps wgmma(i) is the global loads of tiles i + 1 .. i + P,
        issued before it (``prefetch = P`` raw register buffers, cheap here: ~10-20 registers per tile
        of codes, scales and X; ptxas 13.0 nonetheless uses 96 / 159 / 168 registers at P = 1 / 2 / 3 for
        Flash wq_b m = 1), and the other CTAs of the SM. That same wait lets X use one stage buffer (all
        warps pass it and a barrier before any writes the stage): the stage's addresses are then the same
        every tile, and the compiler computes their swizzle once instead of per tile.
        """
        cfg = self.cfg
        P = cfg.prefetch
        tArA = tiled_mma.make_fragment_A(thr_mma.partition_shape_A((cfg.tile_w, cfg.tile_k)))
        # P raw register buffers (W codes/scales, X): tile i in buffer i % P, static (P tiles per trip)
        bufs = [(tWrP, tWrS, tXrP, tXrS, tXrD)] + self.raw_buffers(P - 1, tXrD)
        w_rows = self.w_regs_rows(gW, gW3, w_row0, q)  # this thread's W rows, every K tile
        for j in cutlass.range_constexpr(P):
            wp, ws, xp, xs, xd = bufs[j]
            if j < k_tiles:
                self.load_w_regs(kt0 + j, w_rows, wp, ws)
                self.load_x(kt0 + j, gX, xp, xs, xd, x_rows, x_part)
        for i0 in cutlass.range(0, k_tiles, P, unroll=1):
            for j in cutlass.range_constexpr(P):
                wp, ws, xp, xs, xd = bufs[j]
                i = i0 + j
                if i < k_tiles:
                    stage = 0  # the one X stage (x_stages): wgmma(i - 1), its last reader, completed before the barrier
                    warpgroup.wait_group(0)  # wgmma(i - 1), the reader of the A registers, is done
                    cute.arch.sync_threads()
                    self.decode_w_regs(wp, ws, tArA)
                    self.stage_x_permuted(stage, xp, xs, xd, sB, x_row_in_tile, x_part, count)
                    if i + P < k_tiles:
                        self.load_w_regs(kt0 + i + P, w_rows, wp, ws)
                        self.load_x(kt0 + i + P, gX, xp, xs, xd, x_rows, x_part)
                    warpgroup.fence()
                    for kb in cutlass.range_constexpr(cute.size(tArA, mode=[2])):
                        cute.gemm(tiled_mma, acc, tArA[None, None, kb], tCrB[None, None, kb, stage], acc)
                    warpgroup.commit_group()

    @cute.jit
    def w_regs_rows(self, gW, gW3, w_row0, q):
        """This thread's A rows (``w_row0 + 64 mb + 8 r``; gate_up: block 1 is W3's rows ``w_row0 + 8 r``),
        chunk ``q``, as (codes, scales) tensors over the K tiles, sliced once before the K loop (so the
        loop only adds the K tile's offset)."""
        rows = []
        for mb in cutlass.range_constexpr(self.cfg.tile_w // 64):
            src, off = gW, 64 * mb
            if cutlass.const_expr(self.cfg.gate_up and mb == 1):
                src, off = gW3, 0
            for r in cutlass.range_constexpr(2):
                row = w_row0 + off + 8 * r
                rb, rr = row // TILE_ROWS, row % TILE_ROWS
                rows.append((src[0][0, 0, 0, None, rb, None, rr, q], src[1][0, 0, 0, None, rb, None, rr, q]))
        return rows

    @cute.jit
    def load_w_regs(self, kt, w_rows, tWrP, tWrS):
        """Global loads of K tile ``kt`` of this thread's A rows (:meth:`w_regs_rows`) into register
        pass ``2 mb + r``."""
        for p in cutlass.range_constexpr(len(w_rows)):
            cute.autovec_copy(w_rows[p][0][None, kt], tWrP[None, p])
            cute.autovec_copy(w_rows[p][1][None, kt], tWrS[None, p])

    @cute.jit
    def decode_w_regs(self, tWrP, tWrS, tArA):
        """Decode the rows' 16 code bytes into the A fragment: byte ``t`` of row half ``r`` of M block
        ``mb`` is the BF16x2 word :func:`fragment_word` of the fragment (layout
        ``((2,2,2),MB,8):((1,2,4),8,8 MB)``: pair element, row half, column half; M block; k step).
        Same exact decoder as the shared-memory path."""
        blocks = self.cfg.tile_w // 64
        words_a = cute.recast_tensor(tArA, Uint32)
        for mb in cutlass.range_constexpr(blocks):
            for r in cutlass.range_constexpr(2):
                words = cute.recast_tensor(tWrP[None, 2 * mb + r], Uint32)
                for blk in cutlass.range_constexpr(2):  # 16 K values (8 bytes) per scale
                    scale = e4m3_scale_bf16x2(Uint32(tWrS[blk, 2 * mb + r]))
                    for h in cutlass.range_constexpr(2):
                        w = words[2 * blk + h]
                        lo = w & Uint32(0x0F0F0F0F)
                        hi = (w >> Uint32(4)) & Uint32(0x0F0F0F0F)
                        for j in cutlass.range_constexpr(4):
                            t = 4 * (2 * blk + h) + j
                            words_a[fragment_word(t, r, mb, blocks)] = e2m1_pair_bf16x2(lo, hi, j, scale)

    @cute.jit
    def stage_x_permuted(self, stage, xp, xs, xd, sB, x_row_in_tile, x_part, count):
        """X's register tile -> BF16 stage ``stage`` in the K order of :meth:`mainloop_w_regs`
        (:func:`permuted_column`); rows past ``count`` zeroed; proxy fence + barrier."""
        cfg = self.cfg
        for p in cutlass.range_constexpr(cfg.tile_t // self.x_rows_pp):
            if cutlass.const_expr(cfg.act_nvfp4):
                dequant_nvfp4_chunk(xp[None, p], xs[None, p], xd[None, p])
            row = x_row_in_tile + p * self.x_rows_pp
            if row >= count:
                xd[None, p].fill(0.0)
            if x_row_in_tile < cfg.tile_t:
                # K pairs (kk, kk + 1) stay adjacent columns: one 32-bit store per pair
                pairs = cute.zipped_divide(sB[row, None, stage], (2,))
                src = cute.zipped_divide(xd[None, p], (2,))
                for i in cutlass.range_constexpr(self.x_chunk // 2):
                    col = permuted_column(x_part * self.x_chunk + 2 * i)
                    cute.autovec_copy(src[None, i], pairs[None, col // 2])
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.sync_threads()

    @cute.jit
    def stage_tile(self, stage, w_regs, x_regs, tAsA, tBsB, x_row_in_tile, count):
        """Register tile -> BF16 stage ``stage`` once wgmma(i-2), the stage's last reader, completed."""
        warpgroup.wait_group(1)
        cute.arch.sync_threads()
        self.decode_to_stage(stage, w_regs, x_regs, tAsA, tBsB, x_row_in_tile, count)

    @cute.jit
    def decode_to_stage(self, stage, w_regs, x_regs, tAsA, tBsB, x_row_in_tile, count):
        """Decode the raw register tile (W, and NVFP4 X) into BF16 stage ``stage``, zero X rows past
        ``count``, and make the stage visible to wgmma (proxy fence + barrier)."""
        cfg = self.cfg
        wp, ws, wd = w_regs
        xp, xs, xd = x_regs
        for p in cutlass.range_constexpr(cfg.tile_w // self.w_rows_pp):
            dequant_nvfp4_chunk(wp[None, p], ws[None, p], wd[None, p])
            cute.autovec_copy(wd[None, p], tAsA[None, p, 0, stage])
        for p in cutlass.range_constexpr(cfg.tile_t // self.x_rows_pp):
            if cutlass.const_expr(cfg.act_nvfp4):
                dequant_nvfp4_chunk(xp[None, p], xs[None, p], xd[None, p])
            if x_row_in_tile + p * self.x_rows_pp >= count:
                xd[None, p].fill(0.0)
            if x_row_in_tile < cfg.tile_t:
                cute.autovec_copy(xd[None, p], tBsB[None, p, 0, stage])
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.sync_threads()

    @cute.jit
    def issue_mma(self, stage, tCrA, tCrB, acc, tiled_mma: cute.TiledMma):
        """wgmma over BF16 stage ``stage`` (one commit group)."""
        warpgroup.fence()
        for kb in cutlass.range_constexpr(cute.size(tCrA, mode=[2])):
            cute.gemm(tiled_mma, acc, tCrA[None, None, kb, stage], tCrB[None, None, kb, stage], acc)
        warpgroup.commit_group()

    @cute.jit
    def epilogue(self, acc, thr_mma, mXg, mWg, mW3g, mRows, mRouteW, mY, e, start, count):
        """``acc * gx[row] * gw`` -> ``Y^T[n_row, start + c]`` for the tile's columns ``c < count``.

        gate_up + SwiGLU: the accumulators of gate row r (wgmma M block 0) and up row r (block 1)
        sit in the same thread; each is rounded to BF16 (the reference's GEMM outputs), clamped,
        ``silu(gate) * up * routing weight`` is written as BF16 to ``h^T[bw * 64 + r, start + c]``.
        """
        cfg = self.cfg
        bw, _, bz = cute.arch.block_idx()
        mYt = mY
        if cutlass.const_expr(cfg.split > 1):
            mYt = mY[None, None, bz]
        cC = thr_mma.partition_C(cute.make_identity_tensor((cfg.tile_w, cfg.tile_t)))
        # the decoded operands carry 2**-DECODE_SHIFT each (_cute.dequant_nvfp4_chunk): undone here
        unscale = Float32(2.0 ** (DECODE_SHIFT * (2 if cfg.act_nvfp4 else 1)))
        gw = mWg[e] * unscale
        gw3 = gw
        if cutlass.const_expr(cfg.gate_up):
            gw3 = mW3g[e] * unscale
        if cutlass.const_expr(cfg.swiglu_limit is not None):
            limit = Float32(cfg.swiglu_limit)
            half = cute.size(acc, mode=[0])
            for v in cutlass.range_constexpr(half):
                r, c = cC[v, 0, 0]
                if c < count:
                    pos = start + c
                    gx = Float32(1.0)
                    if cutlass.const_expr(cfg.act_nvfp4):
                        gx = mXg[mRows[pos]] if cutlass.const_expr(cfg.gather) else mXg[pos]
                    g = (acc[v, 0, 0] * (gx * gw)).to(BFloat16).to(Float32)
                    u = (acc[v, 1, 0] * (gx * gw3)).to(BFloat16).to(Float32)
                    g = cute.arch.fmin(g, limit)
                    u = cute.arch.fmax(cute.arch.fmin(u, limit), -limit)
                    h = g / (Float32(1.0) + cute.math.exp(-g)) * u * mRouteW[pos]
                    mYt[bw * (cfg.tile_w // 2) + r, pos] = h.to(mY.element_type)
        else:
            for i in cutlass.range_constexpr(cute.size(acc)):
                r, c = cC[i]
                if c < count:
                    pos = start + c
                    scale = gw
                    if cutlass.const_expr(cfg.gate_up):
                        if r >= cfg.tile_w // 2:
                            scale = gw3
                    if cutlass.const_expr(cfg.act_nvfp4):
                        gx = mXg[mRows[pos]] if cutlass.const_expr(cfg.gather) else mXg[pos]
                        scale = gx * scale
                    mYt[bw * cfg.tile_w + r, pos] = (acc[i] * scale).to(mY.element_type)

    @cute.jit
    def load_tile(self, kt, gW, gW3, tWrP, tWrS, w_row0, w_part, gX, tXrP, tXrS, tXrD, x_rows, x_part):
        """Issue the 128-bit global loads of K tile ``kt`` into registers (W: :func:`load_w_chunk`)."""
        cfg = self.cfg
        for p in cutlass.range_constexpr(cfg.tile_w // self.w_rows_pp):
            off = p * self.w_rows_pp
            src = gW
            if cutlass.const_expr(cfg.gate_up and off >= cfg.tile_w // 2):
                src = gW3
                off -= cfg.tile_w // 2
            load_w_chunk(src, w_row0 + off, kt, cfg.tile_k, self.w_chunk, w_part, tWrP[None, p], tWrS[None, p])
        self.load_x(kt, gX, tXrP, tXrS, tXrD, x_rows, x_part)

    @cute.jit
    def load_x(self, kt, gX, tXrP, tXrS, tXrD, x_rows, x_part):
        """Issue the global loads of X's K tile ``kt`` (codes and scales, or BF16) into registers."""
        cfg = self.cfg
        chunk_x = kt * (cfg.tile_k // self.x_chunk) + x_part
        for p in cutlass.range_constexpr(cfg.tile_t // self.x_rows_pp):
            if cutlass.const_expr(cfg.act_nvfp4):
                cute.autovec_copy(gX[0][0, None, x_rows[p], chunk_x], tXrP[None, p])
                cute.autovec_copy(gX[1][0, None, x_rows[p], chunk_x], tXrS[None, p])
            else:
                cute.autovec_copy(gX[0][0, None, x_rows[p], chunk_x], tXrD[None, p])


def choose_config(m: int, n: int, k: int, act_nvfp4: bool) -> GemmConfig:
    """Tile shape and K split for a problem (a heuristic; every choice is a compile-key entry).

    Decode (m <= 64): 64 weight rows x 128 K per CTA and the K split that brings the grid closest
    to ``DECODE_CTAS_PER_SM`` (4) CTAs per SM without exceeding it -- one wave at the 5 CTAs per SM
    that shared memory allows -- capped so the float32 partials stay well below the weight bytes.
    Measured (H200, ``benchmarks/gemm_tune.py``, tiled weights): Flash wq_b m = 1 15.9 us at split 1
    (512 CTAs) vs 18.1 at split 4, the old choice (~16 CTAs per SM); m = 16 16.2 vs 20.7; wo_b m = 1
    17.0 us at split 8 (512 CTAs) vs 22.0 at split 4. Prefill: 128 x 128 tiles (a 256-token tile
    needs 256 accumulator registers per thread and spills); where those give fewer CTAs than SMs
    (small n at mid m: Flash wq_a, n = 1024, at m = 1024 has 64 -- 82-88 us on an H200 vs 18 us for
    XLA BF16, one CTA per SM on half the SMs), the K split goes up to 2 CTAs per SM with >= 8 K tiles
    each (wq_a m = 1024: split 4; wkv, n = 512: split 8). Measured (H200, session 7): wq_a m = 1024
    88.1 -> 39.4 us (W4A4), 82.4 -> 33.3 (W4A16); other splits not swept yet (``benchmarks/gemm_tune.py
    --m 256,1024`` does).
    """
    if m <= 64:
        tile_t = max(16, -(-m // 16) * 16)
        tile_w, tile_k = 64, 128
    else:
        tile_t, tile_w, tile_k = 128, 128, 64
    if n % tile_w:
        tile_w = 64
    k_tiles = k // tile_k
    ctas = (n // tile_w) * -(-m // tile_t)
    split = 1
    while ctas * split * 2 <= DECODE_CTAS_PER_SM * NUM_SMS and k_tiles % (2 * split) == 0 and 2 * split * m * 16 <= k:
        split *= 2
    if m > 64 and ctas < NUM_SMS:  # prefill tiles that leave SMs idle: split K, up to 2 CTAs per SM
        while ctas * split * 2 <= 2 * NUM_SMS and k_tiles % (2 * split) == 0 and k_tiles // (2 * split) >= 8:
            split *= 2
    cfg = with_env_prefetch(GemmConfig(tile_w, tile_t, tile_k, split, act_nvfp4), ctas, k_tiles)
    return with_env_w_regs(cfg)


def with_env_w_regs(cfg: GemmConfig) -> GemmConfig:
    """``cfg`` on the register-A path where it applies (decode tiles: token tile <= 64, K tile 128), unless
    ``$NVFP4JAX_GEMM_W_REGS`` is ``0`` (read at trace time; W then goes through shared-memory stages).

    Default since session 6 (H200, same process, W4A16 decode sweep): 4-19% faster on every V4 decode
    shape timed (Flash wq_b m = 1 14.8 vs 15.4 us, Pro wq_b 38.8 vs 41.7), MoE decode 7% (T = 1) to 20%
    (T = 64) faster; the whole quick GPU suite passed with it.
    """
    if os.environ.get(W_REGS_ENV, "1") == "0" or cfg.tile_t > 64:
        return cfg
    w_regs = dataclasses.replace(cfg, w_regs=True)
    return w_regs if GemmNvfp4Sm90.can_implement(w_regs) else cfg


def with_env_prefetch(cfg: GemmConfig, ctas: int, k_tiles: int, prefetch: int | None = None) -> GemmConfig:
    """``cfg`` with ``prefetch`` (default ``$NVFP4JAX_GEMM_PREFETCH``, else 1) register-prefetched K tiles.

    Decode configs (token tile <= 64): the K split
    shrinks while a CTA would have fewer than ``2 * prefetch`` K tiles or there would be more than
    ~8 CTAs per SM (the deeper prefetch, not the CTA count, now keeps bytes in flight). Prefill
    configs (128 x 128 x 64, 245-250 registers): depth 2 at most (ptxas: no spills at 2, spills at 3),
    split unchanged. Unmeasured first guess for a GPU A/B (``benchmarks/gemm_tune.py``).
    """
    if prefetch is None:
        prefetch = int(os.environ.get(PREFETCH_ENV, "1") or 1)
    if prefetch < 2:
        return cfg
    if cfg.tile_t > 64:
        return dataclasses.replace(cfg, prefetch=2)
    prefetch = min(prefetch, 4)
    split = cfg.split
    while split > 1 and (k_tiles // split < 2 * prefetch or ctas * split > 8 * NUM_SMS):
        split //= 2
    return dataclasses.replace(cfg, split=split, prefetch=prefetch)


def as_tiled(w: NVFP4Tensor) -> NVFP4Tensor:
    """``w`` in the kernels' tile layout. A row-major weight is rearranged here, inside the caller's
    program -- an extra read and write of the weight on every call; models arrange their weights
    once instead (:func:`nvfp4jax.ops.prepare_weights`, done by the model loaders)."""
    return w if w.layout == "tiled" else tile_weight(w)


_NO_GROUPS = (None,) * 6  # W3 (values, scales, global), rows, tiles, routing weights


@functools.cache
def _kernel(cfg: GemmConfig) -> GemmNvfp4Sm90:
    return GemmNvfp4Sm90(cfg)


def supports(x, w) -> str | None:
    """None when the kernel runs ``nvfp4_gemm(x, w)``, else why not (ops falls back / raises)."""
    if not isinstance(w, NVFP4Tensor) or len(w.shape) != 2 or w.global_scale.ndim != 0:
        return "the weight must be a 2-D NVFP4Tensor [n, k] with a per-tensor global scale"
    n, k = w.shape
    if n % 64 or k % 128:
        return f"the GEMM kernel needs n % 64 == 0 and k % 128 == 0, got weight shape {w.shape}"
    if isinstance(x, NVFP4Tensor):
        if x.values.ndim != 2 or x.shape[1] != k or x.global_scale.shape != (x.shape[0],):
            return f"NVFP4 x {x.shape} (global {x.global_scale.shape}) does not match w {w.shape}"
    elif x.ndim != 2 or x.shape[1] != k:
        return f"x {x.shape} and w {w.shape} disagree on k"
    elif x.dtype != jnp.bfloat16:
        return f"the GEMM kernel takes bfloat16 or NVFP4 x, got {x.dtype}"
    return None


def linear_supports(x, w) -> str | None:
    """None when the kernels run :func:`nvfp4_linear` ``(x, w)``: the GEMM kernel takes the quantized ``x``
    (any float ``x``: a quantize the kernel cannot run falls back on its own, logged by ``ops``)."""
    if x.ndim != 2:
        return f"x must be [m, k], got shape {x.shape}"
    return supports(jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), w)


def nvfp4_linear(x: Float[Array, "m k"], w: NVFP4Tensor, out_dtype=jnp.bfloat16) -> Float[Array, "m n"]:
    """Recipe ``nvfp4``'s linear on the kernels: :func:`nvfp4_gemm` of ``quantize_nvfp4(x)``, the math of
    :func:`nvfp4jax.ref.gemm.nvfp4_linear`. Where the GEMM runs on gemm_ws (:func:`uses_ws_prefill`), which
    reads X as BF16, the quantize kernel writes X decoded (``quantize.quantize_nvfp4_decoded``: the same
    codes through the same decoder, so the same bits as ``gemm_ws.dequant_rows`` of the NVFP4 X) and the
    codes never go through HBM: one pass writing 2 bytes per value instead of a quantize writing 0.5625 and
    a ``dequant_rows`` reading those and writing 2."""
    from nvfp4jax import ops
    from nvfp4jax.kernels import gemm_ws, quantize as kq

    reason = linear_supports(x, w)
    if reason is not None:
        raise ValueError(f"nvfp4_linear kernel: {reason}")
    m, n = x.shape[0], w.shape[0]
    if m > 0 and kq.supports(x) is None and uses_ws_prefill(m, n, out_dtype):
        xd, _, gx = kq.quantize_nvfp4_decoded(x)
        return gemm_ws.nvfp4_gemm_ws_decoded(xd, gx, w).astype(out_dtype)
    return nvfp4_gemm(ops.quantize_nvfp4(x), w, out_dtype)


def prefill_mode() -> str:
    """``$NVFP4JAX_GEMM_PREFILL`` (read at trace time; unset or empty: ``auto``), checked."""
    mode = os.environ.get(PREFILL_ENV, "") or "auto"
    if mode not in PREFILL_MODES:
        raise ValueError(f"{PREFILL_ENV}={mode!r}; choose one of {PREFILL_MODES}")
    return mode


def ws_dense_auto(m: int, n: int) -> bool:
    """The dense GEMMs' rule for ``$NVFP4JAX_GEMM_PREFILL=auto``: gemm_ws from :data:`WS_DENSE_MIN_M` rows, or
    from :data:`WS_DENSE_MID_M` rows once ``m * n >= WS_DENSE_MID_MN`` (the measured wins)."""
    return m >= WS_DENSE_MIN_M or (m >= WS_DENSE_MID_M and m * n >= WS_DENSE_MID_MN)


def uses_ws_prefill(m: int, n: int, out_dtype, *, auto: bool | None = None, min_m: int = WS_MIN_M) -> bool:
    """Whether a GEMM of ``m`` rows (per expert, for the grouped ones) runs on the warp-specialized
    prefill kernel (:mod:`nvfp4jax.kernels.gemm_ws`) rather than this module's one-warpgroup kernel.

    Only calls with ``m >= min_m`` (:data:`WS_MIN_M`; the grouped GEMMs may pass less,
    :func:`nvfp4jax.kernels.moe.ws_min_rows`), ``n % 128 == 0`` and a BF16 output can; of those, by
    :func:`prefill_mode`: ``ws`` / ``ws-persistent`` all, ``one-warpgroup`` none, ``auto`` (the default)
    those where it measured faster: ``auto`` when the caller gives it (the grouped GEMMs' rule,
    :func:`nvfp4jax.kernels.moe.ws_grouped_auto`), else :func:`ws_dense_auto`."""
    mode = prefill_mode()
    if m < min_m or n % 128 or jnp.dtype(out_dtype) != jnp.bfloat16:
        return False
    if mode == "auto":
        return ws_dense_auto(m, n) if auto is None else auto
    return mode != "one-warpgroup"


def nvfp4_gemm(
    x: NVFP4Tensor | Float[Array, "m k"], w: NVFP4Tensor, out_dtype=jnp.bfloat16
) -> Float[Array, "m n"]:
    """``Y = X @ W^T`` (sm_90a kernel); same signature and math as :func:`nvfp4jax.ref.gemm.nvfp4_gemm`.

    ``w``: NVFP4 ``[n, k]``, per-tensor global scale, ``n % 64 == 0``, ``k % 128 == 0``.
    ``x``: NVFP4 ``[m, k]`` with per-row global scales, or BF16 ``[m, k]``; any ``m``.
    Returns ``out_dtype`` (BF16 by default) ``[m, n]``; float32 accumulation throughout.
    """
    reason = supports(x, w)
    if reason is not None:
        raise ValueError(f"nvfp4_gemm kernel: {reason}")
    m, (n, k) = x.shape[0], w.shape
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    if uses_ws_prefill(m, n, out_dtype):
        from nvfp4jax.kernels import gemm_ws  # imports this module

        return gemm_ws.nvfp4_gemm_ws(x, w)
    act_nvfp4 = isinstance(x, NVFP4Tensor)
    cfg = choose_config(m, n, k, act_nvfp4)
    if act_nvfp4:
        xs = (x.values, jax.lax.bitcast_convert_type(x.scales, jnp.uint8), x.global_scale)
    else:
        xs = (x, None, None)
    w = as_tiled(w)
    ws = (w.values, jax.lax.bitcast_convert_type(w.scales, jnp.uint8), w.global_scale.reshape(1))
    if cfg.split > 1:
        out = jax.ShapeDtypeStruct((cfg.split, m, n), jnp.float32)
        spec = TensorSpec(mode=(2, 1, 0))
    else:
        out = jax.ShapeDtypeStruct((m, n), jnp.float32 if out_dtype == jnp.float32 else jnp.bfloat16)
        spec = TensorSpec(mode=(1, 0))
    y = cutlass_call(_kernel(cfg), output_shape_dtype=out, output_spec=spec)(*xs, *ws, *_NO_GROUPS)
    if cfg.split > 1:
        y = jnp.sum(y, axis=0)
    return y.astype(out_dtype)

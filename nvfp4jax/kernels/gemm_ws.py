"""Warp-specialized NVFP4 prefill GEMM ``Y = X @ W^T`` (sm_90a): TMA for X, a decode warpgroup for W.

Same math as :mod:`nvfp4jax.kernels.gemm` (and :func:`nvfp4jax.ref.gemm.nvfp4_gemm`): W NVFP4 ``[n, k]``
in the kernels' tile layout with a per-tensor global scale, decoded exactly to
``e2m1 * e4m3 * 2**-DECODE_SHIFT`` in BF16; X BF16 ``[m, k]``; float32 accumulation; the epilogue
multiplies by ``gw * 2**DECODE_SHIFT`` (and by a per-row ``gx`` when ``x_scaled``) and rounds to BF16.
Recipe ``nvfp4`` (NVFP4 X) reaches this kernel through :func:`dequant_rows`, which decodes X once per
call (exact, the same ``2**-DECODE_SHIFT`` convention) instead of once per CTA column as the
one-warpgroup kernel does (n / 128 times).

Why a second kernel: the one-warpgroup kernel of :mod:`gemm` decodes, stores, fences and multiplies in
the same 128 threads, so its tensor cores idle while a K tile is decoded (prefill at 31-40% of the
roofline, 0.4-0.7x XLA BF16 on an H200, session 7). Here the roles are split across three warpgroups
(384 threads, one CTA per SM):

- warpgroup 0, the producer (``PRODUCER_REGS`` registers after ``setmaxnreg``): one elected thread
  issues the TMA load of X's ``[tile_t, 64]`` box into the swizzled B stage (rows past ``m`` arrive as
  zeros); all 128 threads decode W's codes and scales of the current K tile and store it to the
  swizzled A stage (16-byte stores, :func:`gemm.store_copy`). W's packed bytes arrive by TMA into shared
  raw slots up to ``2 * RAW_SLOTS`` K tiles ahead (the default since session 10,
  :meth:`GemmPrefillSm90.produce_w_tma`), or with ``NVFP4JAX_GEMM_WS_W=regs`` by 128-bit loads into
  registers one K tile ahead (:meth:`GemmPrefillSm90.produce`).
- warpgroups 1 and 2, the consumers (``CONSUMER_REGS``): wgmma ``64 x tile_t x 16``, one 64-row M block of
  W each, A and B from shared memory, float32 accumulators (``tile_t / 2`` per thread).

Persistent option (``PrefillConfig.persistent``, ``NVFP4JAX_GEMM_PREFILL=ws-persistent``; measured no
faster than one CTA per tile, session 8): ``NUM_SMS`` CTAs
loop over the tiles (W-tile fastest, as the one-CTA-per-tile grid orders them); the pipeline's stage
and parities run on across a CTA's tiles (``done``), so the producer fills stages for the next tile
while the consumers finish the current one (its last stage is released after ``wait_group(0)``) and
run its epilogue, which then needs its own staging buffer (3 stages at 256 tokens instead of 4). Hides
each tile's pipeline fill and epilogue behind work of the next, which matters for short K loops
(k = 1024: 16 K tiles).

``STAGES`` K tiles of 64 are in flight. Per stage two mbarriers: ``full`` (129 arrivals: the TMA
thread's ``arrive.expect_tx`` plus the 128 producer threads after their ``fence.proxy.async``;
completes when the X bytes have landed too) and ``empty`` (8 arrivals, lane 0 of each consumer warp
once ``wgmma.wait_group`` says the stage's wgmma are done). The epilogue goes through a
``[tile_t, 128 + 8]`` BF16 staging tile (the B stages with one tile per CTA, its own buffer when
persistent; the padding spreads a column's stores over the banks), so that Y leaves in 16-byte stores
of whole 256-byte row segments instead of the 2-byte column stores of the one-warpgroup kernel.

Grouped mode (the MoE GEMMs at prefill sizes, :func:`nvfp4jax.kernels.moe.grouped_gemm_ws`): ``W [experts,
n, k]``; each CTA column takes ``(expert, first row, rows)`` from the tile table of :mod:`moe` and
TMA-loads X from its first row (X's rows sorted by expert: the L1 input is gathered into that order by
the caller, since TMA reads whole boxes). ``gate_up``: the CTA's 128 W rows are 64 rows of ``W1``
(consumer warpgroup 1) and the same 64 rows of ``W3`` (warpgroup 2); both stage their BF16-rounded
products and the store pass computes ``silu(min(g, l)) * clip(u, +-l) * routing weight`` per element
(the reference's order of roundings), writing 64 columns of ``h``.

Limits: ``n % 128 == 0`` (gate_up: ``n % 64``), ``k % 64 == 0`` (the tile layout needs ``k % 128``), any
``m``; BF16 output.

Status: compiles for sm_90a on the CPU (``tests/kernels/test_compile.py``: 168 registers at launch, no
spills, dense and grouped); its mbarrier protocol (parities, arrival counts) is simulated under random
interleavings (``tests/kernels/test_gemm_ws_protocol.py``); the JAX wiring around it is checked on the
CPU against the reference with emulated kernels (``tests/kernels/test_gemm_ws_glue.py``). First GPU run
(H200, session 8): its GPU tests passed (``tests/kernels/test_gemm_ws.py``, 33 cases: dense W4A4 and
W4A16 in both modes up to 32768 x 1024 x 4096 and 300 x 7168 x 16384, ``dequant_rows`` bitwise, the
MoE layer on it, every row on one expert). Timed against the one-warpgroup kernel (Flash wq_a, n 1024,
k 4096; ``benchmarks/RESULTS.md``): faster at m = 16384 (W4A4 333 vs 423 us, W4A16 242 vs 385: 0.77x
XLA BF16), even at 4096, slower at 1024 (no K split; 64-token tiles); persistent mode no different.
So ``$NVFP4JAX_GEMM_PREFILL`` (read at trace time, :func:`gemm.uses_ws_prefill`) defaults to ``auto``:
dense calls where :func:`gemm.ws_dense_auto` says (from ``gemm.WS_DENSE_MIN_M`` rows, or from 128 once
``m * n >= 2^21``: session 13), grouped calls where
:func:`moe.ws_grouped_auto` says; ``ws`` / ``ws-persistent`` send every call with m > 64,
``one-warpgroup`` none.

What those timings showed (``TILE_CYCLES``): ~1400-1870 cycles per K tile whatever the token tile, so
the producer, not the tensor cores, sets the pace (its ~300 instructions per K tile and warp take far
fewer cycles), and what it waits for is most likely a global load's latency: W's loads are issued only
one K tile ahead, and the ``MEMBAR.ALL.CTA`` that ``fence.proxy.async`` compiles to (SASS) may also wait
for those in flight. Two consequences (session 8): (1) the token tile is chosen by waves x ``TILE_CYCLES``
(:func:`choose_prefill_config`, :func:`moe.ws_tile`), which gives 256-token tiles to Flash wq_a at
m = 4096 (one wave instead of two of 128) and to V4-Flash's MoE at T = 16384 (2 tiles per expert instead
of 3-4 of 128). Timed on an H200 in session 9: wq_a m = 4096 W4A16 61.9 us (99.7 with 128-token tiles;
60 predicted; 0.73x XLA BF16), V4-Flash MoE T = 16384 12.6 ms W4A16 (17.8; 12.5 predicted), so the dense
threshold is now 4096 rows. (2) W by TMA (``NVFP4JAX_GEMM_WS_W=tma``, :meth:`GemmPrefillSm90.produce_w_tma`):
the packed W of each 128-K chunk arrives in shared slots ``2 * RAW_SLOTS`` K tiles ahead and the
producer's only loads before its fence are from shared memory. Its first GPU run (session 9) hung: the
copies ran inside ``elect_one`` (see :meth:`GemmPrefillSm90.issue_w`); fixed (``test_compile.nested_elects``
checks every kernel). H200, session 10: its 17 GPU test cases and the kernel model's logits pass with it,
and it is 10-15% faster than W to registers on every measured shape (dense Flash wq_a, wq_b, wo_b,
shared w1/w3 and Pro wq_a at m = 16384: W4A16 0.88-1.16x XLA BF16, W4A4 0.62-1.07x; V4-Flash's MoE at
T = 16384 11.0 / 10.8 ms NVFP4 / W4A16, was 12.9 / 12.6), so it is the default (``NVFP4JAX_GEMM_WS_W=regs``
keeps the register path). That run also found V4-Pro's MoE (384 experts) failing with
CUDA_ERROR_ILLEGAL_INSTRUCTION: the bank's byte count overflowed an Int32 (:func:`byte_rows`); fixed, and
V4-Pro's MoE on its whole 384-expert bank passed on an H200 in session 11, either W path
(``tests/kernels/test_gemm_ws.py::test_moe_on_ws_whole_pro_bank``): 32.6 ms at T = 16384 (NVFP4), 36.3
with W to registers.
``TILE_CYCLES`` are still session 8's W-to-registers cycles (W by TMA: ~1600 at tile 256, Flash wq_a).
Session 11 tested the producer-bound reading directly, with two decode warpgroups (``NVFP4JAX_GEMM_WS_PRODUCERS=2``,
W by TMA only: each one 64-row pass; 512 threads, so a 256-row tile as two wgmma of N = 128): correct (its 13
GPU cases passed on an H200), but 3-15% slower on every dense and MoE shape timed, all with 256-row tiles
(``benchmarks/RESULTS.md``), so there the decode is not the limit. Removed then; back since session 12 as an
opt-in for 128-row tiles, where the consumers have half the wgmma work per K tile and the decode pace should
matter more: the MoE at 65-128 rows per expert runs at 32-33% of the bandwidth roofline (V4-Flash T = 4096,
one 128-row tile per expert) -- one decode warpgroup per SM turns ~8192 weights per ~1600-cycle K tile, ~0.7
TB/s of NVFP4 W across the chip. Not yet timed there (``gpu_session.sh ws-two``). The one-producer default now
stages the tail's rows in the tail's own B stages (the layout two producers need; GPU-tested in session 11).

Tail option (``PrefillConfig.tail``, MoE only; where :func:`nvfp4jax.kernels.moe.ws_tail_auto` says,
``NVFP4JAX_MOE_WS_TAIL=0`` / ``64`` forces it; its GPU tests passed on an H200 in session 11): a 256-row
tile takes up to 64 rows more. They arrive in a second TMA box
into their own B stages and go through a second wgmma (N = 64) into a second accumulator, both only in CTAs
whose tile has more than 256 rows; the epilogue stages them after the first 256. Why: at V4-Pro's T = 16384
(256 +- 16 rows per expert, uniform routing) 49% of the experts otherwise get a second 256-row tile for ~13
rows and decode their W twice (1.48 tiles per expert). Costs: 3 pipeline stages instead of 4 with W by TMA
(shared memory), consumers at 198 of their 200 registers (SASS, no spills). H200, session 11, T = 16384:
V4-Pro 26.9 ms with it against 32.6 (NVFP4; 1.00 tile per expert instead of 1.48), V4-Flash 13.8 against
11.2 (2 tiles per expert either way): a CTA of the tail kernel costs ~1.22x one without, hence the rule.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
import cuda.bindings.driver as cuda
from cutlass import BFloat16, Float32, Int32, Int64, Uint8
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.jax import cutlass_call
from cutlass.utils import LayoutEnum

from nvfp4jax.formats.nvfp4 import BLOCK, TILE_K, TILE_ROWS, NVFP4Tensor
from nvfp4jax.kernels import gemm as kg
from nvfp4jax.kernels._cute import DECODE_SHIFT, dequant_nvfp4_chunk

TILE_W = 128  # weight rows per CTA: two 64-row wgmma M blocks, one per consumer warpgroup
KSTAGE = 64  # K per pipeline stage (one 128-byte swizzle atom of BF16 per row)
STAGES = 4
WG = 128
THREADS = 3 * WG
#: registers per thread at launch: 384 threads share the SM's 65536 (ptxas: 168, a multiple of 8)
LAUNCH_REGS = 65536 // THREADS // 8 * 8
#: setmaxnreg moves registers through a per-CTA pool (SASS: USETMAXREG.DEALLOC/TRY_ALLOC.CTAPOOL): the
#: consumers' increase must be covered by what the producer releases, or TRY_ALLOC spins forever (the
#: first draft's 96 / 208 asked for 10240 of 9216: a hang). ptxas, sm_90a (``benchmarks/sass_stats.py
#: ws``): the producer's code uses 58 registers, the consumers' 152-166 (tile_t 256; W4A16, W4A4), no spills.
PRODUCER_REGS = 96
CONSUMER_REGS = 200
assert WG * (LAUNCH_REGS - PRODUCER_REGS) >= 2 * WG * (CONSUMER_REGS - LAUNCH_REGS), "register pool overdrawn"
#: ``PrefillConfig.producers == 2``: 512 threads, 128 registers each at launch; two producer warpgroups at 56
#: release exactly what the consumers' 200 take (2 x 128 x 72 = 2 x 128 x 72)
PRODUCERS_ENV = "NVFP4JAX_GEMM_WS_PRODUCERS"  # "1" (default) or "2": decode warpgroups (with_env_options)
PRODUCER_REGS_2 = 56


def threads(cfg: PrefillConfig) -> int:
    """Threads per CTA: the producer warpgroups and the two consumer warpgroups."""
    return (cfg.producers + 2) * WG


def launch_regs(cfg: PrefillConfig) -> int:
    """Registers per thread at launch: the SM's 65536 over :func:`threads` (a multiple of 8)."""
    return 65536 // threads(cfg) // 8 * 8


def producer_regs(cfg: PrefillConfig) -> int:
    return PRODUCER_REGS if cfg.producers == 1 else PRODUCER_REGS_2


assert 2 * WG * (128 - PRODUCER_REGS_2) >= 2 * WG * (CONSUMER_REGS - 128), "register pool overdrawn (2 producers)"
Y_PAD = 8  # BF16 elements of padding per staged output row
#: W by TMA (``PrefillConfig.w_tma``): raw slots of 128 K (one tile-layout K block: two pipeline stages)
#: for the CTA's 128 W rows = two 64-row blocks of 4096 code bytes + 512 scale bytes each
RAW_SLOTS = 2
#: ``PrefillConfig.tail``: rows past the 256-row tile (one more wgmma of N = 64; 3 stages then fit with W
#: by TMA, 4 with W to registers)
TAIL = 64
#: ``PrefillConfig.producers == 2``: a 256-row tile runs as ``tile_t = tail = SPLIT``, two wgmma of N = 128
#: (ptxas, 512 threads: one wgmma's operands must fit the launch's 128 registers, and N = 256 needs 154)
SPLIT = 128
W_ENV = "NVFP4JAX_GEMM_WS_W"  # "tma" (default) or "regs": how the producer loads W (with_env_options)
W_MODES = ("regs", "tma")
BLOCK_CODE_BYTES = TILE_ROWS * TILE_K // 2
BLOCK_SCALE_BYTES = TILE_ROWS * TILE_K // BLOCK
RAW_BYTES = 2 * (BLOCK_CODE_BYTES + BLOCK_SCALE_BYTES)  # one slot: expect_tx of its four copies


def byte_rows(shape, row_bytes: int):
    """Rows of ``row_bytes`` bytes in a tile-layout byte array of ``shape`` (``[..., tiles, 64, bytes]``),
    multiplied out tile by tile. Not ``cute.size(t) // row_bytes``: with the dynamic shapes ``cutlass_call``
    passes, ``cute.size`` is an Int32 product, and V4-Pro's W1 / W3 banks hold 384 x 3072 x 7168 / 2 =
    4.2e9 code bytes, past 2**31 (their rows of 64 bytes: 6.6e7). In session 10 that wrapped size gave the W-by-TMA
    descriptor a bogus extent: CUDA_ERROR_ILLEGAL_INSTRUCTION at V4-Pro's MoE layer. Python ints or DSL
    integers; every partial product here is at most the result."""
    *lead, rows, width = shape
    n = (rows * width) // row_bytes
    for d in reversed(lead):
        n = n * d
    return n


def free_parity(kt, stages: int):
    """Parity the producer waits for on ``empty[kt % stages]`` before writing K tile ``kt``: the phase
    completed by the consumers' release of tile ``kt - stages``; 1 for the first pass (a fresh barrier
    counts its preceding phase, parity 1, as complete). Python or DSL integers."""
    return ((kt // stages) + 1) % 2


def full_parity(kt, stages: int):
    """Parity the consumers wait for on ``full[kt % stages]`` before reading K tile ``kt``."""
    return (kt // stages) % 2


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    tile_t: int = 256  # tokens per CTA (wgmma N): 64..256, multiple of 64
    stages: int = STAGES
    x_scaled: bool = False  # per-row X global scales in the epilogue (X decoded by dequant_rows)
    grouped: bool = False  # W is [experts, n, k]; CTA columns take (expert, first row, rows) from a tile table
    gate_up: bool = False  # grouped MoE L1: a CTA's 128 W rows are 64 rows of W1 and the same 64 of W3
    swiglu_limit: float | None = None  # gate_up: epilogue silu(min(g, l)) * clip(u, +-l) * routing weight
    persistent: bool = False  # NUM_SMS CTAs looping over the tiles (own staging buffer), else one CTA per tile
    w_tma: bool = False  # W's packed bytes by TMA into RAW_SLOTS shared slots, else 128-bit loads to registers
    tail: int = 0  # rows per CTA after the tile_t ones, in a second wgmma (N = tail) on their own B stages,
    # issued only by CTAs with more than tile_t rows (rows_per_tile): TAIL after 256 (grouped), or 128 after 128
    # (SPLIT: a 256-row tile as two wgmma of N = 128, what two producers need); 0: none
    producers: int = 1  # decode warpgroups: 1, or 2 (W by TMA only: each decodes one of the two 64-row passes)


def rows_per_tile(cfg: PrefillConfig) -> int:
    """X rows a CTA takes: ``tile_t``, plus ``tail`` (the tile table's capacity per entry)."""
    return cfg.tile_t + cfg.tail


def staging_elems(cfg: PrefillConfig) -> int:
    """BF16 elements of the epilogue's staging tile ``[rows_per_tile, 128 + Y_PAD]``."""
    return rows_per_tile(cfg) * (TILE_W + Y_PAD)


def smem_bytes(cfg: PrefillConfig) -> int:
    own_staging = 2 * staging_elems(cfg) if cfg.persistent else 0
    raw = RAW_SLOTS * (RAW_BYTES + 8) + 256 if cfg.w_tma else 0
    tail = 1024 if cfg.tail else 0  # the tail's B stages: a second 1024-byte-aligned region
    return cfg.stages * (TILE_W + rows_per_tile(cfg)) * KSTAGE * 2 + 16 * cfg.stages + own_staging + raw + tail + 1024


def can_implement(cfg: PrefillConfig) -> bool:
    return (cfg.tile_t % 64 == 0 and 64 <= cfg.tile_t <= 256 and cfg.stages >= 2
            and smem_bytes(cfg) <= 227 * 1024
            # one tile per CTA: the epilogue's staging tile reuses the B stages (the tail's rows its own)
            and (cfg.persistent or (cfg.tile_t * (TILE_W + Y_PAD) <= cfg.stages * cfg.tile_t * KSTAGE))
            and (cfg.grouped or not cfg.gate_up) and (cfg.gate_up == (cfg.swiglu_limit is not None))
            # the tail: a second TMA box and wgmma of TAIL rows after a full 256-row tile, MoE only
            and (cfg.tail == 0 or (not cfg.persistent and ((cfg.tail == TAIL and cfg.tile_t == 256 and cfg.grouped)
                                                           or cfg.tail == cfg.tile_t == SPLIT)))
            # two decode warpgroups: one 64-row pass each, W's bytes by TMA (the slots both read)
            and (cfg.producers == 1 or (cfg.producers == 2 and cfg.w_tma and not cfg.persistent)))


class GemmPrefillSm90:
    """``Y[m, n] = (X[m, k] W[n, k]^T) * gw (* gx[m])``, W NVFP4 tiled, X BF16; see the module docstring."""

    def __init__(self, cfg: PrefillConfig):
        if not can_implement(cfg):
            raise ValueError(f"unsupported prefill config {cfg}")
        self.cfg = cfg
        # W: 64 rows x 2 chunks of 32 K values per pass, 2 passes per 128-row stage
        self.w_rows_pp, self.w_chunk = kg._chunk(TILE_W, KSTAGE, 32)
        self.w_passes = TILE_W // self.w_rows_pp
        # weight rows of the output per CTA column: 64 h columns for gate_up (W1 and W3 rows pair up)
        self.out_w = TILE_W // 2 if cfg.gate_up else TILE_W

    @cute.jit
    def __call__(self, stream: cuda.CUstream, mX, mXg, mWv, mWs, mWg, mW3v, mW3s, mW3g, mTiles, mRouteW, mY):
        """Dense: ``X [m, k]`` BF16, ``W [n, k]``, ``Y [m, n]``. Grouped: ``W [experts, n, k]`` (and ``W3``),
        ``mTiles [tiles, 3]`` int32 ``(expert, first row, rows)`` per CTA column over X's rows (sorted by
        expert), ``mRouteW [rows]`` float32 (SwiGLU); ``Y [rows, n]`` (gate_up: ``h [rows, n]``)."""
        cfg = self.cfg
        tile_mnk = (TILE_W, cfg.tile_t, KSTAGE)
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32, (2, 1, 1), (64, cfg.tile_t))
        sA_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, tile_mnk, BFloat16, cfg.stages)
        sB_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, tile_mnk, BFloat16, cfg.stages)
        tma_atom, mX_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mX, cute.slice_(sB_layout, (None, None, 0)), (cfg.tile_t, KSTAGE))
        # the tail (cfg.tail rows after the tile_t ones): its own B stages, TMA box and wgmma (N = tail)
        tail_args = (None,) * 4
        tail_elems = 8
        if cutlass.const_expr(cfg.tail > 0):
            sBt_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (TILE_W, cfg.tail, KSTAGE), BFloat16,
                                                       cfg.stages)
            tma_atom_t, mX_tma_t = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), mX, cute.slice_(sBt_layout, (None, None, 0)), (cfg.tail, KSTAGE))
            tiled_mma_t = sm90_utils.make_trivial_tiled_mma(
                BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32, (2, 1, 1), (64, cfg.tail))
            tail_args = (tma_atom_t, mX_tma_t, tiled_mma_t, sBt_layout)
            tail_elems = cute.cosize(sBt_layout)
        w_tmas = (None,) * 8
        if cutlass.const_expr(cfg.w_tma):
            w_tmas = self.w_tma_atoms(mWv, mWs) + (
                self.w_tma_atoms(mW3v, mW3s) if cutlass.const_expr(cfg.gate_up) else (None,) * 4)
        raw_slots = RAW_SLOTS if cfg.w_tma else 1

        @cute.struct
        class SharedStorage:
            full: cute.struct.MemRange[Int64, cfg.stages]
            empty: cute.struct.MemRange[Int64, cfg.stages]
            raw_full: cute.struct.MemRange[Int64, raw_slots]
            sA: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sA_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sB_layout)], 1024]
            sBt: cute.struct.Align[cute.struct.MemRange[BFloat16, tail_elems], 1024]
            sY: cute.struct.Align[cute.struct.MemRange[BFloat16, staging_elems(cfg) if cfg.persistent else 8], 128]
            # W by TMA: per slot two 64-row blocks of codes [64, 64] bytes, then of scales [64, 8] bytes
            raw_codes: cute.struct.Align[cute.struct.MemRange[Uint8, 2 * BLOCK_CODE_BYTES * raw_slots if cfg.w_tma
                                                              else 16], 128]
            raw_scales: cute.struct.Align[cute.struct.MemRange[Uint8, 2 * BLOCK_SCALE_BYTES * raw_slots if cfg.w_tma
                                                               else 16], 128]

        self.shared_storage = SharedStorage
        # tiles in W-tile-fastest order (consecutive CTAs share X's token tile)
        if cutlass.const_expr(cfg.grouped):
            tiles_w, tiles_t = mWv.shape[1] * TILE_ROWS // self.out_w, mTiles.shape[0]
        else:
            per_tile = rows_per_tile(cfg)
            tiles_w, tiles_t = mWv.shape[0] * TILE_ROWS // TILE_W, (mX.shape[0] + per_tile - 1) // per_tile
        ctas = tiles_w * tiles_t
        if cutlass.const_expr(cfg.persistent):
            ctas = cutlass.min(ctas, kg.NUM_SMS)
        self.kernel(tma_atom, mX_tma, mXg, mWv, mWs, mWg, mW3v, mW3s, mW3g, mTiles, mRouteW, mY, tiled_mma,
                    sA_layout, sB_layout, tiles_w, tiles_t, *w_tmas, *tail_args).launch(grid=[ctas, 1, 1],
                                                                           block=[threads(cfg), 1, 1],
                                                                           stream=stream)

    def w_tma_atoms(self, mWv: cute.Tensor, mWs: cute.Tensor):
        """TMA atoms and tensors for W's tile layout read as rows of bytes: codes ``[blocks * 64, 64]`` (one
        64 x 128 tile per ``[64, 64]`` box) and scales ``[blocks * 32, 16]`` (a tile's 512 scale bytes per
        ``[32, 16]`` box: TMA boxes need rows of at least 16 bytes); ``blocks`` = every 64-row x 128-K tile
        of ``W`` (all experts), numbered in memory order."""
        op = cpasync.CopyBulkTensorTileG2SOp()
        codes = cute.make_tensor(mWv.iterator, cute.make_layout((byte_rows(mWv.shape, 64), 64), stride=(64, 1)))
        scales = cute.make_tensor(mWs.iterator, cute.make_layout((byte_rows(mWs.shape, 16), 16), stride=(16, 1)))
        atom_c, tma_c = cpasync.make_tiled_tma_atom(op, codes, cute.make_layout((64, 64), stride=(64, 1)), (64, 64))
        atom_s, tma_s = cpasync.make_tiled_tma_atom(op, scales, cute.make_layout((32, 16), stride=(16, 1)), (32, 16))
        return atom_c, tma_c, atom_s, tma_s

    @cute.kernel
    def kernel(self, tma_atom: cute.CopyAtom, mX: cute.Tensor, mXg, mWv: cute.Tensor, mWs: cute.Tensor,
               mWg: cute.Tensor, mW3v, mW3s, mW3g, mTiles, mRouteW, mY: cute.Tensor, tiled_mma: cute.TiledMma,
               sA_layout: cute.ComposedLayout, sB_layout: cute.ComposedLayout, tiles_w, tiles_t,
               atom_wc, tma_wc, atom_ws, tma_ws, atom_w3c, tma_w3c, atom_w3s, tma_w3s,
               tma_atom_t, mX_t, tiled_mma_t, sBt_layout):
        cfg = self.cfg
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        storage = cutlass.utils.SmemAllocator().allocate(self.shared_storage)
        full = storage.full.data_ptr()
        empty = storage.empty.data_ptr()
        raw_full = storage.raw_full.data_ptr()
        if warp == 0:
            cpasync.prefetch_descriptor(tma_atom)
            with cute.arch.elect_one():
                for s in cutlass.range_constexpr(cfg.stages):
                    cute.arch.mbarrier_init(full + s, cfg.producers * WG + 1)
                    cute.arch.mbarrier_init(empty + s, 2 * WG // 32)
                if cutlass.const_expr(cfg.w_tma):
                    for s in cutlass.range_constexpr(RAW_SLOTS):
                        cute.arch.mbarrier_init(raw_full + s, 1)  # the issuing thread's arrive.expect_tx
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sA = storage.sA.get_tensor(sA_layout.outer, swizzle=sA_layout.inner)
        sB = storage.sB.get_tensor(sB_layout.outer, swizzle=sB_layout.inner)
        # the tail's TMA atom, X view and B stages (cfg.tail), else Nones
        xt = (None, None, None)
        if cutlass.const_expr(cfg.tail > 0):
            xt = (tma_atom_t, mX_t, storage.sBt.get_tensor(sBt_layout.outer, swizzle=sBt_layout.inner))
        # one tile per CTA: the staging tile reuses the B stages; persistent: its own buffer, since the
        # producer already fills the stages for the CTA's next tile during the epilogue
        stage_ptr = storage.sY.data_ptr() if cutlass.const_expr(cfg.persistent) else storage.sB.data_ptr()
        stage_ptr = (stage_ptr, storage.sBt.data_ptr())  # the tail's rows: staged in the tail's B stages
        k_tiles = mWs.shape[cute.rank(mWs) - 3] * (TILE_K // KSTAGE)
        bid, _, _ = cute.arch.block_idx()
        nctas, _, _ = cute.arch.grid_dim()
        # K tiles this CTA has pipelined so far: stage and parities continue across its tiles
        done = Int32(0)
        if warp < cfg.producers * WG // 32:
            cute.arch.warpgroup_reg_dealloc(producer_regs(cfg))
            for tile in cutlass.range(bid, tiles_w * tiles_t, nctas, unroll=1):
                bw, bt = tile % tiles_w, tile // tiles_w
                e, start, count = self.tile_rows(mX, mTiles, bt)
                if count > 0:
                    wv, ws, w3v, w3s = mWv, mWs, mWv, mWs
                    if cutlass.const_expr(cfg.grouped):
                        wv, ws = mWv[e, None, None, None, None], mWs[e, None, None, None, None]
                        w3v, w3s = wv, ws
                    if cutlass.const_expr(cfg.gate_up):
                        w3v, w3s = mW3v[e, None, None, None, None], mW3s[e, None, None, None, None]
                    if cutlass.const_expr(cfg.w_tma):
                        self.produce_w_tma(tma_atom, mX, mWv, sA, sB, full, empty, k_tiles, bw, e, start, done,
                                           storage, raw_full, (atom_wc, tma_wc, atom_ws, tma_ws),
                                           (atom_w3c, tma_w3c, atom_w3s, tma_w3s), xt, count)
                    else:
                        self.produce(tma_atom, mX, wv, ws, w3v, w3s, sA, sB, full, empty, k_tiles, bw, start, done,
                                     xt, count)
                    done += k_tiles
        else:
            cute.arch.warpgroup_reg_alloc(CONSUMER_REGS)
            for tile in cutlass.range(bid, tiles_w * tiles_t, nctas, unroll=1):
                bw, bt = tile % tiles_w, tile // tiles_w
                e, start, count = self.tile_rows(mX, mTiles, bt)
                if count > 0:
                    self.consume(mXg, mWg, mW3g, mRouteW, mY, sA, sB, stage_ptr, full, empty, tiled_mma, k_tiles,
                                 bw, e, start, count, done, tiled_mma_t, xt[2])
                    done += k_tiles

    @cute.jit
    def tile_rows(self, mX: cute.Tensor, mTiles, bt):
        """(expert, first X row, rows) of token tile ``bt``: from the tile table (grouped), else the
        dense tile ``[bt * rows_per_tile, ...)`` clipped to X's rows."""
        cfg = self.cfg
        e = Int32(0)
        start = bt * rows_per_tile(cfg)
        count = cutlass.min(mX.shape[0] - start, rows_per_tile(cfg))
        if cutlass.const_expr(cfg.grouped):
            e = mTiles[bt, 0]
            start = mTiles[bt, 1]
            count = mTiles[bt, 2]
        return e, start, count

    @cute.jit
    def produce(self, tma_atom: cute.CopyAtom, mX: cute.Tensor, wv, ws, w3v, w3s, sA: cute.Tensor,
                sB: cute.Tensor, full, empty, k_tiles, bw, start, done, xt, count):
        """Warpgroup 0, one tile: per K tile, wait for its stage to be free, TMA X into it, decode W into
        it. ``done``: K tiles this CTA pipelined before this tile (stage and parity continue); ``xt``,
        ``count``: the tail (:meth:`producer_setup`) and the tile's rows."""
        tXsX, tXgX, w_row_in_pass, w_part, tAsA, bufs, tWrD, xtail = self.producer_setup(
            tma_atom, mX, sA, sB, start, xt, count)
        # pass p covers tile rows 64p .. 64p + 63: W rows bw * 128 + those, or (gate_up) the same 64 rows
        # of W1 then of W3
        w_row0 = bw * self.out_w + w_row_in_pass
        gW = (cute.local_tile(wv, (1, 1, 1, self.w_chunk // 2), (None,) * 4),
              cute.local_tile(ws, (1, 1, 1, self.w_chunk // BLOCK), (None,) * 4))
        gW3 = (cute.local_tile(w3v, (1, 1, 1, self.w_chunk // 2), (None,) * 4),
               cute.local_tile(w3s, (1, 1, 1, self.w_chunk // BLOCK), (None,) * 4))

        self.load_w(0, gW, gW3, bufs[0], w_row0, w_part)
        # two K tiles per trip so that the register buffer of each is static
        for kt0 in cutlass.range(0, k_tiles, 2, unroll=1):
            for j in cutlass.range_constexpr(2):
                kt = kt0 + j
                if kt < k_tiles:
                    if kt + 1 < k_tiles:
                        self.load_w(kt + 1, gW, gW3, bufs[1 - j], w_row0, w_part)
                    self.fill_stage(tma_atom, tXsX, tXgX, full, empty, kt, done + kt, bufs[j], tWrD, tAsA, xtail)

    def producer_setup(self, tma_atom: cute.CopyAtom, mX: cute.Tensor, sA: cute.Tensor, sB: cute.Tensor, start,
                       xt, count):
        """What both producers use (trace time): X's TMA views (the ``[tile_t, 64]`` box at row ``start``,
        K tile ``kt`` -> B stage ``s``; rows past X's end read as zeros), this thread's (row in the pass,
        chunk) of W as :func:`gemm.thread_coords` (plain order for K tiles of 64), its view of the A stages
        for the 16-byte stores, and its register buffers: two K tiles of codes and scales, one decoded.
        Last, the tail's ``(atom, smem view, gmem view, copy it)`` (``cfg.tail``: the ``[tail, 64]`` box at
        row ``start + tile_t`` into the tail's B stage, copied only when the tile has more than ``tile_t``
        rows), else None."""
        cfg = self.cfg
        tidx, _, _ = cute.arch.thread_idx()
        gX = cute.local_tile(cute.domain_offset((start, 0), mX), (cfg.tile_t, KSTAGE), (0, None))
        tXsX, tXgX = cpasync.tma_partition(tma_atom, 0, cute.make_layout(1), cute.group_modes(sB, 0, 2),
                                           cute.group_modes(gX, 0, 2))
        ptid = tidx % WG
        w_row, w_part = kg.thread_coords(ptid, KSTAGE // self.w_chunk, self.w_rows_pp, KSTAGE)
        tAsA = kg.store_copy(KSTAGE, self.w_rows_pp, self.w_chunk).get_slice(ptid).partition_D(sA)
        passes = self.w_passes // cfg.producers  # this thread's passes (2 producers: one each)
        bufs = [(cute.make_rmem_tensor((self.w_chunk // 2, passes), Uint8),
                 cute.make_rmem_tensor((self.w_chunk // BLOCK, passes), Uint8)) for _ in range(2)]
        tWrD = cute.make_rmem_tensor((self.w_chunk, passes), BFloat16)
        xtail = None
        if cutlass.const_expr(cfg.tail > 0):
            atom_t, mXt, sBt = xt
            gXt = cute.local_tile(cute.domain_offset((start + cfg.tile_t, 0), mXt), (cfg.tail, KSTAGE), (0, None))
            tXsXt, tXgXt = cpasync.tma_partition(atom_t, 0, cute.make_layout(1), cute.group_modes(sBt, 0, 2),
                                                 cute.group_modes(gXt, 0, 2))
            xtail = (atom_t, tXsXt, tXgXt, count > cfg.tile_t)
        return tXsX, tXgX, w_row, w_part, tAsA, bufs, tWrD, xtail

    @cute.jit
    def fill_stage(self, tma_atom: cute.CopyAtom, tXsX, tXgX, full, empty, kt, g, buf, tWrD, tAsA, xtail):
        """Pipelined K tile ``g`` (the tile's ``kt``): once its stage is free (its previous contents, K tile
        ``g - stages``, consumed), TMA X into it (and the tail's rows into the tail stage, ``xtail``), decode
        this thread's W codes and scales ``buf`` into it, fence the stores for the async proxy and arrive on
        ``full``."""
        cfg = self.cfg
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        s = g % cfg.stages
        cute.arch.mbarrier_wait(empty + s, free_parity(g, cfg.stages))
        if warp == 0:
            x_bytes = Int32(cfg.tile_t * KSTAGE * 2)
            if cutlass.const_expr(cfg.tail > 0):
                atom_t, tXsXt, tXgXt, has_tail = xtail
                if has_tail:
                    x_bytes = Int32(rows_per_tile(cfg) * KSTAGE * 2)
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(full + s, x_bytes)
            cute.copy(tma_atom, tXgX[None, kt], tXsX[None, s], tma_bar_ptr=full + s)
            if cutlass.const_expr(cfg.tail > 0):
                if has_tail:
                    cute.copy(atom_t, tXgXt[None, kt], tXsXt[None, s], tma_bar_ptr=full + s)
        passes = self.w_passes // cfg.producers
        for i in cutlass.range_constexpr(passes):
            p = i
            if cutlass.const_expr(cfg.producers > 1):
                p = warp // (WG // 32)  # this decode warpgroup's pass
            dequant_nvfp4_chunk(buf[0][None, i], buf[1][None, i], tWrD[None, i])
            cute.autovec_copy(tWrD[None, i], tAsA[None, p, 0, s])
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.mbarrier_arrive(full + s)

    @cute.jit
    def produce_w_tma(self, tma_atom: cute.CopyAtom, mX: cute.Tensor, mWv: cute.Tensor, sA: cute.Tensor,
                      sB: cute.Tensor, full, empty, k_tiles, bw, e, start, done, storage, raw_full, w_tma, w3_tma,
                      xt, count):
        """:meth:`produce` with W's packed bytes brought by TMA (``cfg.w_tma``): per 128-K chunk (two K
        tiles) one elected thread copies the CTA's two 64-row tiles of codes and scales (``RAW_BYTES``) into
        raw slot ``chunk % RAW_SLOTS``, ``RAW_SLOTS`` chunks ahead, completing ``raw_full``; the 128 threads
        wait for it, read their codes and scales from the slot (16 + 2 bytes per thread and pass), meet at
        a named barrier (the slot is then free: the elected thread refills it with chunk + RAW_SLOTS), and
        decode and store both K tiles as :meth:`produce` does.

        Why: :meth:`produce` keeps one K tile of W loads in flight per thread, and the
        ``fence.proxy.async`` after each stage's stores compiles to ``MEMBAR.ALL.CTA`` + ``FENCE.VIEW.ASYNC.S``
        (SASS), a memory barrier that may also wait for the loads issued during that K tile; H200 session 8
        timed ~1400-1870 cycles per K tile whatever the token tile (64, 128, 256), the latency of a global
        load rather than the ~300 instructions of the decode.
        Here the only loads before that fence are from shared memory, and the TMA runs up to
        ``2 * RAW_SLOTS`` K tiles ahead. ``done``: K tiles this CTA pipelined before (even: chunks continue
        across tiles as ``done // 2``)."""
        cfg = self.cfg
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tXsX, tXgX, w_row, w_part, tAsA, bufs, tWrD, xtail = self.producer_setup(tma_atom, mX, sA, sB, start,
                                                                                xt, count)
        # slot views: TMA boxes [64, 64] codes / [32, 16] scales per (slot, block) = slot * 2 + block ...
        slots = 2 * RAW_SLOTS
        sCodes = storage.raw_codes.get_tensor(cute.make_layout((64, 64, slots), stride=(64, 1, BLOCK_CODE_BYTES)))
        sScales = storage.raw_scales.get_tensor(cute.make_layout((32, 16, slots), stride=(16, 1, BLOCK_SCALE_BYTES)))
        # ... and per thread: (byte, 32-K chunk, row, slot block) of codes [64, 4 x 16] and scales [64, 4 x 2]
        rCodes = cute.make_tensor(sCodes.iterator, cute.make_layout((16, 4, 64, slots),
                                                                    stride=(1, 16, 64, BLOCK_CODE_BYTES)))
        rScales = cute.make_tensor(sScales.iterator, cute.make_layout((2, 4, 64, slots),
                                                                      stride=(1, 2, 8, BLOCK_SCALE_BYTES)))
        parts = []
        for atom_c, tma_c, atom_s, tma_s in (w_tma, w3_tma if cutlass.const_expr(cfg.gate_up) else w_tma):
            tcs, tcg = cpasync.tma_partition(atom_c, 0, cute.make_layout(1), cute.group_modes(sCodes, 0, 2),
                                             cute.group_modes(cute.local_tile(tma_c, (64, 64), (None, 0)), 0, 2))
            tss, tsg = cpasync.tma_partition(atom_s, 0, cute.make_layout(1), cute.group_modes(sScales, 0, 2),
                                             cute.group_modes(cute.local_tile(tma_s, (32, 16), (None, 0)), 0, 2))
            parts.append((atom_c, tcs, tcg, atom_s, tss, tsg))
        # the CTA's 64-row blocks in W's tile numbering: (expert, row block, K block) -> linear
        nb, kb = mWv.shape[cute.rank(mWv) - 4], mWv.shape[cute.rank(mWv) - 3]
        rb0 = e * nb + bw * self.out_w // TILE_ROWS
        per_row = KSTAGE // self.w_chunk
        passes = self.w_passes // cfg.producers
        chunks = k_tiles // 2
        cdone = done // 2
        if warp == 0:  # the whole warp: each TMA copy elects its own thread (elect.sync, all 32 lanes)
            for i in cutlass.range_constexpr(RAW_SLOTS):
                if i < chunks:
                    self.issue_w(parts, raw_full, (cdone + i) % RAW_SLOTS, rb0, kb, i)
        for c in cutlass.range(chunks, unroll=1):
            gc = cdone + c
            slot = gc % RAW_SLOTS
            cute.arch.mbarrier_wait(raw_full + slot, (gc // RAW_SLOTS) % 2)
            for j in cutlass.range_constexpr(2):
                for i in cutlass.range_constexpr(passes):
                    p = i
                    if cutlass.const_expr(cfg.producers > 1):
                        p = warp // (WG // 32)  # this decode warpgroup's pass (its 64-row block)
                    c4 = j * per_row + w_part
                    cute.autovec_copy(rCodes[None, c4, w_row, slot * 2 + p], bufs[j][0][None, i])
                    cute.autovec_copy(rScales[None, c4, w_row, slot * 2 + p], bufs[j][1][None, i])
            # every producer thread has its bytes of the slot: refill it, RAW_SLOTS chunks ahead (the proxy
            # fence orders these generic-proxy reads before the TMA's async-proxy writes)
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.barrier(barrier_id=2, number_of_threads=cfg.producers * WG)
            if warp == 0:
                if c + RAW_SLOTS < chunks:
                    self.issue_w(parts, raw_full, slot, rb0, kb, c + RAW_SLOTS)
            for j in cutlass.range_constexpr(2):
                self.fill_stage(tma_atom, tXsX, tXgX, full, empty, 2 * c + j, done + 2 * c + j, bufs[j], tWrD, tAsA,
                                xtail)

    @cute.jit
    def issue_w(self, parts, raw_full, slot, rb0, kb, chunk):
        """Warp 0, all 32 lanes: TMA copies of chunk ``chunk``'s codes and scales of the CTA's two 64-row
        blocks (row blocks ``rb0``, ``rb0 + 1``; gate_up: block ``rb0`` of W1, then of W3) into raw slot
        ``slot``; one lane arms ``raw_full``. Each ``cute.copy`` of a TMA atom compiles to its own
        ``elect.sync`` over the full warp, so it must not run inside ``elect_one`` (session 8 did: the lone
        lane's ``elect.sync`` waited for the other 31 and every W-by-TMA launch hung on the H200, session 9)."""
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(raw_full + slot, RAW_BYTES)
        for p in cutlass.range_constexpr(2):
            atom_c, tcs, tcg, atom_s, tss, tsg = parts[p]
            rb = rb0
            if cutlass.const_expr(not self.cfg.gate_up):
                rb = rb0 + p
            block = rb * kb + chunk
            cute.copy(atom_c, tcg[None, block], tcs[None, slot * 2 + p], tma_bar_ptr=raw_full + slot)
            cute.copy(atom_s, tsg[None, block], tss[None, slot * 2 + p], tma_bar_ptr=raw_full + slot)

    @cute.jit
    def load_w(self, kt, gW, gW3, buf, w_row0, w_part):
        """128-bit loads of this thread's W codes and scale bytes of K tile ``kt`` (64 K) into ``buf``
        (:func:`gemm.load_w_chunk`; the tile layout's 64 x 128 tiles hold two K tiles each)."""
        for p in cutlass.range_constexpr(self.w_passes):
            src = gW
            row = w_row0 + p * self.w_rows_pp
            if cutlass.const_expr(self.cfg.gate_up):
                src = gW3 if p > 0 else gW
                row = w_row0
            kg.load_w_chunk(src, row, kt, KSTAGE, self.w_chunk, w_part, buf[0][None, p], buf[1][None, p])

    @cute.jit
    def consume(self, mXg, mWg, mW3g, mRouteW, mY, sA: cute.Tensor, sB: cute.Tensor, stage_ptr, full, empty,
                tiled_mma: cute.TiledMma, k_tiles, bw, e, start, count, done, tiled_mma_t, sBt):
        """Warpgroups 1, 2, one tile: wgmma over each full stage, release it once its wgmma completed;
        the last stage once all completed; epilogue. ``cfg.tail``: tiles with more than ``tile_t`` rows also
        run the tail's wgmma (``tiled_mma_t``, N = tail) on its B stage ``sBt`` into a second accumulator."""
        cfg = self.cfg
        tidx, _, _ = cute.arch.thread_idx()
        ctid = tidx - self.cfg.producers * WG
        thr_mma = tiled_mma.get_slice(ctid)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((TILE_W, cfg.tile_t)), Float32)
        acc.fill(0.0)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        tail = None
        if cutlass.const_expr(cfg.tail > 0):
            thr_t = tiled_mma_t.get_slice(ctid)
            acc_t = cute.make_rmem_tensor(thr_t.partition_shape_C((TILE_W, cfg.tail)), Float32)
            acc_t.fill(0.0)
            tiled_mma_t.set(warpgroup.Field.ACCUMULATE, True)
            tail = (thr_t, tiled_mma_t.make_fragment_A(thr_t.partition_A(sA)),
                    tiled_mma_t.make_fragment_B(thr_t.partition_B(sBt)), acc_t, count > cfg.tile_t)
        for kt in cutlass.range(k_tiles, unroll=1):
            g = done + kt
            s = g % cfg.stages
            cute.arch.mbarrier_wait(full + s, full_parity(g, cfg.stages))
            warpgroup.fence()
            for kb in cutlass.range_constexpr(cute.size(tCrA, mode=[2])):
                cute.gemm(tiled_mma, acc, tCrA[None, None, kb, s], tCrB[None, None, kb, s], acc)
            if cutlass.const_expr(cfg.tail > 0):
                _, tCrAt, tCrBt, acc_t, has_tail = tail
                if has_tail:
                    warpgroup.fence()  # ptxas injects one here otherwise (C7519): the branch hides the acc's use
                    for kb in cutlass.range_constexpr(cute.size(tCrAt, mode=[2])):
                        cute.gemm(tiled_mma_t, acc_t, tCrAt[None, None, kb, s], tCrBt[None, None, kb, s], acc_t)
            warpgroup.commit_group()
            # wgmma(kt - 1) is done: its stage goes back to the producer
            warpgroup.wait_group(1)
            if kt > 0:
                if tidx % 32 == 0:
                    cute.arch.mbarrier_arrive(empty + (g - 1) % cfg.stages)
        warpgroup.wait_group(0)
        if tidx % 32 == 0:
            cute.arch.mbarrier_arrive(empty + (done + k_tiles - 1) % cfg.stages)
        self.epilogue(acc, thr_mma, mXg, mWg, mW3g, mRouteW, mY, stage_ptr, bw, e, start, count, tail)

    @cute.jit
    def epilogue(self, acc, thr_mma, mXg, mWg, mW3g, mRouteW, mY: cute.Tensor, stage_ptr, bw, e, start, count,
                 tail):
        """``acc * (gx[row] * gw * 2**shift)`` -> BF16 staging tile ``[tile_t, 128 + Y_PAD]`` at ``stage_ptr[0]``
        (the tail's accumulator, if it ran, into ``[tail, 128 + Y_PAD]`` at ``stage_ptr[1]``, the tail's B
        stages) -> 16-byte stores of ``Y[start + t, bw * 128 : bw * 128 + 128]`` for the tile's rows
        ``t < count``.

        gate_up: staged columns 0..63 are gate, 64..127 up (each rounded to BF16, as the reference's GEMM
        outputs are); the store pass computes ``silu(min(g, l)) * clip(u, +-l) * routing weight`` and writes
        ``h[start + t, bw * 64 : bw * 64 + 64]``."""
        cfg = self.cfg
        tidx, _, _ = cute.arch.thread_idx()
        ctid = tidx - cfg.producers * WG
        consumers = 2 * WG
        # both consumer warpgroups are done reading the stages (one tile per CTA: the producer wrote its
        # last one before) and, persistent, reading the staging tile of the CTA's previous tile
        cute.arch.barrier(barrier_id=1, number_of_threads=consumers)
        rows = rows_per_tile(cfg)
        sY = cute.make_tensor(stage_ptr[0], cute.make_layout((cfg.tile_t, TILE_W), stride=(TILE_W + Y_PAD, 1)))
        sYt = sY
        if cutlass.const_expr(cfg.tail > 0):
            sYt = cute.make_tensor(stage_ptr[1], cute.make_layout((cfg.tail, TILE_W), stride=(TILE_W + Y_PAD, 1)))
        cC = thr_mma.partition_C(cute.make_identity_tensor((TILE_W, cfg.tile_t)))
        unscale = Float32(2.0 ** (DECODE_SHIFT * (2 if cfg.x_scaled else 1)))
        gw = mWg[e] * unscale
        gw3 = gw
        if cutlass.const_expr(cfg.gate_up):
            gw3 = mW3g[e] * unscale
        self.stage_acc(acc, cC, 0, sY, mXg, gw, gw3, start, count)
        if cutlass.const_expr(cfg.tail > 0):
            thr_t, _, _, acc_t, has_tail = tail
            if has_tail:
                cCt = thr_t.partition_C(cute.make_identity_tensor((TILE_W, cfg.tail)))
                self.stage_acc(acc_t, cCt, cfg.tile_t, sYt, mXg, gw, gw3, start, count)
        cute.arch.barrier(barrier_id=1, number_of_threads=consumers)
        # a warp stores whole row segments (256 bytes, or 128 for h) per step
        vec = 8
        per_row = self.out_w // vec
        gY = cute.local_tile(cute.domain_offset((start, 0), mY), (rows, self.out_w), (0, bw))
        gYv = cute.zipped_divide(gY, (1, vec))
        sYv_tile, sYv_tail = cute.zipped_divide(sY, (1, vec)), cute.zipped_divide(sYt, (1, vec))
        rows_per_it = consumers // per_row  # tile_t is a multiple: an iteration's rows are all staged in one
        for it in cutlass.range_constexpr(rows * per_row // consumers):
            idx = it * consumers + ctid
            row, ch = idx // per_row, idx % per_row
            # the tile's first tile_t rows from sY, the tail's from sYt
            sYv, srow = sYv_tile, row
            if cutlass.const_expr(it * rows_per_it >= cfg.tile_t):
                sYv, srow = sYv_tail, row - cfg.tile_t
            if row < count:
                frag = cute.make_rmem_tensor((vec,), BFloat16)
                if cutlass.const_expr(cfg.gate_up):
                    up = cute.make_rmem_tensor((vec,), BFloat16)
                    cute.autovec_copy(sYv[None, (srow, ch)], frag)
                    cute.autovec_copy(sYv[None, (srow, ch + per_row)], up)
                    limit = Float32(cfg.swiglu_limit)
                    rw = mRouteW[start + row]
                    for j in cutlass.range_constexpr(vec):
                        g = cute.arch.fmin(frag[j].to(Float32), limit)
                        u = cute.arch.fmax(cute.arch.fmin(up[j].to(Float32), limit), -limit)
                        frag[j] = (g / (Float32(1.0) + cute.math.exp(-g)) * u * rw).to(BFloat16)
                else:
                    cute.autovec_copy(sYv[None, (srow, ch)], frag)
                cute.autovec_copy(frag, gYv[None, (row, ch)])


    @cute.jit
    def stage_acc(self, acc, cC, row0, sY, mXg, gw, gw3, start, count):
        """Accumulator ``acc`` (coordinates ``cC``: (W row, token)) scaled and rounded to BF16 into the
        staging tile ``sY`` at row ``token`` (the tile's row ``row0 + token``): ``gw`` (W3's ``gw3`` for gate_up's
        up half) times the token's ``gx`` when ``x_scaled`` (tokens past ``count`` use the last row's, their rows
        are not stored)."""
        cfg = self.cfg
        for i in cutlass.range_constexpr(cute.size(acc)):
            r, c = cC[i]
            scale = gw
            if cutlass.const_expr(cfg.gate_up):
                if r >= TILE_W // 2:
                    scale = gw3
            if cutlass.const_expr(cfg.x_scaled):
                scale = mXg[start + cutlass.min(row0 + c, count - 1)] * scale
            sY[c, r] = (acc[i] * scale).to(BFloat16)


_NO_GROUPS = (None,) * 5  # W3 (values, scales, global), tile table, routing weights


@functools.cache
def kernel_for(cfg: PrefillConfig) -> GemmPrefillSm90:
    """The (cached) kernel object of a config; ``cutlass_call`` compiles it once per shape."""
    return GemmPrefillSm90(cfg)



#: cycles per K tile (64) of one CTA by token tile, H200 session 8 (W loaded to registers): Flash wq_a
#: (k = 4096, 64 K tiles) at m = 1024 / 4096 / 16384 ran tiles of 64 / 128 / 256 in 1 / 2 / 4 waves of CTAs
#: in 45.6 / 99.7 / 241.9 us (W4A16) at ~1.98 GHz. Nearly flat in the tile (the producer's load latency, see
#: produce_w_tma), so larger tiles are nearly free per K tile: choose_prefill_config weighs waves by these.
TILE_CYCLES = {64: 1410, 128: 1540, 256: 1870}


def choose_prefill_config(m: int, n: int, act_nvfp4: bool) -> PrefillConfig:
    """The token tile (64, 128, 256) with the fewest ``waves x TILE_CYCLES[tile]``: whole waves of
    ``NUM_SMS`` CTAs, each K tile costing what session 8 measured (a tie goes to the larger tile). E.g. Flash
    wq_a (n = 1024): m = 1024 -> 64 (one wave of 128 CTAs either way), m = 4096 -> 256 (one wave of 128
    CTAs rather than two of 128-token tiles, which took 99.7 us), m = 16384 -> 256. There is no K split
    here: small-n shapes at mid m keep one short wave."""
    def cost(t):
        ctas = (n // TILE_W) * -(-m // t)
        return -(-ctas // kg.NUM_SMS) * TILE_CYCLES[t]

    tile_t = min((256, 128, 64), key=cost)
    return with_env_options(PrefillConfig(tile_t=tile_t, x_scaled=act_nvfp4))


def with_env_options(cfg: PrefillConfig) -> PrefillConfig:
    """``cfg`` with the options read from the environment at trace time: W by TMA unless
    ``$NVFP4JAX_GEMM_WS_W`` is ``regs`` (W to registers); persistent when ``$NVFP4JAX_GEMM_PREFILL`` is
    ``ws-persistent``, with the most stages that fit beside its own staging tile (3 at 256 tokens, 4
    below, one fewer with W by TMA at 256)."""
    w_mode = os.environ.get(W_ENV, "") or "tma"
    if w_mode not in W_MODES:
        raise ValueError(f"{W_ENV}={w_mode!r}; choose one of {W_MODES}")
    producers = os.environ.get(PRODUCERS_ENV, "") or "1"
    if producers not in ("1", "2") or (producers == "2" and w_mode != "tma"):
        raise ValueError(f"{PRODUCERS_ENV}={producers!r}; choose 1, or 2 with W by TMA ({W_ENV}=tma)")
    cfg = dataclasses.replace(cfg, w_tma=w_mode == "tma", producers=int(producers))
    if cfg.producers == 2 and cfg.tile_t == 2 * SPLIT and cfg.tail == 0:  # N = 256 needs 154 registers
        cfg = dataclasses.replace(cfg, tile_t=SPLIT, tail=SPLIT)
    if os.environ.get(kg.PREFILL_ENV, "") != "ws-persistent":
        return cfg
    if cfg.producers > 1:
        raise ValueError(f"{PRODUCERS_ENV}=2 has no persistent variant ({kg.PREFILL_ENV}=ws-persistent)")
    stages = cfg.stages
    while stages > 2 and not can_implement(dataclasses.replace(cfg, persistent=True, stages=stages)):
        stages -= 1
    return dataclasses.replace(cfg, persistent=True, stages=stages)


def supports(x, w) -> str | None:
    """None when :func:`nvfp4_gemm_ws` runs ``x @ w^T``, else why not."""
    reason = kg.supports(x, w)
    if reason is None and w.shape[0] % TILE_W:
        reason = f"the prefill kernel needs n % {TILE_W} == 0, got weight shape {w.shape}"
    return reason


def nvfp4_gemm_ws(x: NVFP4Tensor | jax.Array, w: NVFP4Tensor) -> jax.Array:
    """``Y = X @ W^T`` in BF16 through the warp-specialized prefill kernel; the signature and math of
    :func:`nvfp4jax.ref.gemm.nvfp4_gemm` with ``out_dtype`` BF16. NVFP4 ``x`` is decoded once by
    :func:`dequant_rows`; its per-row global scales are applied in the epilogue."""
    reason = supports(x, w)
    if reason is not None:
        raise ValueError(f"nvfp4_gemm_ws kernel: {reason}")
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[0]), jnp.bfloat16)
    if isinstance(x, NVFP4Tensor):
        return nvfp4_gemm_ws_decoded(dequant_rows(x), x.global_scale, w)
    return nvfp4_gemm_ws_decoded(x, None, w)


def nvfp4_gemm_ws_decoded(xd: jax.Array, gx: jax.Array | None, w: NVFP4Tensor) -> jax.Array:
    """:func:`nvfp4_gemm_ws` of X given as BF16 ``xd [m, k]``: with per-row global scales ``gx [m]``, an
    NVFP4 X decoded as ``dequant_rows`` (or ``quantize.quantize_nvfp4_decoded``) writes it, ``e2m1 * e4m3 *
    2**-DECODE_SHIFT``; with ``gx`` None, BF16 X itself (recipe ``nvfp4-w4a16``)."""
    reason = supports(xd, w)
    if reason is None and gx is not None and (gx.shape != (xd.shape[0],) or gx.dtype != jnp.float32):
        reason = f"per-row global scales must be float32 [{xd.shape[0]}], got {gx.dtype} {gx.shape}"
    if reason is not None:
        raise ValueError(f"nvfp4_gemm_ws kernel: {reason}")
    m, n = xd.shape[0], w.shape[0]
    if m == 0:
        return jnp.zeros((0, n), jnp.bfloat16)
    cfg = choose_prefill_config(m, n, gx is not None)
    w = kg.as_tiled(w)
    ws = (w.values, jax.lax.bitcast_convert_type(w.scales, jnp.uint8), w.global_scale.reshape(1))
    out = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    return cutlass_call(kernel_for(cfg), output_shape_dtype=out)(xd, gx, *ws, *_NO_GROUPS)


# ---- NVFP4 rows -> BF16 (exact), for the W4A4 recipe's prefill ------------------------------------

DQ_CHUNK = 32  # K values per thread


class DequantRowsSm90:
    """``X_bf16[r, k] = e2m1 * e4m3 * 2**-DECODE_SHIFT`` of row ``r`` of NVFP4 ``X`` (codes ``[m, k/2]``, scale
    bytes ``[m, k/16]``), or with ``gather`` of row ``rows[r]``; without the per-row global scale; exact
    (:func:`dequant_nvfp4_chunk`). One thread per 32-value chunk: a 16-byte code load, a 2-byte scale load,
    four 16-byte stores."""

    def __init__(self, gather: bool = False):
        self.gather = gather

    @cute.jit
    def __call__(self, stream: cuda.CUstream, mXv, mXs, mRows, mY):
        chunks = mY.shape[0] * (mXv.shape[1] * 2 // DQ_CHUNK)
        self.kernel(mXv, mXs, mRows, mY).launch(grid=[(chunks + WG - 1) // WG, 1, 1], block=[WG, 1, 1],
                                               stream=stream)

    @cute.kernel
    def kernel(self, mXv: cute.Tensor, mXs: cute.Tensor, mRows, mY: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        per_row = mXv.shape[1] * 2 // DQ_CHUNK
        idx = bidx * WG + tidx
        if idx < mY.shape[0] * per_row:
            row, ch = idx // per_row, idx % per_row
            src = row
            if cutlass.const_expr(self.gather):
                src = mRows[row]
            gV = cute.local_tile(mXv, (1, DQ_CHUNK // 2), (src, ch))
            gS = cute.local_tile(mXs, (1, DQ_CHUNK // BLOCK), (src, ch))
            gY = cute.local_tile(mY, (1, DQ_CHUNK), (row, ch))
            rV = cute.make_rmem_tensor((DQ_CHUNK // 2,), Uint8)
            rS = cute.make_rmem_tensor((DQ_CHUNK // BLOCK,), Uint8)
            rY = cute.make_rmem_tensor((DQ_CHUNK,), BFloat16)
            cute.autovec_copy(gV[0, None], rV)
            cute.autovec_copy(gS[0, None], rS)
            dequant_nvfp4_chunk(rV, rS, rY)
            cute.autovec_copy(rY, gY[0, None])


@functools.cache
def _dequant_kernel(gather: bool = False) -> DequantRowsSm90:
    return DequantRowsSm90(gather)


def dequant_rows(x: NVFP4Tensor, rows: jax.Array | None = None) -> jax.Array:
    """BF16 ``[m, k]`` holding ``e2m1 * e4m3 * 2**-DECODE_SHIFT`` of NVFP4 ``x`` (exact; the per-row global
    scale is not applied): the B operand of the prefill kernel in recipe ``nvfp4``. ``rows`` (int32 ``[r]``):
    the result's row ``i`` is ``x``'s row ``rows[i]`` (the MoE's L1 input in expert order, gathered here
    instead of by XLA before: the NVFP4 rows are read once and no gathered copy of them is written)."""
    if x.values.ndim != 2 or x.shape[1] % DQ_CHUNK:
        raise ValueError(f"dequant_rows takes NVFP4 [m, k] with k % {DQ_CHUNK} == 0, got {x.shape}")
    if rows is not None and (rows.ndim != 1 or rows.dtype != jnp.int32):
        raise ValueError(f"dequant_rows: rows must be int32 [r], got {rows.dtype} {rows.shape}")
    m, k = x.shape
    out = jax.ShapeDtypeStruct((m if rows is None else rows.shape[0], k), jnp.bfloat16)
    if out.shape[0] == 0:
        return jnp.zeros(out.shape, out.dtype)
    return cutlass_call(_dequant_kernel(rows is not None), output_shape_dtype=out)(
        x.values, jax.lax.bitcast_convert_type(x.scales, jnp.uint8), rows)


__all__ = ["GemmPrefillSm90", "PrefillConfig", "dequant_rows", "nvfp4_gemm_ws", "nvfp4_gemm_ws_decoded"]

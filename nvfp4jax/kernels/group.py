"""The MoE's token-to-expert grouping for decode-sized calls as one sm_90a CuTeDSL kernel (one CTA).

What :func:`nvfp4jax.kernels.moe.group_rows_xla` computes with ~8 XLA kernels (a stable argsort of the
``tokens x k`` expert ids, a bincount, gathers, a scatter for the inverse permutation and the tile
table's scans and searchsorted) -- ~20 us of a ~77 us V4-Flash MoE call at T = 1 on an H200, nearly
all launch and latency -- in one launch, bit for bit the same outputs:

1. stable ranks (warp 0): the ids in chunks of 32; ``match.any`` groups a chunk's equal ids, a row's
   rank is the running count of its expert plus the lanes of its group below it; the group's last
   lane advances the count (shared memory). Rows of one expert keep their order, as in the stable
   argsort.
2. scans (warp 0): per-expert offsets (exclusive scan of the counts) and the tile table's ``ends``
   (inclusive scan of ``ceil(count / tile_t)``): a lane per contiguous segment, shuffles across lanes.
3. scatter (all threads): row ``i`` goes to ``offsets[e_i] + rank_i``: ``order``, the L1 gather map
   ``order // k``, the routing weights in that order, and ``inverse``.
4. tile table (all threads): one ``(expert, first row, rows)`` per tile slot by binary search in ``ends``,
   as :func:`nvfp4jax.kernels.moe.tile_table`.

For ``tokens x k <= MAX_ROWS`` (decode and short prefill chunks); larger calls keep the XLA path.

Status (session 8, H200): ``tests/kernels/test_group.py``'s bit-for-bit comparison with the XLA grouping
passed (10 routings: random, experts without rows, every row on expert 0, k = 1, tiles of 16/64/128
rows); the MoE layer with it, timed: V4-Flash T = 1 64.3 us (NVFP4) and 57.6 (W4A16), V4-Pro T = 1 130.7
and 117.6, against 76.8, 70.6, 148.4 and 136.6 with the XLA grouping in session 7's run on the same kind
of card (not the same run); T = 64 within 1% (``benchmarks/RESULTS.md``).
Hence the default where it applies; ``NVFP4JAX_MOE_GROUP=xla`` (read at trace time) keeps the XLA
grouping for A/B runs. (The layer-level test ``test_moe_with_group_kernel`` was cut by the stage's time
limit before it ran; the grouping's outputs being the same bits is what it rests on.)
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32
from cutlass.jax import cutlass_call

THREADS = 256
MAX_ROWS = 1024
ENV = "NVFP4JAX_MOE_GROUP"  # "kernel" (default, where it applies) or "xla"
MODES = ("kernel", "xla")


class GroupRowsSm90:
    """One CTA: ``(ids [rows], weights [rows]) -> (order, gather rows, sizes, routing weights, tiles,
    inverse)``; see the module docstring. Static: rows, experts, k, the token tile and the tile slots."""

    def __init__(self, rows: int, experts: int, k: int, tile_t: int, tiles: int):
        self.rows, self.experts, self.k, self.tile_t, self.tiles = rows, experts, k, tile_t, tiles
        self.seg = -(-experts // 32)  # experts per lane in the scans

    @cute.jit
    def __call__(self, stream: cuda.CUstream, mIds, mW, mOrder, mRows, mSizes, mRouteW, mTiles, mInverse):
        @cute.struct
        class SharedStorage:
            rank: cute.struct.MemRange[Int32, self.rows]
            count: cute.struct.MemRange[Int32, self.experts + 1]  # + a slot for the padding lanes
            offset: cute.struct.MemRange[Int32, self.experts]
            ends: cute.struct.MemRange[Int32, self.experts]

        self.shared_storage = SharedStorage
        self.kernel(mIds, mW, mOrder, mRows, mSizes, mRouteW, mTiles, mInverse).launch(
            grid=[1, 1, 1], block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mW: cute.Tensor, mOrder: cute.Tensor, mRows: cute.Tensor,
               mSizes: cute.Tensor, mRouteW: cute.Tensor, mTiles: cute.Tensor, mInverse: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        storage = cutlass.utils.SmemAllocator().allocate(self.shared_storage)
        rank = storage.rank.get_tensor(cute.make_layout(self.rows))
        count = storage.count.get_tensor(cute.make_layout(self.experts + 1))
        offset = storage.offset.get_tensor(cute.make_layout(self.experts))
        ends = storage.ends.get_tensor(cute.make_layout(self.experts))
        E, T = self.experts, self.tile_t
        for e in cutlass.range(tidx, E + 1, THREADS, unroll=1):
            count[e] = 0
        cute.arch.sync_threads()

        if warp == 0:
            # 1. stable ranks, 32 rows at a time
            for c in cutlass.range(0, self.rows, 32, unroll=1):
                i = c + lane
                e = Int32(E)
                if i < self.rows:
                    e = mIds[i]
                group = cute.arch.match_sync(0xFFFFFFFF, e)
                below = cute.arch.popc(group & cute.arch.lanemask_lt())
                size = cute.arch.popc(group)
                base = count[e]
                cute.arch.sync_warp()
                if i < self.rows:
                    rank[i] = base + Int32(below)
                if below == size - 1:
                    count[e] = base + Int32(size)
                cute.arch.sync_warp()
            # 2. offsets = exclusive scan of the counts; ends = inclusive scan of ceil(count / tile_t)
            lo = lane * self.seg
            s_rows = Int32(0)
            s_tiles = Int32(0)
            for j in cutlass.range_constexpr(self.seg):
                if lo + j < E:
                    n = count[lo + j]
                    s_rows += n
                    s_tiles += (n + T - 1) // T
            inc_rows, inc_tiles = s_rows, s_tiles
            for d in cutlass.range_constexpr(5):
                up_rows = cute.arch.shuffle_sync_up(inc_rows, 1 << d)
                up_tiles = cute.arch.shuffle_sync_up(inc_tiles, 1 << d)
                if lane >= (1 << d):
                    inc_rows += up_rows
                    inc_tiles += up_tiles
            run_rows = inc_rows - s_rows
            run_tiles = inc_tiles - s_tiles
            for j in cutlass.range_constexpr(self.seg):
                if lo + j < E:
                    n = count[lo + j]
                    offset[lo + j] = run_rows
                    mSizes[lo + j] = n
                    run_rows += n
                    run_tiles += (n + T - 1) // T
                    ends[lo + j] = run_tiles
        cute.arch.sync_threads()

        # 3. every row to its place in expert order
        for i in cutlass.range(tidx, self.rows, THREADS, unroll=1):
            pos = offset[mIds[i]] + rank[i]
            mOrder[pos] = i
            mRows[pos] = i // self.k
            mRouteW[pos] = mW[i]
            mInverse[i] = pos
        # 4. tile slot j: ex = #{e : ends[e] <= j} (binary search), then moe.tile_table's formulas
        for j in cutlass.range(tidx, self.tiles, THREADS, unroll=1):
            lo_e = Int32(0)
            hi_e = Int32(E)
            for _ in cutlass.range_constexpr(self.experts.bit_length()):
                if lo_e < hi_e:
                    mid = (lo_e + hi_e) // 2
                    if ends[mid] <= j:
                        lo_e = mid + 1
                    else:
                        hi_e = mid
            e = cutlass.min(lo_e, E - 1)
            n = count[e]
            per = (n + T - 1) // T
            local = j - (ends[e] - per)
            rows_in = cutlass.max(cutlass.min(n - local * T, T), 0)
            if lo_e >= E:
                rows_in = Int32(0)
            first = Int32(0)
            if rows_in > 0:
                first = offset[e] + local * T
            mTiles[j, 0] = e
            mTiles[j, 1] = first
            mTiles[j, 2] = rows_in


@functools.cache
def _kernel(rows: int, experts: int, k: int, tile_t: int, tiles: int) -> GroupRowsSm90:
    return GroupRowsSm90(rows, experts, k, tile_t, tiles)


def applies(rows: int, experts: int) -> bool:
    """Whether :func:`group_rows` takes a call of ``rows`` (token, expert) rows: ``1 <= rows <= MAX_ROWS``
    unless ``$NVFP4JAX_MOE_GROUP`` (read at trace time) is ``xla``."""
    mode = os.environ.get(ENV, "") or "kernel"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}; choose one of {MODES}")
    return mode == "kernel" and 1 <= rows <= MAX_ROWS and experts >= 1


def group_rows(expert_ids: jax.Array, weights: jax.Array, experts: int, tile_t: int, tiles: int):
    """``(order, rows, sizes, route_w, tiles, inverse)`` of :func:`nvfp4jax.kernels.moe.group_rows_xla`
    (same values, bit for bit) in one kernel launch; ``expert_ids``/``weights`` ``[tokens, k]``.

    Precondition (as for the MoE op itself, whose routing produces them): every id in ``[0, experts)``;
    the kernel indexes its per-expert counters by id, and traced ids cannot be checked before launch."""
    t, k = expert_ids.shape
    r = t * k
    if not 1 <= r <= MAX_ROWS:
        raise ValueError(f"group_rows kernel takes 1..{MAX_ROWS} rows, got {t} x {k}")
    i32 = jnp.int32
    outs = (jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((experts,), i32),
            jax.ShapeDtypeStruct((r,), jnp.float32), jax.ShapeDtypeStruct((tiles, 3), i32),
            jax.ShapeDtypeStruct((r,), i32))
    return cutlass_call(_kernel(r, experts, k, tile_t, tiles), output_shape_dtype=outs)(
        expert_ids.reshape(-1).astype(i32), weights.reshape(-1).astype(jnp.float32))


__all__ = ["GroupRowsSm90", "applies", "group_rows"]

"""Functional decode state: window rings, paged pools of compressed entries, compressor carries.

Per layer (stacked over the layers of a segment, like the blocks):

* ``ring``: the last ``sliding_window`` raw K=V vectors, slot ``pos % window``;
* ``pool`` (CSA/HCA): compressed entries in pages of ``page_size`` entries — entry ``j`` of slot
  ``b`` lives at page ``page_table[b, j // page_size]``, row ``j % page_size``;
* ``index_pool`` (CSA): the indexer's compressed keys, same pages as ``pool``;
* ``carry`` / ``index_carry``: the compressor's pending tokens of the incomplete window (``kv`` and
  ``gate + ape``, float32, slot ``pos % ratio``) and, for CSA, the A halves of the last complete
  window (``prev_*``: window -1 of the next entry). A fresh sequence has kv 0 and gate -inf.

K=V vectors are stored as in the model's QAT simulation (spec §3.8, §3.9): the 448 non-rope
channels as FP8 e4m3 codes with one E8M0 (power-of-two) scale byte per 64, the rope channels in
the compute dtype — decoding gives back exactly the simulated values. With
``quant_simulation=False`` the non-rope channels are kept in the compute dtype (scale byte 127).

Shared across layers: ``lengths`` (tokens held per slot) and, per compression ratio, one page
table and one free-page bitmap (every CSA layer has the same number of entries per slot, as does
every HCA layer). Pages are allocated and freed inside jit (free bitmap + cumulative ranks).
All updates are pure: functions return a new state.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt8

from nvfp4jax.config import DeepSeekV4Config
from nvfp4jax.formats.e2m1 import e4m3_to_float
from nvfp4jax.formats.e8m0 import pow2
from nvfp4jax.ref.quant_sim import fp8_blocks

KV_BLOCK = 64


class KVRows(eqx.Module):
    """Rows of K=V vectors: non-rope channels (FP8 + E8M0 scale per 64, or plain) and rope channels."""

    nope: Array
    scale: UInt8[Array, "*rows blocks"]
    rope: Array

    @staticmethod
    def encode(kv: Float[Array, "*rows dim"], nope_dim: int, simulate: bool) -> KVRows:
        nope, rope = kv[..., :nope_dim], kv[..., nope_dim:]
        lead = nope.shape[:-1]
        if not simulate:
            return KVRows(nope, jnp.full((*lead, nope_dim // KV_BLOCK), 127, jnp.uint8), rope)
        codes, e = fp8_blocks(nope, KV_BLOCK)  # exactly what ref.quant_sim.fp8_simulate rounds to
        return KVRows(codes.reshape(nope.shape), (e[..., 0] + 127).astype(jnp.uint8), rope)

    def decode(self, dtype) -> Float[Array, "*rows dim"]:
        lead = self.nope.shape[:-1]
        b = e4m3_to_float(self.nope).reshape(*lead, self.scale.shape[-1], KV_BLOCK)
        nope = (b * pow2(self.scale.astype(jnp.int32) - 127)[..., None]).reshape(self.nope.shape)
        return jnp.concatenate([nope.astype(dtype), self.rope.astype(dtype)], axis=-1)


class Carry(eqx.Module):
    """Compressor carry of one layer (float32)."""

    kv: Float[Array, "batch ratio width"]
    gate: Float[Array, "batch ratio width"]
    prev_kv: Float[Array, "batch ratio half"] | None  # CSA only
    prev_gate: Float[Array, "batch ratio half"] | None

    @staticmethod
    def empty(batch: int, ratio: int, width: int, overlap: bool) -> Carry:
        z = lambda w: jnp.zeros((batch, ratio, w), jnp.float32)
        ninf = lambda w: jnp.full((batch, ratio, w), -jnp.inf, jnp.float32)
        half = width // 2
        return Carry(z(width), ninf(width), z(half) if overlap else None, ninf(half) if overlap else None)

    def reset(self, mask: Bool[Array, " batch"]) -> Carry:
        fresh = Carry.empty(self.kv.shape[0], self.kv.shape[1], self.kv.shape[2], self.prev_kv is not None)
        pick = lambda new, old: None if old is None else jnp.where(mask.reshape(-1, 1, 1), new, old)
        return Carry(pick(fresh.kv, self.kv), pick(fresh.gate, self.gate), pick(fresh.prev_kv, self.prev_kv),
                     pick(fresh.prev_gate, self.prev_gate))


class LayerState(eqx.Module):
    ring: KVRows
    pool: KVRows | None
    carry: Carry | None
    index_pool: Float[Array, "*layers pages page index_dim"] | None
    index_carry: Carry | None


class DecodeState(eqx.Module):
    """The whole decode state of a batch of ``batch`` slots (see the module docstring)."""

    lengths: Int[Array, " batch"]
    layers: tuple[tuple[LayerState, ...], ...]  # per segment, per pattern position, stacked over repeats
    mtp: LayerState | None
    mtp_lengths: Int[Array, " batch"]
    page_tables: dict[int, Int[Array, "batch max_pages"]]  # ratio -> page table (-1 = none)
    free_pages: dict[int, Bool[Array, " pages"]]  # ratio -> free bitmap
    max_len: int = eqx.field(static=True)
    page_size: int = eqx.field(static=True)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def _layer_state(cfg: DeepSeekV4Config, layer: int, batch: int, num_pages: dict[int, int], page_size: int,
                 poison: bool) -> LayerState:
    dtype = jnp.dtype(cfg.compute_dtype)
    nope, rope, sim = cfg.nope_head_dim, cfg.rope_head_dim, cfg.quant_simulation
    fill = jnp.nan if poison else 0.0

    def rows(lead):
        nope_dtype = jnp.float8_e4m3fn if sim else dtype
        return KVRows(jnp.full((*lead, nope), fill, nope_dtype), jnp.full((*lead, nope // KV_BLOCK), 127, jnp.uint8),
                      jnp.full((*lead, rope), fill, dtype))

    ring = rows((batch, cfg.sliding_window))
    r = cfg.compress_ratio(layer)
    if not r:
        return LayerState(ring, None, None, None, None)
    overlap = r == 4
    c = 2 if overlap else 1
    pool = rows((num_pages[r], page_size))
    carry = Carry.empty(batch, r, c * cfg.head_dim, overlap)
    if not overlap:
        return LayerState(ring, pool, carry, None, None)
    index_pool = jnp.full((num_pages[r], page_size, cfg.index_head_dim), fill, dtype)
    return LayerState(ring, pool, carry, index_pool, Carry.empty(batch, r, 2 * cfg.index_head_dim, True))


def pages_per_slot(max_len: int, ratio: int, page_size: int) -> int:
    return max(1, math.ceil(max_len // ratio / page_size))


def init_state(model, batch: int, max_len: int, page_size: int = 16, num_pages: dict[int, int] | None = None,
               *, poison: bool = False) -> DecodeState:
    """An empty state for ``batch`` slots of up to ``max_len`` tokens each.

    ``num_pages`` (per ratio) defaults to enough for every slot at ``max_len``; a smaller pool is
    shared first-come first-served. ``poison`` fills every unused pool row with NaN (tests).
    """
    cfg: DeepSeekV4Config = model.cfg
    if batch < 1 or max_len < 1 or page_size < 1:
        raise ValueError(f"batch, max_len and page_size must be positive, got {batch}, {max_len}, {page_size}")
    ratios = sorted({r for r in cfg.compress_ratios[: cfg.num_layers] if r})
    per_slot = {r: pages_per_slot(max_len, r, page_size) for r in ratios}
    num_pages = {r: (num_pages or {}).get(r, batch * per_slot[r]) for r in ratios}
    layers = []
    for seg in model.segments:
        period = len(seg.blocks)
        repeats = jax.tree.leaves(seg.blocks[0])[0].shape[0]
        per_position = []
        for k in range(period):
            states = [_layer_state(cfg, seg.first_layer + i * period + k, batch, num_pages, page_size, poison)
                      for i in range(repeats)]
            per_position.append(jax.tree.map(lambda *xs: jnp.stack(xs), *states))
        layers.append(tuple(per_position))
    mtp = _layer_state(cfg, cfg.num_layers, batch, num_pages, page_size, poison) if model.mtp is not None else None
    return DecodeState(
        lengths=jnp.zeros((batch,), jnp.int32), layers=tuple(layers), mtp=mtp, mtp_lengths=jnp.zeros((batch,), jnp.int32),
        page_tables={r: jnp.full((batch, per_slot[r]), -1, jnp.int32) for r in ratios},
        free_pages={r: jnp.ones((num_pages[r],), bool) for r in ratios}, max_len=max_len, page_size=page_size)


def allocate_pages(table: Int[Array, "batch max_pages"], free: Bool[Array, " pages"], needed: Int[Array, " batch"]):
    """Give each slot pages until it has ``needed`` of them (lowest free pages first, slot order).

    Returns ``(table, free, ok)``; ``ok`` is False when the pool ran out (the missing pages stay -1).
    """
    b, maxp = table.shape
    want = (jnp.arange(maxp)[None, :] < needed[:, None]) & (table < 0)
    rank = jnp.cumsum(want.reshape(-1)) - 1  # order of each request
    num_free = jnp.sum(free)
    free_ids = jnp.nonzero(free, size=free.shape[0], fill_value=free.shape[0])[0]
    granted = want.reshape(-1) & (rank < num_free)
    page = jnp.where(granted, free_ids[jnp.clip(rank, 0, free.shape[0] - 1)], -1)
    table = jnp.where(granted.reshape(b, maxp), page.reshape(b, maxp), table)
    free = free.at[jnp.where(granted, page, free.shape[0])].set(False, mode="drop")
    return table, free, jnp.sum(want) <= num_free


def release_slots(state: DecodeState, mask: Bool[Array, " batch"]) -> DecodeState:
    """Free the pages of the slots in ``mask`` and reset their lengths and compressor carries."""
    mask = jnp.asarray(mask, bool)
    tables, frees = {}, {}
    for r, table in state.page_tables.items():
        released = jnp.where(mask[:, None], table, -1).reshape(-1)
        frees[r] = state.free_pages[r].at[jnp.where(released >= 0, released, state.free_pages[r].shape[0])].set(
            True, mode="drop")
        tables[r] = jnp.where(mask[:, None], -1, table)

    def reset(ls: LayerState) -> LayerState:
        carry = None if ls.carry is None else _reset_stacked(ls.carry, mask)
        icarry = None if ls.index_carry is None else _reset_stacked(ls.index_carry, mask)
        return LayerState(ls.ring, ls.pool, carry, ls.index_pool, icarry)

    layers = tuple(tuple(reset(ls) for ls in seg) for seg in state.layers)
    return DecodeState(jnp.where(mask, 0, state.lengths), layers, state.mtp, jnp.where(mask, 0, state.mtp_lengths),
                       tables, frees, state.max_len, state.page_size)


def _reset_stacked(carry: Carry, mask):
    if carry.kv.ndim == 4:  # stacked over layers
        return jax.vmap(lambda c: c.reset(mask))(carry)
    return carry.reset(mask)


def check_capacity(state: DecodeState, new_tokens) -> None:
    """Host-side check before a step: raise a clear error if it would overflow a slot or the pools."""
    new = np.asarray(new_tokens).reshape(-1)
    lengths = np.asarray(state.lengths)
    if new.shape != lengths.shape:
        raise ValueError(f"{new.shape[0]} slots given new tokens, the state has {lengths.shape[0]}")
    over = np.nonzero(lengths + new > state.max_len)[0]
    if over.size:
        b = int(over[0])
        raise ValueError(f"slot {b} would hold {int(lengths[b] + new[b])} tokens; the state holds at most "
                         f"{state.max_len} per slot")
    for r, table in state.page_tables.items():
        need = -(-((lengths + new) // r) // state.page_size)
        have = (np.asarray(table) >= 0).sum(axis=1)
        extra = int(np.maximum(need - have, 0).sum())
        free = int(np.asarray(state.free_pages[r]).sum())
        if extra > free:
            raise ValueError(f"page pool for ratio {r} exhausted: {extra} pages needed, {free} free")

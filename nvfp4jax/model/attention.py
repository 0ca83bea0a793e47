"""Attention for the three layer types (spec §3): sliding window (SWA), CSA and HCA.

One shared K=V head of ``head_dim`` channels, partial interleaved RoPE on the last
``rope_head_dim``, a per-head sink, a grouped low-rank output (``wo_a`` per group, then ``wo_b``).
Compressed layers add a compressor (entries every ``ratio`` tokens); CSA adds the lightning
indexer that picks the top-k entries per query. This module holds the full-sequence (prefill
from position 0) forward pass; decode reuses the same projections with a state.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nvfp4jax.config import DeepSeekV4Config, LayerType
from nvfp4jax.model.layers import Linear, head_rms_norm, rms_norm
from nvfp4jax.ref import attention as ref_attn
from nvfp4jax.ref.compressor import compress_full_sequence, pool_windows
from nvfp4jax.ref.indexer import indexer_scores, select_topk
from nvfp4jax.ref.quant_sim import fp4_simulate, fp8_simulate, hadamard
from nvfp4jax.ref.rope import apply_rope, rope_frequencies

KV_SIM_BLOCK = 64
INDEX_SIM_BLOCK = 32


@functools.cache
def layer_frequencies(cfg: DeepSeekV4Config, layer_type: LayerType):
    """RoPE frequencies of a layer type (SWA: theta 1e4 plain; CSA/HCA: compress theta with YaRN)."""
    layer = next(i for i in range(len(cfg.compress_ratios)) if cfg.layer_type(i) == layer_type)
    return rope_frequencies(cfg, layer)


class Compressor(eqx.Module):
    """Softmax-gated pooling of ``ratio`` tokens (overlapping windows when ratio is 4)."""

    wkv: Float[Array, "width dim_model"]
    wgate: Float[Array, "width dim_model"]
    ape: Float[Array, "ratio width"]
    norm: Float[Array, " dim"]
    ratio: int = eqx.field(static=True)

    @property
    def overlap(self) -> bool:
        return self.ratio == 4

    def project(self, x: Float[Array, "batch seq dim_model"]) -> tuple[Array, Array]:
        """``(kv, gate)`` projections in float32 (``ape`` not yet added)."""
        xf = x.astype(jnp.float32)
        hp = jax.lax.Precision.HIGHEST
        return (jnp.einsum("bsm,wm->bsw", xf, self.wkv.astype(jnp.float32), precision=hp),
                jnp.einsum("bsm,wm->bsw", xf, self.wgate.astype(jnp.float32), precision=hp))

    def finish(self, pooled: Float[Array, "batch entries dim"], first, freqs, dtype, eps: float):
        """Norm (input rounded to the activation dtype, float32 math) and RoPE at ``ratio * j``.

        ``first`` is the index of the first entry (an int, or one per batch row).
        """
        c = rms_norm(pooled.astype(dtype), self.norm, eps)
        first = jnp.broadcast_to(jnp.asarray(first, jnp.int32).reshape(-1, 1), c.shape[:2])
        pos = (first + jnp.arange(c.shape[1], dtype=jnp.int32)[None, :]) * self.ratio
        return apply_rope(c, pos, freqs, has_heads=False)

    def chunk(self, x, positions, num_new, carry, freqs, eps: float):
        """Compress a chunk of new tokens continuing from the carry (decode and chunked prefill).

        ``positions[:, 0]`` is each row's first new position; only the first ``num_new[b]`` tokens
        of row b are real. Returns ``(entries, first_entry, num_entries, carry)``: ``entries`` holds
        ``ceil((ratio + T) / ratio)`` slots of which the first ``num_entries[b]`` are new entries
        ``first_entry[b], ...``.
        """
        r, t = self.ratio, x.shape[1]
        kv, gate = self.project(x)
        ape = self.ape.astype(jnp.float32)[positions % r]  # [b, t, width]
        gate = gate + ape
        p0 = positions[:, 0]
        pending = p0 % r
        length = -(-(r + t) // r) * r
        i = jnp.arange(length)[None, :]
        from_carry = i < pending[:, None]
        new_i = jnp.clip(i - pending[:, None], 0, t - 1)
        real = ~from_carry & (i - pending[:, None] < num_new[:, None])
        take = lambda a: jnp.take_along_axis(a, new_i[..., None], axis=1)
        seq_kv = jnp.where(from_carry[..., None], jnp.take_along_axis(carry.kv, jnp.clip(i, 0, r - 1)[..., None], 1),
                           jnp.where(real[..., None], take(kv), 0.0))
        seq_gate = jnp.where(from_carry[..., None], jnp.take_along_axis(carry.gate, jnp.clip(i, 0, r - 1)[..., None], 1),
                             jnp.where(real[..., None], take(gate), -jnp.inf))
        b, width = x.shape[0], kv.shape[-1]
        windows = length // r
        pooled = pool_windows(seq_kv.reshape(b, windows, r, width), seq_gate.reshape(b, windows, r, width), None,
                              overlap=self.overlap, prev_kv=carry.prev_kv, prev_gate=carry.prev_gate)
        num_entries = (pending + num_new) // r
        entries = self.finish(pooled, p0 // r, freqs, x.dtype, eps)
        # the incomplete window becomes the pending carry; CSA keeps the A half of the last full window
        start = (num_entries * r)[:, None] + jnp.arange(r)[None, :]
        new_carry_kv = jnp.take_along_axis(seq_kv, start[..., None], 1)
        new_carry_gate = jnp.take_along_axis(seq_gate, start[..., None], 1)
        prev_kv, prev_gate = carry.prev_kv, carry.prev_gate
        if self.overlap:
            last = jnp.clip(start - r, 0, length - 1)
            half = width // 2
            done = (num_entries > 0)[:, None, None]
            prev_kv = jnp.where(done, jnp.take_along_axis(seq_kv, last[..., None], 1)[..., :half], prev_kv)
            prev_gate = jnp.where(done, jnp.take_along_axis(seq_gate, last[..., None], 1)[..., :half], prev_gate)
        from nvfp4jax.state import Carry

        return entries, p0 // r, num_entries, Carry(new_carry_kv, new_carry_gate, prev_kv, prev_gate)

    def full_sequence(self, x, freqs, eps: float) -> Float[Array, "batch entries dim"]:
        kv, gate = self.project(x)
        pooled = compress_full_sequence(kv, gate, self.ape, overlap=self.overlap)
        return self.finish(pooled, 0, freqs, x.dtype, eps)


class Indexer(eqx.Module):
    """Lightning indexer: its own compressor (index_head_dim wide) and ReLU-weighted scores."""

    wq_b: Linear
    weights_proj: Float[Array, "heads dim_model"]
    compressor: Compressor
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    simulate: bool = eqx.field(static=True)

    def keys(self, x, freqs, eps):
        k = self.compressor.full_sequence(x, freqs, eps)
        return fp4_simulate(hadamard(k), INDEX_SIM_BLOCK) if self.simulate else k

    def queries(self, q_lat, positions, freqs):
        b, s, _ = q_lat.shape
        q = self.wq_b(q_lat).reshape(b, s, self.num_heads, self.head_dim)
        q = apply_rope(q, positions, freqs)
        return fp4_simulate(hadamard(q), INDEX_SIM_BLOCK) if self.simulate else q

    def head_weights(self, x):
        w = jnp.einsum("bsm,hm->bsh", x, self.weights_proj.astype(x.dtype), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
        return w * jnp.float32((self.head_dim * self.num_heads) ** -0.5)


class Attention(eqx.Module):
    wq_a: Linear
    q_norm: Float[Array, " q_lora"]
    wq_b: Linear
    wkv: Linear
    kv_norm: Float[Array, " head_dim"]
    wo_a: Float[Array, "groups o_lora group_in"]
    wo_b: Linear
    sink: Float[Array, " heads"]
    compressor: Compressor | None
    indexer: Indexer | None
    cfg: DeepSeekV4Config = eqx.field(static=True)
    layer_type: LayerType = eqx.field(static=True)

    @property
    def freqs(self):
        return layer_frequencies(self.cfg, self.layer_type)

    def qkv(self, u: Float[Array, "batch seq dim_model"], positions: Int[Array, "batch seq"]):
        """``(q_lat, q, kv)``: the latent query (also the indexer's input), roped q and the K=V vector."""
        cfg = self.cfg
        b, s, _ = u.shape
        q_lat = rms_norm(self.wq_a(u), self.q_norm, cfg.rms_norm_eps)
        q = head_rms_norm(self.wq_b(q_lat).reshape(b, s, cfg.num_heads, cfg.head_dim), cfg.rms_norm_eps)
        q = apply_rope(q, positions, self.freqs)
        kv = rms_norm(self.wkv(u), self.kv_norm, cfg.rms_norm_eps)
        kv = apply_rope(kv, positions, self.freqs, has_heads=False)
        return q_lat, q, self.simulate_kv(kv)

    def simulate_kv(self, kv: Float[Array, "*rows head_dim"]) -> Float[Array, "*rows head_dim"]:
        """FP8 round trip (block 64) of the non-rope channels; the rope channels stay as they are."""
        if not self.cfg.quant_simulation:
            return kv
        n = self.cfg.nope_head_dim
        return jnp.concatenate([fp8_simulate(kv[..., :n], KV_SIM_BLOCK), kv[..., n:]], axis=-1)

    def output(self, o: Float[Array, "batch seq heads head_dim"], positions) -> Float[Array, "batch seq dim_model"]:
        """Inverse RoPE on the output's rope channels, grouped ``wo_a`` (BF16 BMM), then ``wo_b``."""
        cfg = self.cfg
        b, s = o.shape[:2]
        o = apply_rope(o, positions, self.freqs, inverse=True)
        o = o.reshape(b, s, cfg.o_groups, -1)
        z = jnp.einsum("bsgd,god->bsgo", o, self.wo_a.astype(o.dtype), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST).astype(o.dtype)
        return self.wo_b(z.reshape(b, s, -1))

    @jax.named_scope("attention")
    def __call__(self, u: Float[Array, "batch seq dim_model"], positions: Int[Array, "batch seq"]):
        """Full-sequence forward: positions are ``0..S-1`` for every row (prefill from 0)."""
        cfg = self.cfg
        q_lat, q, kv = self.qkv(u, positions)
        mask = ref_attn.window_mask(positions, positions, cfg.sliding_window)
        keys = kv
        if self.compressor is not None:
            ratio = self.compressor.ratio
            entries = self.compressor.full_sequence(u, self.freqs, cfg.rms_norm_eps)
            entries = self.simulate_kv(entries)
            m = entries.shape[1]
            visible = jnp.arange(m)[None, None, :] < ((positions + 1) // ratio)[..., None]
            if self.indexer is not None:
                scores = indexer_scores(self.indexer.queries(q_lat, positions, self.freqs),
                                        self.indexer.keys(u, self.freqs, cfg.rms_norm_eps), self.indexer.head_weights(u))
                chosen = select_topk(scores, positions, ratio, cfg.index_topk)
                visible = visible & selection_mask(chosen, m)
            keys = jnp.concatenate([kv, entries.astype(kv.dtype)], axis=1)
            mask = jnp.concatenate([mask, visible], axis=-1)
        o = ref_attn.sink_attention(q, keys, mask, self.sink, cfg.head_dim**-0.5)
        return self.output(o, positions)

    @jax.named_scope("attention_step")
    def step(self, u, positions, num_new, layer_state, page_table, page_size: int):
        """Attend for a chunk of new tokens continuing each slot's sequence; returns ``(out, layer_state)``.

        ``positions[:, 0]`` is each slot's current length; only the first ``num_new[b]`` tokens of
        slot b are real (the rest are padding: computed, never stored). Keys: the window ring, the
        chunk's own K=V vectors, and (CSA/HCA) every compressed entry of the slot, read through the
        page table; unused and unallocated rows are masked and zeroed, so NaN there is harmless.
        """
        from nvfp4jax.state import KVRows, LayerState

        cfg = self.cfg
        dtype = u.dtype
        w = cfg.sliding_window
        b, t = positions.shape
        p0 = positions[:, 0]
        q_lat, q, kv = self.qkv(u, positions)  # kv already carries the FP8 simulation: storing it is exact
        slots = jnp.arange(w)[None, :]
        ring_pos = p0[:, None] - 1 - jnp.mod(p0[:, None] - 1 - slots, w)
        ring_ok = ring_pos >= 0
        new_ok = jnp.arange(t)[None, :] < num_new[:, None]
        ring = layer_state.ring.decode(dtype)
        keys = jnp.concatenate([jnp.where(ring_ok[..., None], ring, 0), kv], axis=1)
        key_pos = jnp.concatenate([ring_pos, positions], axis=1)
        mask = ref_attn.window_mask(positions, key_pos, w) & jnp.concatenate([ring_ok, new_ok], axis=1)[:, None, :]
        pool, carry, index_pool, index_carry = (layer_state.pool, layer_state.carry, layer_state.index_pool,
                                                layer_state.index_carry)
        if self.compressor is not None:
            ratio = self.compressor.ratio
            entries, first, count, carry = self.compressor.chunk(u, positions, num_new, carry, self.freqs, cfg.rms_norm_eps)
            rows = KVRows.encode(entries, cfg.nope_head_dim, cfg.quant_simulation)
            pool = _scatter_pool(pool, page_table, first, count, rows, page_size)
            stored = _gather_pool(pool, page_table).decode(dtype)  # [b, entries, d]
            m = stored.shape[1]
            total = (p0 + num_new) // ratio
            have = jnp.arange(m)[None, :] < total[:, None]
            visible = jnp.arange(m)[None, None, :] < ((positions + 1) // ratio)[..., None]
            visible = visible & have[:, None, :]
            if self.indexer is not None:
                ientries, _, _, index_carry = self.indexer.compressor.chunk(u, positions, num_new, index_carry, self.freqs,
                                                                            cfg.rms_norm_eps)
                if self.indexer.simulate:
                    ientries = fp4_simulate(hadamard(ientries), INDEX_SIM_BLOCK)
                index_pool = _scatter_pool(index_pool, page_table, first, count, ientries, page_size)
                ikeys = _gather_pool(index_pool, page_table).astype(dtype)
                ikeys = jnp.where(have[..., None], ikeys, 0)
                scores = indexer_scores(self.indexer.queries(q_lat, positions, self.freqs), ikeys,
                                        self.indexer.head_weights(u))
                scores = jnp.where(have[:, None, :], scores, -jnp.inf)
                chosen = select_topk(scores, positions, ratio, cfg.index_topk)
                visible = visible & selection_mask(chosen, m)
            keys = jnp.concatenate([keys, jnp.where(have[..., None], stored, 0)], axis=1)
            mask = jnp.concatenate([mask, visible], axis=-1)
        o = ref_attn.sink_attention(q, keys, mask, self.sink, cfg.head_dim**-0.5)
        # the ring keeps the last `window` real tokens: slot pos % window
        i = jnp.arange(t)[None, :]
        keep = new_ok & (i >= num_new[:, None] - w)
        slot = jnp.where(keep, positions % w, w)
        new_rows = KVRows.encode(kv, cfg.nope_head_dim, cfg.quant_simulation)
        ring_rows = jax.tree.map(lambda r, v: r.at[jnp.arange(b)[:, None], slot].set(v.astype(r.dtype), mode="drop"),
                                 layer_state.ring, new_rows)
        return self.output(o, positions), LayerState(ring_rows, pool, carry, index_pool, index_carry)


def _gather_pool(pool, table):
    """Dense view ``[batch, pages * page, ...]`` of each slot's entries (unallocated pages read page 0)."""
    rows = jax.tree.map(lambda a: a[jnp.maximum(table, 0)], pool)
    return jax.tree.map(lambda a: a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:]), rows)


def _scatter_pool(pool, table, first, count, values, page_size: int):
    """Write ``values[:, w]`` as entry ``first + w`` of each slot for ``w < count`` (others dropped)."""
    b, w = jax.tree.leaves(values)[0].shape[:2]
    j = first[:, None] + jnp.arange(w)[None, :]
    page = jnp.take_along_axis(table, jnp.clip(j // page_size, 0, table.shape[1] - 1), axis=1)
    ok = (jnp.arange(w)[None, :] < count[:, None]) & (page >= 0) & (j // page_size < table.shape[1])
    num_pages = jax.tree.leaves(pool)[0].shape[0]
    page = jnp.where(ok, page, num_pages)  # out of range: dropped
    return jax.tree.map(lambda p, v: p.at[page, j % page_size].set(v.astype(p.dtype), mode="drop"), pool, values)


def selection_mask(chosen: Int[Array, "batch seq k"], num_entries: int):
    """Boolean ``[batch, seq, entries]`` mask of the selected entry indices (``-1`` ignored)."""
    b, s, _ = chosen.shape
    slot = jnp.where(chosen < 0, num_entries, chosen)
    mask = jnp.zeros((b, s, num_entries + 1), bool)
    mask = mask.at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], slot].set(True)
    return mask[..., :num_entries]

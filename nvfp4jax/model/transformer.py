"""The whole model: embedding, scanned stacks of blocks, mHC head, final norm, LM head, MTP.

Layers are applied in order 0..L-1, but stored as *segments*: maximal runs of a repeating pattern
of identical block structures (same attention type and routing kind), e.g. V4-Flash = [SWA hash]
x2, [CSA hash], [HCA, CSA] x20. Each segment's blocks are stacked and run under ``jax.lax.scan``,
so a 43- or 61-layer model compiles as a handful of loop bodies.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from nvfp4jax.config import DeepSeekV4Config
from nvfp4jax.model.block import Block
from nvfp4jax.model.layers import Linear, rms_norm
from nvfp4jax.model.mhc import HyperHead


def layer_kind(cfg: DeepSeekV4Config, layer: int) -> tuple[str, bool]:
    return cfg.layer_type(layer), cfg.is_hash_layer(layer)


def segment_schedule(cfg: DeepSeekV4Config) -> tuple[tuple[int, int, int], ...]:
    """``(first_layer, period, repeats)`` segments covering layers 0..L-1 in order.

    Greedy: at each layer take the pattern of period 1 or 2 whose repeats cover the most layers.
    """
    kinds = [layer_kind(cfg, i) for i in range(cfg.num_layers)]
    out, i = [], 0
    while i < len(kinds):
        best = (1, 1)
        for period in (1, 2):
            pattern = kinds[i : i + period]
            if len(pattern) < period:
                continue
            r = 1
            while kinds[i + r * period : i + (r + 1) * period] == pattern:
                r += 1
            if period * r > best[0] * best[1]:
                best = (period, r)
        out.append((i, *best))
        i += best[0] * best[1]
    return tuple(out)


class Segment(eqx.Module):
    """``period`` stacked blocks (each stacked over ``repeats``), applied in pattern order."""

    blocks: tuple[Block, ...]
    first_layer: int = eqx.field(static=True)

    def __call__(self, x, token_ids, positions, *, collect: bool = False):
        def body(h, layer_blocks):
            outs = []
            for block in layer_blocks:
                h = block(h, token_ids, positions)
                outs.append(h)
            return h, (jnp.stack(outs) if collect else None)

        x, hidden = jax.lax.scan(body, x, self.blocks)
        if collect:  # [repeats, period, ...] -> [layers, ...] in layer order
            hidden = hidden.reshape(-1, *hidden.shape[2:])
        return x, hidden


    def step(self, x, token_ids, positions, num_new, states, page_tables, page_size: int):
        def body(h, xs):
            layer_blocks, layer_states = xs
            new_states = []
            for block, st in zip(layer_blocks, layer_states):
                h, st = block.step(h, token_ids, positions, num_new, st, page_tables, page_size)
                new_states.append(st)
            return h, tuple(new_states)

        return jax.lax.scan(body, x, (self.blocks, states))


class MTP(eqx.Module):
    """Multi-token prediction block (spec §5): predicts token t+2 from the hidden state at t and token t+1."""

    e_proj: Linear
    h_proj: Linear
    enorm: Float[Array, " dim"]
    hnorm: Float[Array, " dim"]
    norm: Float[Array, " dim"]
    head_mix: HyperHead
    block: Block
    eps: float = eqx.field(static=True)

    def __call__(self, x_main, next_embed, next_ids, positions, head):
        e = rms_norm(next_embed, self.enorm, self.eps)
        h = rms_norm(x_main, self.hnorm, self.eps)
        x = self.e_proj(e)[:, :, None, :] + self.h_proj(h)
        x = self.block(x, next_ids, positions)
        return head(rms_norm(self.head_mix(x), self.norm, self.eps)), x


class Transformer(eqx.Module):
    embed: Float[Array, "vocab dim"]
    segments: tuple[Segment, ...]
    head_mix: HyperHead
    norm: Float[Array, " dim"]
    head: Float[Array, "vocab dim"]
    mtp: MTP | None
    cfg: DeepSeekV4Config = eqx.field(static=True)

    def check_tokens(self, token_ids) -> None:
        """Clear errors for bad token input (before anything is traced or launched)."""
        if isinstance(token_ids, jax.core.Tracer):
            return
        ids = jnp.asarray(token_ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"token ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def logits(self, x: Float[Array, "batch seq streams dim"]) -> Float[Array, "batch seq vocab"]:
        return self.project(rms_norm(self.head_mix(x), self.norm, self.cfg.rms_norm_eps))

    def project(self, y: Float[Array, "batch seq dim"]) -> Float[Array, "batch seq vocab"]:
        return jnp.einsum("bsd,vd->bsv", y.astype(jnp.float32), self.head.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def hidden(self, token_ids: Int[Array, "batch seq"], *, collect: bool = False):
        """Residual stream after the last block ``[batch, seq, streams, dim]`` (and per-layer streams)."""
        cfg = self.cfg
        b, s = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        e = self.embed[token_ids]
        x = jnp.broadcast_to(e[:, :, None, :], (b, s, cfg.hc_mult, cfg.hidden_size))
        per_layer = []
        for seg in self.segments:
            x, h = seg(x, token_ids, positions, collect=collect)
            per_layer.append(h)
        return x, (jnp.concatenate(per_layer) if collect else None)

    def __call__(self, token_ids: ArrayLike) -> Float[Array, "batch seq vocab"]:
        """Full-sequence prefill from position 0: float32 logits at every position.

        ``token_ids`` must be an integer ``[batch, seq]`` array inside the vocabulary; anything else
        raises a ``ValueError``/``TypeError`` naming the problem (checked before tracing).
        """
        self.check_tokens(token_ids)
        x, _ = self.hidden(token_ids)
        return self.logits(x)

    def step(self, state, token_ids: Int[Array, "batch chunk"], num_new: Int[Array, " batch"] | None = None,
             *, logits_at: Int[Array, "batch n"] | None = None):
        """Process a chunk of new tokens for every slot; returns ``(logits, hidden, state)``.

        Slot b continues from ``state.lengths[b]``; only its first ``num_new[b]`` tokens (default:
        all) are real — the rest is padding, computed but never stored, and ``num_new[b] = 0``
        leaves the slot untouched. ``logits`` are float32 ``[batch, chunk, vocab]``, or only at the
        chunk positions ``logits_at[b]`` (``[batch, n, vocab]``: a long prefill then skips the
        vocabulary projection of every other position), ``hidden`` the residual stream before the
        head ``[batch, chunk, streams, dim]`` (the MTP block's input).
        Capacity is not checked here (inside jit); call ``state.check_capacity`` first.
        """
        from nvfp4jax.state import DecodeState, allocate_pages

        cfg = self.cfg
        b, t = token_ids.shape
        num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
        positions = state.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        tables, frees = {}, {}
        for r, table in state.page_tables.items():
            need = -(-((state.lengths + num_new) // r) // state.page_size)
            tables[r], frees[r], _ = allocate_pages(table, state.free_pages[r], need)
        e = self.embed[token_ids]
        x = jnp.broadcast_to(e[:, :, None, :], (b, t, cfg.hc_mult, cfg.hidden_size))
        new_layers = []
        for seg, seg_state in zip(self.segments, state.layers):
            x, seg_state = seg.step(x, token_ids, positions, num_new, seg_state, tables, state.page_size)
            new_layers.append(seg_state)
        state = DecodeState(state.lengths + num_new, tuple(new_layers), state.mtp, state.mtp_lengths, tables, frees,
                            state.max_len, state.page_size)
        if logits_at is not None:
            return self.logits(jnp.take_along_axis(x, logits_at[:, :, None, None], axis=1)), x, state
        return self.logits(x), x, state

    def mtp_step(self, state, hidden, next_ids: Int[Array, "batch chunk"], num_new: Int[Array, " batch"] | None = None):
        """MTP logits (predicting token t+2) for a chunk, with the MTP block's own window cache.

        ``hidden[:, i]`` is the main model's residual stream at position ``state.mtp_lengths + i``
        and ``next_ids[:, i]`` the token that follows it. Returns ``(logits, state)``.
        """
        from nvfp4jax.state import DecodeState

        if self.mtp is None:
            raise ValueError("this model has no MTP block")
        b, t = next_ids.shape
        num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
        positions = state.mtp_lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        mtp = self.mtp
        e = rms_norm(self.embed[next_ids], mtp.enorm, mtp.eps)
        h = rms_norm(hidden, mtp.hnorm, mtp.eps)
        x = mtp.e_proj(e)[:, :, None, :] + mtp.h_proj(h)
        x, ring_state = mtp.block.step(x, next_ids, positions, num_new, state.mtp, {}, state.page_size)
        logits = self.project(rms_norm(mtp.head_mix(x), mtp.norm, mtp.eps))
        state = DecodeState(state.lengths, state.layers, ring_state, state.mtp_lengths + num_new, state.page_tables,
                            state.free_pages, state.max_len, state.page_size)
        return logits, state

    def mtp_logits(self, x_main, next_ids: Int[Array, "batch seq"]) -> Float[Array, "batch seq vocab"]:
        """MTP logits at every position t (predicting token t+2) from ``x_main`` and token ``t+1``."""
        if self.mtp is None:
            raise ValueError("this model has no MTP block")
        b, s = next_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        out, _ = self.mtp(x_main, self.embed[next_ids], next_ids, positions, self.project)
        return out

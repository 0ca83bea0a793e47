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
from nvfp4jax.ref.compressor import compress_full_sequence
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

    def finish(self, pooled: Float[Array, "batch entries dim"], first: Int[Array, ""] | int, freqs, dtype, eps: float):
        """Norm (input rounded to the activation dtype, float32 math) and RoPE at ``ratio * j``."""
        c = rms_norm(pooled.astype(dtype), self.norm, eps)
        pos = (first + jnp.arange(c.shape[1], dtype=jnp.int32)) * self.ratio
        return apply_rope(c, jnp.broadcast_to(pos, c.shape[:2]), freqs, has_heads=False)

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


def selection_mask(chosen: Int[Array, "batch seq k"], num_entries: int):
    """Boolean ``[batch, seq, entries]`` mask of the selected entry indices (``-1`` ignored)."""
    b, s, _ = chosen.shape
    slot = jnp.where(chosen < 0, num_entries, chosen)
    mask = jnp.zeros((b, s, num_entries + 1), bool)
    mask = mask.at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], slot].set(True)
    return mask[..., :num_entries]

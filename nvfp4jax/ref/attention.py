"""Merged window + compressed-entry attention with a per-head sink (spec §3.6, Appendix A).

One softmax over the union of keys; K = V (the same 512-d vectors); the sink logit enters the
denominator only. Scores and softmax in float32; probabilities are cast to the value dtype before
the PV product (as the reference kernel does with BF16 operands).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def sink_attention(
    q: Float[Array, "batch seq heads dim"],
    keys: Float[Array, "batch keys dim"],
    mask: Bool[Array, "batch seq keys"],
    sink: Float[Array, " heads"],
    scale: float,
) -> Float[Array, "batch seq heads dim"]:
    """``softmax([q.k * scale | sink])[:-1] @ keys`` over the keys where ``mask`` is true."""
    s = jnp.einsum("bshd,bkd->bshk", q, keys, preferred_element_type=jnp.float32, precision="highest")
    s = jnp.where(mask[:, :, None, :], s * jnp.float32(scale), -jnp.inf)
    sink = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :], s.shape[:-1])
    m = jnp.maximum(jnp.max(s, axis=-1), sink)  # [b, s, h]
    p = jnp.exp(s - m[..., None])
    den = jnp.sum(p, axis=-1) + jnp.exp(sink - m)
    p = (p / den[..., None]).astype(keys.dtype)
    return jnp.einsum("bshk,bkd->bshd", p, keys, preferred_element_type=jnp.float32, precision="highest").astype(q.dtype)


def window_mask(q_positions, k_positions, window: int):
    """Key at position t is visible from query p iff ``p - window < t <= p`` (``window`` keys incl. itself)."""
    d = q_positions[..., :, None] - k_positions[..., None, :]
    return (d >= 0) & (d < window)

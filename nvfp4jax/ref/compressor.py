"""KV compressor (spec §3.4): softmax-gated pooling of ``ratio`` tokens into one entry.

HCA (``overlap=False``, ratio 128): entry j pools tokens ``[r*j, r*j + r)`` with a per-channel
softmax over the window of ``gate + ape``. CSA (``overlap=True``, ratio 4): projections are
``2 * dim`` wide; entry j pools ``2r`` slots — the *first* half (A) of window j-1's tokens and the
*second* half (B) of window j's tokens, per channel. Before window 0 there is nothing (kv 0,
gate -inf), unless a carry from an earlier chunk supplies window -1's A half.

All math is float32. Only complete windows emit entries; emitted entries never change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def pool_windows(
    kv: Float[Array, "batch windows ratio width"],
    gate: Float[Array, "batch windows ratio width"],
    ape: Float[Array, "ratio width"] | None,
    *,
    overlap: bool,
    prev_kv: Float[Array, "batch ratio dim"] | None = None,
    prev_gate: Float[Array, "batch ratio dim"] | None = None,
) -> Float[Array, "batch windows dim"]:
    """Pool complete windows into entries (float32, before norm/RoPE).

    ``width`` is ``dim`` (HCA) or ``2 * dim`` (CSA). With ``overlap``, ``prev_kv``/``prev_gate``
    are window -1's A halves (gate already including ``ape``); ``None`` means no such window.
    ``ape=None``: the gates already include the position bias.
    """
    kv = kv.astype(jnp.float32)
    gate = gate.astype(jnp.float32)
    if ape is not None:
        gate = gate + jnp.broadcast_to(ape.astype(jnp.float32), gate.shape)
    if overlap:
        b, n, r, width = kv.shape
        d = width // 2
        a_kv, a_gate = kv[..., :d], gate[..., :d]  # contribution to the next window
        b_kv, b_gate = kv[..., d:], gate[..., d:]  # contribution to this window
        if prev_kv is None:
            prev_kv = jnp.zeros((b, r, d), jnp.float32)
            prev_gate = jnp.full((b, r, d), -jnp.inf, jnp.float32)
        shifted_kv = jnp.concatenate([prev_kv.astype(jnp.float32)[:, None], a_kv[:, :-1]], axis=1)
        shifted_gate = jnp.concatenate([prev_gate.astype(jnp.float32)[:, None], a_gate[:, :-1]], axis=1)
        kv = jnp.concatenate([shifted_kv, b_kv], axis=2)  # [b, n, 2r, d]
        gate = jnp.concatenate([shifted_gate, b_gate], axis=2)
    weights = jax.nn.softmax(gate, axis=2)
    return jnp.sum(weights * kv, axis=2)


def compress_full_sequence(
    kv: Float[Array, "batch seq width"],
    gate: Float[Array, "batch seq width"],
    ape: Float[Array, "ratio width"],
    *,
    overlap: bool,
) -> Float[Array, "batch entries dim"]:
    """Entries of every complete window of a sequence starting at position 0 (``seq // ratio`` of them)."""
    r = ape.shape[0]
    b, s, width = kv.shape
    n = s // r
    if n == 0:
        return jnp.zeros((b, 0, width // 2 if overlap else width), jnp.float32)
    kv = kv[:, : n * r].reshape(b, n, r, width)
    gate = gate[:, : n * r].reshape(b, n, r, width)
    return pool_windows(kv, gate, ape, overlap=overlap)

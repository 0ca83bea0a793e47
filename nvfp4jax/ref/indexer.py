"""Lightning indexer scores and causal top-k selection (spec §3.5).

``score[p, j] = sum_h w[p, h] * ReLU(q[p, h] . k[j])`` in float32, over entries visible to query
position p (``j < (p + 1) // ratio``). Selection keeps the ``k`` best visible entries; **ties
break toward the lower entry index** (``jax.lax.top_k`` is stable). Slots beyond the number of
visible entries are ``-1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def indexer_scores(
    q: Float[Array, "batch seq heads dim"],
    keys: Float[Array, "batch entries dim"],
    weights: Float[Array, "batch seq heads"],
) -> Float[Array, "batch seq entries"]:
    logits = jnp.einsum("bshd,bjd->bshj", q.astype(jnp.float32), keys.astype(jnp.float32), precision="highest")
    return jnp.einsum("bshj,bsh->bsj", jax.nn.relu(logits), weights.astype(jnp.float32), precision="highest")


def select_topk(
    scores: Float[Array, "batch seq entries"],
    positions: Int[Array, "batch seq"],
    ratio: int,
    k: int,
) -> Int[Array, "batch seq k"]:
    """Indices of the top-``k`` visible entries per query (ties: lower index first), ``-1`` padded."""
    n = scores.shape[-1]
    k = min(k, n)
    if k == 0:
        return jnp.zeros((*scores.shape[:-1], 0), jnp.int32)
    visible_count = (positions + 1) // ratio  # [b, s]
    visible = jnp.arange(n)[None, None, :] < visible_count[..., None]
    masked = jnp.where(visible, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    rank = jnp.arange(k)[None, None, :]
    return jnp.where(rank < visible_count[..., None], idx, -1).astype(jnp.int32)

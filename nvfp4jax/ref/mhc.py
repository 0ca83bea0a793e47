"""Manifold-constrained hyper-connections (mHC, spec §2.2-§2.4): pre, post and head.

The residual stream holds ``n = hc_mult`` copies of the hidden state. ``hc_pre`` computes, from
the RMS-normalised flattened streams, the collapse weights ``pre``, the expansion weights
``post`` and a doubly-stochastic mixing matrix ``comb`` (Sinkhorn, exact op order of the official
kernel); ``hc_post`` expands a sub-layer output back and mixes the residual with **comb
transposed**. All math float32; outputs cast to the stream dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _mixes(x: Array, fn: Array, norm_eps: float) -> Array:
    z = x.astype(jnp.float32).reshape(*x.shape[:-2], -1)  # stream-major flatten
    rho = jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + jnp.float32(norm_eps))
    return jnp.einsum("...k,mk->...m", z, fn.astype(jnp.float32), precision="highest") * rho


def sinkhorn(logits: Float[Array, "*rows n n"], iters: int, eps: float) -> Float[Array, "*rows n n"]:
    """Row softmax + eps, column normalisation, then ``iters - 1`` x (row, column) normalisations."""
    eps = jnp.float32(eps)
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    return c


def hc_pre(
    x: Float[Array, "*rows streams dim"],
    fn: Float[Array, "mix streams_dim"],
    scale: Float[Array, 3],
    base: Float[Array, " mix"],
    *,
    norm_eps: float,
    hc_eps: float,
    iters: int,
) -> tuple[Float[Array, "*rows dim"], Float[Array, "*rows streams"], Float[Array, "*rows streams streams"]]:
    """Collapse the streams: returns ``(u, post, comb)``; ``u`` in ``x.dtype``."""
    n = x.shape[-2]
    m = _mixes(x, fn, norm_eps)
    scale = scale.astype(jnp.float32)
    base = jnp.broadcast_to(base.astype(jnp.float32), m.shape)
    pre = jax.nn.sigmoid(m[..., :n] * scale[0] + base[..., :n]) + jnp.float32(hc_eps)
    post = 2.0 * jax.nn.sigmoid(m[..., n : 2 * n] * scale[1] + base[..., n : 2 * n])
    logits = (m[..., 2 * n :] * scale[2] + base[..., 2 * n :]).reshape(*m.shape[:-1], n, n)
    comb = sinkhorn(logits, iters, hc_eps)
    u = jnp.einsum("...j,...jd->...d", pre, x.astype(jnp.float32), precision="highest")
    return u.astype(x.dtype), post, comb


def hc_post(
    a: Float[Array, "*rows dim"],
    residual: Float[Array, "*rows streams dim"],
    post: Float[Array, "*rows streams"],
    comb: Float[Array, "*rows streams streams"],
) -> Float[Array, "*rows streams dim"]:
    """``X[k] = post[k] * a + sum_j comb[j, k] * R[j]`` (float32 math, result in ``residual.dtype``)."""
    mixed = jnp.einsum("...jk,...jd->...kd", comb, residual.astype(jnp.float32), precision="highest")
    return (post[..., None] * a.astype(jnp.float32)[..., None, :] + mixed).astype(residual.dtype)


def hc_head(
    x: Float[Array, "*rows streams dim"],
    fn: Float[Array, "streams streams_dim"],
    scale: Float[Array, 1],
    base: Float[Array, " streams"],
    *,
    norm_eps: float,
    hc_eps: float,
) -> Float[Array, "*rows dim"]:
    """Final collapse: ``sum_j (sigmoid(m_j * scale + base_j) + eps) X[j]`` (no Sinkhorn)."""
    m = _mixes(x, fn, norm_eps)
    base = jnp.broadcast_to(base.astype(jnp.float32), m.shape)
    w = jax.nn.sigmoid(m * scale.astype(jnp.float32)[0] + base) + jnp.float32(hc_eps)
    return jnp.einsum("...j,...jd->...d", w, x.astype(jnp.float32), precision="highest").astype(x.dtype)

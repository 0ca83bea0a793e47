"""Router and routed experts (spec §4).

Routing: ``s = sqrt(softplus(logits))`` (float32); experts chosen by top-k of ``s + bias``
(score layers; **ties go to the lower expert index**, ``jax.lax.top_k`` being stable) or read
from ``tid2eid[token]`` (hash layers); weights are the *unbiased* ``s`` of the chosen experts,
renormalised to sum 1, times ``routed_scaling_factor``.

Experts: SwiGLU with ``gate <= limit`` and ``|up| <= limit``, the routing weight applied before the
down projection, each expert's output in the activation dtype, summed over the k experts in
float32. The reference groups (token, expert) pairs by expert and runs ``jax.lax.ragged_dot``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nvfp4jax.formats.nvfp4 import NVFP4Tensor


def route(
    logits: Float[Array, "tokens experts"],
    k: int,
    routed_scale: float,
    bias: Float[Array, " experts"] | None = None,
    hash_experts: Int[Array, "tokens k"] | None = None,
) -> tuple[Float[Array, "tokens k"], Int[Array, "tokens k"]]:
    """Returns ``(weights, expert_ids)``; exactly one of ``bias`` / ``hash_experts`` is given."""
    if (bias is None) == (hash_experts is None):
        raise ValueError("route takes exactly one of bias (score routing) and hash_experts (hash routing)")
    s = jnp.sqrt(jax.nn.softplus(logits.astype(jnp.float32)))
    if hash_experts is None:
        _, idx = jax.lax.top_k(s + bias.astype(jnp.float32)[None, :], k)
    else:
        idx = hash_experts
    idx = idx.astype(jnp.int32)
    w = jnp.take_along_axis(s, idx, axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w * jnp.float32(routed_scale), idx


def swiglu(gate: Array, up: Array, limit: float) -> Array:
    """``silu(min(gate, limit)) * clip(up, -limit, limit)`` in float32."""
    g = jnp.minimum(gate.astype(jnp.float32), jnp.float32(limit))
    u = jnp.clip(up.astype(jnp.float32), -limit, limit)
    return jax.nn.silu(g) * u


def _dequant(w: NVFP4Tensor | Array) -> Array:
    return w.dequantize() if isinstance(w, NVFP4Tensor) else w.astype(jnp.float32)


def _act(x: Array, quantize: bool) -> Array:
    """The activation as the GEMM sees it: NVFP4 round trip per row (recipe nvfp4) or as is."""
    from nvfp4jax.ref.gemm import quantize_nvfp4

    return quantize_nvfp4(x).dequantize() if quantize else x.astype(jnp.float32)


def moe_experts(
    x: Float[Array, "tokens dim"],
    weights: Float[Array, "tokens k"],
    expert_ids: Int[Array, "tokens k"],
    w1: NVFP4Tensor | Float[Array, "experts inter dim"],
    w3: NVFP4Tensor | Float[Array, "experts inter dim"],
    w2: NVFP4Tensor | Float[Array, "experts dim inter"],
    *,
    swiglu_limit: float,
    quantize_activations: bool,
) -> Float[Array, "tokens dim"]:
    """Routed-expert output ``sum_k y_k`` (float32) for every token.

    ``quantize_activations`` selects recipe ``nvfp4`` (NVFP4 inputs to both GEMMs: per token for
    L1, per (token, expert) row for L2); weights are NVFP4 (or plain arrays for recipe bf16).
    """
    t, k = expert_ids.shape
    num_experts = (w1.values if isinstance(w1, NVFP4Tensor) else w1).shape[0]
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = _act(x, quantize_activations)[token_of]  # [t*k, d]
    hp = jax.lax.Precision.HIGHEST
    # GEMM outputs are rounded to the activation dtype, as in the official model
    gate = jax.lax.ragged_dot(xs, jnp.swapaxes(_dequant(w1), 1, 2), sizes, precision=hp).astype(x.dtype)
    up = jax.lax.ragged_dot(xs, jnp.swapaxes(_dequant(w3), 1, 2), sizes, precision=hp).astype(x.dtype)
    h = swiglu(gate, up, swiglu_limit) * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    h = _act(h.astype(x.dtype), quantize_activations)
    y = jax.lax.ragged_dot(h, jnp.swapaxes(_dequant(w2), 1, 2), sizes, precision=hp).astype(x.dtype)
    out = jnp.zeros((t * k, y.shape[-1]), jnp.float32).at[order].set(y.astype(jnp.float32))
    return out.reshape(t, k, -1).sum(axis=1)

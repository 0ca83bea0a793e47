"""Partial, interleaved (GPT-J) RoPE on the last ``rope_dim`` channels, with DeepSeek's YaRN.

Pairs ``(2i, 2i+1)`` of the trailing ``rope_dim`` channels rotate by ``pos * f_i`` with
``f_i = theta ** (-2i / rope_dim)``; YaRN (compressed layers only) interpolates the frequencies
without any attention-temperature factor (spec §3.2). The inverse rotation (``inverse=True``)
undoes the rotation that V carries on the attention output (spec §3.7).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from nvfp4jax.config import DeepSeekV4Config, yarn_ramp_bounds


def rope_frequencies(cfg: DeepSeekV4Config, layer: int) -> np.ndarray:
    """Per-pair angular frequencies ``f_i`` (float32 ``[rope_dim / 2]``) of ``layer``."""
    theta, yarn = cfg.rope_params(layer)
    rd = cfg.rope_head_dim
    freqs = 1.0 / theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    if yarn:
        ys = cfg.rope_scaling_dict
        factor = float(ys["factor"])
        lo, hi = yarn_ramp_bounds(theta, rd, int(ys["original_max_position_embeddings"]),
                                  float(ys["beta_fast"]), float(ys["beta_slow"]))
        ramp = np.clip((np.arange(rd // 2, dtype=np.float64) - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
        freqs = freqs / factor * ramp + freqs * (1.0 - ramp)
    return freqs.astype(np.float32)


def apply_rope(
    x: Float[Array, "*rows dim"],
    positions: Int[Array, "*positions"],
    freqs: Float[ArrayLike, " pairs"],
    *,
    inverse: bool = False,
    has_heads: bool = True,
) -> Array:
    """Rotate the trailing ``2 * len(freqs)`` channels of ``x`` (math in float32, result in ``x.dtype``).

    ``positions`` broadcast over the head axis when ``has_heads`` (``x`` is ``[..., seq, heads, dim]``).
    """
    rd = 2 * freqs.shape[0]
    freqs = jnp.asarray(freqs)
    angles = positions.astype(jnp.float32)[..., None] * freqs.reshape((1,) * positions.ndim + freqs.shape)
    if has_heads:
        angles = angles[..., None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    rot = x[..., -rd:].astype(jnp.float32)
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(rot.shape)
    return jnp.concatenate([x[..., :-rd], out.astype(x.dtype)], axis=-1)

"""Helpers for the GPU kernel tests: V4 linear shapes, input makers, output poisoning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: (name, n, k) of every NVFP4 linear of V4-Flash and V4-Pro (spec §6.1, out x in)
FLASH_LINEARS = [
    ("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
    ("indexer.wq_b", 8192, 1024), ("shared.w1/w3", 2048, 4096), ("shared.w2", 4096, 2048),
    ("mtp.e_proj/h_proj", 4096, 4096),
]
PRO_LINEARS = [
    ("wq_a", 1536, 7168), ("wq_b", 65536, 1536), ("wkv", 512, 7168), ("wo_b", 7168, 16384),
    ("indexer.wq_b", 8192, 1536), ("shared.w1/w3", 3072, 7168), ("shared.w2", 7168, 3072),
    ("mtp.e_proj/h_proj", 7168, 7168),
]
M_VALUES = (1, 3, 16, 40, 64, 65, 200, 4096)


def poison_device_memory(nbytes: int = 1 << 30) -> None:
    """Fill (then free) a large device buffer with NaN bytes so that fresh outputs, which XLA's
    allocator carves from freed memory, start as NaN / 0xFF: an element the kernel forgets to
    write then fails the comparison. Best effort: it does not prove the buffer was reused."""
    buf = jnp.full((nbytes // 4,), jnp.nan, jnp.float32)
    buf.block_until_ready()
    del buf


def activations(rng: np.random.Generator, m: int, k: int) -> jax.Array:
    """BF16 rows with per-block outliers, an all-zero block, signed zeros and a zero row."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    x *= np.exp(rng.standard_normal((m, k // 16, 1)) * 1.5).repeat(16, axis=2).reshape(m, k)
    x[:, :16] = 0.0
    x[:, 16:32] = -0.0
    if m > 2:
        x[m // 2] = 0.0
    return jnp.asarray(x, jnp.bfloat16)


def fresh_jit(fn, **jit_kwargs):
    """``jax.jit`` of a new wrapper of ``fn``, so the call is traced afresh and reads trace-time settings
    (``NVFP4JAX_*`` variables) as they are now. ``jax.jit(fn)`` does not: JAX keeps one trace cache per
    underlying function, shared by every ``jax.jit(fn)`` wrapper, so a second wrapper with the same
    shapes reuses the first trace -- whatever the variables said then (found in session 7: the decode-path
    tests had been re-running one path)."""
    return jax.jit(lambda *args, **kwargs: fn(*args, **kwargs), **jit_kwargs)

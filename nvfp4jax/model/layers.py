"""Basic layers: the recipe-aware ``Linear``, RMSNorm, and shared conventions.

Letters used in einsum strings across ``nvfp4jax/model``:

| letter | axis |
| --- | --- |
| b | batch |
| s | sequence (query positions) |
| k | keys (window tokens + compressed entries) |
| h | attention heads |
| d | head or hidden channels |
| g | output groups (``o_groups``) |
| o | ``o_lora_rank`` |
| n, m | mHC streams |

jaxtyping dimension names: ``batch seq heads head_dim dim streams experts topk entries vocab``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nvfp4jax import ops
from nvfp4jax.formats.nvfp4 import NVFP4Tensor
from nvfp4jax.ref.gemm import rms_norm

__all__ = ["Linear", "head_rms_norm", "rms_norm"]


class Linear(eqx.Module):
    """``y = x @ W^T`` under the precision recipe (design §4).

    ``nvfp4``: NVFP4 weight x NVFP4 activation (quantized per row); ``nvfp4-w4a16``: NVFP4 weight x
    BF16 activation; ``bf16``: plain weight (in the compute dtype), float32 accumulation. The
    output has the input's dtype.
    """

    weight: NVFP4Tensor | Float[Array, "out in"]
    recipe: str = eqx.field(static=True)

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    def __call__(self, x: Float[Array, "*rows in"]) -> Float[Array, "*rows out"]:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.recipe == "bf16":
            y = jnp.dot(x2, self.weight.T.astype(x.dtype), preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
        elif self.recipe == "nvfp4":
            y = ops.nvfp4_linear(x2, self.weight, out_dtype=x.dtype)
        else:
            y = ops.nvfp4_gemm(x2.astype(jnp.bfloat16), self.weight, out_dtype=x.dtype)
        return y.astype(x.dtype).reshape(*lead, -1)


def head_rms_norm(x: Float[Array, "*rows dim"], eps: float) -> Float[Array, "*rows dim"]:
    """Weight-less RMSNorm over the last axis (the per-head norm of q after ``wq_b``)."""
    return rms_norm(x, None, eps)

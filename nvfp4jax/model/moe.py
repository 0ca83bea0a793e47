"""Mixture of experts with a shared expert (spec §4): router, routed experts, combine."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nvfp4jax import ops
from nvfp4jax.formats.nvfp4 import NVFP4Tensor
from nvfp4jax.model.layers import Linear
from nvfp4jax.ref.moe import route, swiglu


class SharedExpert(eqx.Module):
    w1: Linear
    w3: Linear
    w2: Linear
    swiglu_limit: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        # the GEMM outputs are in the activation dtype, as in the official model
        h = swiglu(self.w1(x), self.w3(x), self.swiglu_limit).astype(x.dtype)
        return self.w2(h)


class MoE(eqx.Module):
    """Routed experts (stacked: NVFP4 ``[experts, out, in]`` or plain arrays) plus one shared expert.

    Hash layers carry ``tid2eid`` (expert ids per token id) and no bias; score layers the reverse.
    """

    gate: Float[Array, "experts dim"]
    bias: Float[Array, " experts"] | None
    tid2eid: Int[Array, "vocab topk"] | None
    w1: NVFP4Tensor | Float[Array, "experts inter dim"]
    w3: NVFP4Tensor | Float[Array, "experts inter dim"]
    w2: NVFP4Tensor | Float[Array, "experts dim inter"]
    shared: SharedExpert
    num_experts_per_token: int = eqx.field(static=True)
    routed_scale: float = eqx.field(static=True)
    swiglu_limit: float = eqx.field(static=True)
    recipe: str = eqx.field(static=True)

    def routing(self, x: Float[Array, "tokens dim"], token_ids: Int[Array, " tokens"]):
        logits = jnp.dot(x.astype(jnp.float32), self.gate.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
        hashed = None if self.tid2eid is None else self.tid2eid[token_ids]
        return route(logits, self.num_experts_per_token, self.routed_scale, bias=self.bias, hash_experts=hashed)

    @jax.named_scope("moe")
    def __call__(self, u: Float[Array, "batch seq dim"], token_ids: Int[Array, "batch seq"]) -> Float[Array, "batch seq dim"]:
        b, s, d = u.shape
        x = u.reshape(b * s, d)
        weights, experts = self.routing(x, token_ids.reshape(-1))
        routed = ops.moe_experts(x, weights, experts, self.w1, self.w3, self.w2, swiglu_limit=self.swiglu_limit,
                                 quantize_activations=self.recipe == "nvfp4")
        out = routed + self.shared(x).astype(jnp.float32)
        return out.astype(u.dtype).reshape(b, s, d)

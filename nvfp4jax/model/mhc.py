"""mHC modules: the per-site hyper-connection (pre/post) and the final head collapse."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float

from nvfp4jax.ref import mhc as ref_mhc


class HyperConnection(eqx.Module):
    fn: Float[Array, "mix streams_dim"]
    base: Float[Array, " mix"]
    scale: Float[Array, 3]
    norm_eps: float = eqx.field(static=True)
    hc_eps: float = eqx.field(static=True)
    iters: int = eqx.field(static=True)

    def pre(self, x: Float[Array, "*rows streams dim"]):
        return ref_mhc.hc_pre(x, self.fn, self.scale, self.base, norm_eps=self.norm_eps, hc_eps=self.hc_eps,
                              iters=self.iters)

    @staticmethod
    def post(a, residual, post, comb):
        return ref_mhc.hc_post(a, residual, post, comb)


class HyperHead(eqx.Module):
    fn: Float[Array, "streams streams_dim"]
    base: Float[Array, " streams"]
    scale: Float[Array, 1]
    norm_eps: float = eqx.field(static=True)
    hc_eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "*rows streams dim"]) -> Float[Array, "*rows dim"]:
        return ref_mhc.hc_head(x, self.fn, self.scale, self.base, norm_eps=self.norm_eps, hc_eps=self.hc_eps)

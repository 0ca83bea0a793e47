"""One transformer block: mHC around attention and around the MoE (spec §2.1)."""

from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int

from nvfp4jax.model.attention import Attention
from nvfp4jax.model.layers import rms_norm
from nvfp4jax.model.mhc import HyperConnection
from nvfp4jax.model.moe import MoE


class Block(eqx.Module):
    hc_attn: HyperConnection
    attn_norm: Float[Array, " dim"]
    attn: Attention
    hc_ffn: HyperConnection
    ffn_norm: Float[Array, " dim"]
    ffn: MoE
    eps: float = eqx.field(static=True)

    @jax.named_scope("block")
    def __call__(
        self, x: Float[Array, "batch seq streams dim"], token_ids: Int[Array, "batch seq"], positions: Int[Array, "batch seq"]
    ) -> Float[Array, "batch seq streams dim"]:
        u, post, comb = self.hc_attn.pre(x)
        a = self.attn(rms_norm(u, self.attn_norm, self.eps), positions)
        x = self.hc_attn.post(a, x, post, comb)
        u, post, comb = self.hc_ffn.pre(x)
        f = self.ffn(rms_norm(u, self.ffn_norm, self.eps), token_ids)
        return self.hc_ffn.post(f, x, post, comb)

    def step(self, x, token_ids, positions, num_new, layer_state, page_tables, page_size: int):
        """Cached counterpart of ``__call__`` for a chunk of new tokens; returns ``(x, layer_state)``."""
        u, post, comb = self.hc_attn.pre(x)
        ratio = 0 if self.attn.compressor is None else self.attn.compressor.ratio
        a, layer_state = self.attn.step(rms_norm(u, self.attn_norm, self.eps), positions, num_new, layer_state,
                                        page_tables.get(ratio), page_size)
        x = self.hc_attn.post(a, x, post, comb)
        u, post, comb = self.hc_ffn.pre(x)
        f = self.ffn(rms_norm(u, self.ffn_norm, self.eps), token_ids)
        return self.hc_ffn.post(f, x, post, comb), layer_state

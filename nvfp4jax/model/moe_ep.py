"""Expert-parallel routed experts: token dispatch and combine by all-to-all inside ``shard_map``.

The stacked experts are split over the mesh axis that the sharding rules give the logical axis
``experts`` (:data:`nvfp4jax.sharding.RULES`); tokens are split over *every* mesh axis, so each
(data, tensor) coordinate is one expert-parallel group of ``P`` ranks holding all experts between
them. On each rank, for its ``t`` local tokens with ``k`` choices each (``A = t * k`` assignments):

1. **dispatch**: assignment ``a`` goes to rank ``expert // experts_per_rank``; its row of ``x``,
   routing weight and *local* expert id are written to a send buffer ``[P, A, ...]`` at
   ``[rank, rank-order of a]``. Capacity ``A`` per destination is the exact worst case (every
   assignment to one rank), so no token is ever dropped; unused rows are zeros with weight 0,
   local expert 0 (their output is exactly 0 and never read back).
2. ``all_to_all`` over the expert axis: each rank receives ``[P, A, ...]`` rows for its experts.
3. **compute**: the received rows run through the single-device ``moe_experts`` implementation
   (``ops`` table: the reference here, a kernel on GPU) with ``k = 1`` and the local expert stack.
   Every row is computed exactly as in the dense op — NVFP4 activation quantization is per row,
   and the routing weight is applied per row before ``w2`` — so each (token, expert) output is the
   same.
4. ``all_to_all`` back, gather each assignment's row, and sum the ``k`` rows of a token in float32
   in the same order as the dense op.

Cost: the dense ``all_to_all`` moves and computes ``P x`` the rows that ``ragged_all_to_all`` would
(the price of exact static capacity); it is the correctness baseline for a ragged version.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from nvfp4jax.formats.nvfp4 import NVFP4Tensor


def _num_experts(w: NVFP4Tensor | Array) -> int:
    return (w.values if isinstance(w, NVFP4Tensor) else w).shape[0]


def _dispatch(x, weights, expert_ids, num_ranks: int, per_rank: int):
    """Send buffers ``[P, A, ...]`` and each assignment's ``(rank, slot)``."""
    t, k = expert_ids.shape
    a = t * k
    flat = expert_ids.reshape(-1)
    rank = flat // per_rank
    one_hot = rank[:, None] == jnp.arange(num_ranks, dtype=rank.dtype)[None, :]
    slot = jnp.sum(jnp.where(one_hot, jnp.cumsum(one_hot, axis=0) - 1, 0), axis=1)
    token = jnp.arange(a, dtype=jnp.int32) // k
    send_x = jnp.zeros((num_ranks, a, x.shape[-1]), x.dtype).at[rank, slot].set(x[token])
    send_w = jnp.zeros((num_ranks, a), weights.dtype).at[rank, slot].set(weights.reshape(-1))
    send_e = jnp.zeros((num_ranks, a), jnp.int32).at[rank, slot].set((flat % per_rank).astype(jnp.int32))
    return send_x, send_w, send_e, rank, slot


def moe_experts_ep(
    dense: Callable,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    x: Float[Array, "tokens dim"],
    weights: Float[Array, "tokens topk"],
    expert_ids: Int[Array, "tokens topk"],
    w1: NVFP4Tensor | Float[Array, "experts inter dim"],
    w3: NVFP4Tensor | Float[Array, "experts inter dim"],
    w2: NVFP4Tensor | Float[Array, "experts dim inter"],
    *,
    swiglu_limit: float,
    quantize_activations: bool,
    expert_axis: str = "expert",
) -> Float[Array, "tokens dim"]:
    """``dense(x, weights, expert_ids, w1, w3, w2)`` (the ``moe_experts`` op) with experts split over
    ``mesh`` axis ``expert_axis`` and tokens over every mesh axis (see the module docstring).

    Equal to the dense op row by row; only XLA's choice of summation order inside each expert GEMM
    may differ (the tests find it bitwise equal on CPU).
    """
    num_experts = _num_experts(w1)
    num_ranks = mesh.shape[expert_axis]
    if num_experts % num_ranks:
        raise ValueError(f"{num_experts} experts do not split over {num_ranks} ranks of mesh axis {expert_axis!r}")
    per_rank = num_experts // num_ranks
    token_axes = tuple(mesh.axis_names)
    splits = 1
    for name in token_axes:
        splits *= mesh.shape[name]
    t = x.shape[0]
    pad = -t % splits
    if pad:  # padding tokens: expert 0, weight 0, sliced off below
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)))

    def local(x, weights, expert_ids, w1, w3, w2):
        send_x, send_w, send_e, rank, slot = _dispatch(x, weights, expert_ids, num_ranks, per_rank)
        swap = lambda v: jax.lax.all_to_all(v, expert_axis, 0, 0)
        recv_x, recv_w, recv_e = swap(send_x), swap(send_w), swap(send_e)
        rows = recv_x.shape[0] * recv_x.shape[1]
        y = dense(recv_x.reshape(rows, -1), recv_w.reshape(rows, 1), recv_e.reshape(rows, 1), w1, w3, w2,
                  swiglu_limit=swiglu_limit, quantize_activations=quantize_activations)
        back = swap(y.reshape(recv_x.shape[0], recv_x.shape[1], -1))  # [P, A, dim] by destination rank
        per_assignment = back[rank, slot]  # [A, dim] in (token, k) order
        return per_assignment.reshape(x.shape[0], expert_ids.shape[1], -1).sum(axis=1)

    tokens = PartitionSpec(token_axes)
    stacked = PartitionSpec(expert_axis)
    weight_spec = lambda w: jax.tree.map(lambda _: stacked, w)
    out = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, weight_spec(w1), weight_spec(w3),
                                                    weight_spec(w2)), out_specs=tokens, check_vma=False)(
        x, weights, expert_ids, w1, w3, w2)
    return out[:t]


def moe_experts_in_context(dense: Callable, x, weights, expert_ids, w1, w3, w2, *, swiglu_limit: float,
                           quantize_activations: bool):
    """The ``moe_experts`` op under the mesh in context (``jax.set_mesh``): expert parallel when that
    mesh has an expert axis (:data:`nvfp4jax.sharding.RULES`) of more than one device, else ``dense``."""
    from nvfp4jax.sharding import RULES

    mesh = jax.sharding.get_abstract_mesh()
    axis = RULES.experts
    kwargs = {"swiglu_limit": swiglu_limit, "quantize_activations": quantize_activations}
    if mesh.empty or not isinstance(axis, str) or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        return dense(x, weights, expert_ids, w1, w3, w2, **kwargs)
    return moe_experts_ep(dense, mesh, x, weights, expert_ids, w1, w3, w2, expert_axis=axis, **kwargs)

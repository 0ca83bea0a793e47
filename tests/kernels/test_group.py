"""MoE grouping kernel (``nvfp4jax.kernels.group``) vs the XLA grouping: bit for bit, every output.

An exact op (integer bookkeeping and a permutation of the routing weights), so every output must equal
``moe.group_rows_xla`` plus ``moe.tile_table``; routings from ``ref.moe.route`` on random logits and the
degenerate ones (every row on expert 0, experts without rows, ``k = 1``, rows not a multiple of 32).
"""

import jax
import jax.numpy as jnp
import pytest

from nvfp4jax.ref import moe as ref
from tests.conftest import assert_bitwise_equal
from tests.kernels._gpu import fresh_jit, poison_device_memory

pytestmark = pytest.mark.gpu
cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import group as kgr, moe as km  # noqa: E402


def _routing(rng, t, experts, k=6, case="random"):
    logits = jnp.asarray(rng.standard_normal((t, experts)), jnp.float32)
    weights, ids = ref.route(logits, k, 1.5, bias=jnp.zeros(experts, jnp.float32))
    if case == "expert0":
        ids = jnp.zeros_like(ids)
    elif case == "holes":  # experts 0, 3 and the last never chosen
        ids = jnp.where(jnp.isin(ids, jnp.asarray([0, 3, experts - 1])), 1, ids)
    return weights, ids.astype(jnp.int32)


@pytest.mark.parametrize("t,experts,k,case,tile_t", [
    (1, 256, 6, "random", 16), (3, 256, 6, "random", 16), (64, 256, 6, "random", 16), (64, 384, 6, "random", 16),
    (170, 256, 6, "random", 16), (37, 16, 6, "holes", 16), (37, 16, 6, "holes", 64), (50, 16, 6, "expert0", 128),
    (96, 16, 1, "random", 16), (5, 8, 1, "holes", 16),
])
def test_group_rows_bitwise(rng, t, experts, k, case, tile_t):
    weights, ids = _routing(rng, t, experts, k, case)
    tiles = km.num_tiles(t * k, experts, tile_t)
    poison_device_memory()
    got = jax.jit(kgr.group_rows, static_argnums=(2, 3, 4))(ids, weights, experts, tile_t, tiles)
    order, rows, sizes, route_w, inverse = jax.jit(km.group_rows_xla, static_argnums=2)(ids, weights, experts)
    table = km.tile_table(sizes, tile_t, tiles)
    for name, a, b in zip(("order", "rows", "sizes", "route_w", "tiles", "inverse"), got,
                          (order, rows, sizes, route_w, table, inverse)):
        assert_bitwise_equal(a, b, f"{name} {t=} {experts=} {k=} {case}")


@pytest.mark.parametrize("t,recipe", [(1, "nvfp4"), (64, "w4a16"), (64, "nvfp4")])
def test_moe_with_group_kernel(rng, monkeypatch, t, recipe):
    """The MoE layer with the grouping kernel (the default; set explicitly): the MoE tests' gates, and the
    same bits as with the XLA grouping (``NVFP4JAX_MOE_GROUP=xla``; the GEMMs see identical tables)."""
    from tests.kernels import test_moe as tm

    x, weights, expert_ids = tm._inputs(rng, "flash", t)
    monkeypatch.setenv(kgr.ENV, "kernel")
    fresh = fresh_jit(km.moe_experts, static_argnames=tm._STATIC)  # traced afresh: reads the variable
    tm._check(f"group kernel flash {recipe} {t=}", "flash", x, weights, expert_ids, tm.RECIPES[recipe], fresh)
    kw = {"swiglu_limit": tm.SWIGLU_LIMIT, "quantize_activations": tm.RECIPES[recipe]}
    with_kernel = fresh(x, weights, expert_ids, *tm._tiled_experts("flash"), **kw)
    monkeypatch.setenv(kgr.ENV, "xla")
    xla = fresh_jit(km.moe_experts, static_argnames=tm._STATIC)  # traced afresh, without the variable
    with_xla = xla(x, weights, expert_ids, *tm._tiled_experts("flash"), **kw)
    assert_bitwise_equal(with_kernel, with_xla, f"group kernel vs XLA grouping {recipe} {t=}")

"""Sharded execution on 8 fake CPU devices equals single-device execution.

The cases need 8 devices, which a process fixes when JAX starts; the normal suite runs with one. So
``test_cases_on_eight_fake_cpu_devices`` re-runs this module in a subprocess with
``--xla_force_host_platform_device_count=8`` (the rest of the suite keeps its usual devices), and
the cases themselves skip in a process with fewer devices. On a multi-GPU machine,
``NVFP4JAX_MESH_DEVICES=N python -m pytest -o addopts= tests/test_sharding.py`` runs the cases directly on
N real devices (meshes follow N: every split of 2 devices, or the 8-device meshes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nvfp4jax import ops
from nvfp4jax.config import preset
from nvfp4jax.formats.nvfp4 import quantize
from nvfp4jax.sharding import (
    make_mesh,
    partition_spec,
    shard_batch,
    shard_model,
    shard_state,
    tree_shardings,
)
from nvfp4jax.state import init_state
from tests._fake_devices import MESH_DEVICES, run_on_fake_devices
from tests.conftest import assert_bitwise_equal

on_eight = pytest.mark.skipif(len(jax.devices()) < MESH_DEVICES, reason="runs in the 8-fake-device subprocess")
#: (data, expert, tensor) meshes of the expert-parallel cases, and (data, tensor) of the model cases:
#: on 8 devices 1x8x1 / 2x2x2 and 2x2; on 2 (NVFP4JAX_MESH_DEVICES=2 on a 2-GPU machine) every split of 2
EP_MESHES = ([(1, MESH_DEVICES, 1), (2, MESH_DEVICES // 4, 2)] if MESH_DEVICES % 4 == 0
             else [(1, MESH_DEVICES, 1), (2, MESH_DEVICES // 2, 1), (1, MESH_DEVICES // 2, 2)])
MODEL_MESHES = [(2, 2)] if MESH_DEVICES % 4 == 0 else [(2, 1), (1, 2)]


def test_cases_on_eight_fake_cpu_devices(tmp_path):
    if len(jax.devices()) >= MESH_DEVICES:
        pytest.skip("this process already has the devices; the cases run directly")
    run_on_fake_devices(__file__, tmp_path, timeout=1200)


# ------------------------------------------------------------------------------- expert-parallel MoE
def _experts(rng, num_experts, inter, dim, nvfp4: bool):
    def one(*shape):
        w = jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
        if not nvfp4:
            return w.astype(jnp.bfloat16)
        parts = [quantize(w[e]) for e in range(num_experts)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)

    return one(num_experts, inter, dim), one(num_experts, inter, dim), one(num_experts, dim, inter)


def _routing(rng, tokens, k, num_experts, case):
    if case == "random":
        ids = np.stack([rng.permutation(num_experts)[:k] for _ in range(tokens)])
    elif case == "one_expert":  # every assignment to one expert: the busiest rank takes all rows
        ids = np.full((tokens, k), num_experts - 3)
    else:  # "one_rank": the k choices of every token on the last rank's experts
        ids = rng.integers(num_experts - num_experts // 4, num_experts, (tokens, k))
    weights = rng.random((tokens, k)).astype(np.float32)
    return jnp.asarray(weights), jnp.asarray(ids, jnp.int32)


@on_eight
@pytest.mark.parametrize("mesh_shape", EP_MESHES)
@pytest.mark.parametrize("nvfp4", [False, True])
@pytest.mark.parametrize("case,tokens", [("random", 13), ("random", 1), ("one_expert", 16), ("one_rank", 9)])
def test_expert_parallel_moe_equals_dense(mesh_shape, nvfp4, case, tokens, rng):
    """Bitwise: every (token, expert) row is computed as in the dense op, and the k rows of a token
    are summed in the same order."""
    num_experts, inter, dim, k = 16, 32, 64, 3
    data, expert, tensor = mesh_shape
    mesh = make_mesh(MESH_DEVICES, data=data, tensor=tensor)
    assert mesh.shape["expert"] == expert
    x = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.bfloat16)
    weights, ids = _routing(rng, tokens, k, num_experts, case)
    w1, w3, w2 = _experts(rng, num_experts, inter, dim, nvfp4)

    def run(*args):
        return ops.moe_experts(*args, swiglu_limit=7.0, quantize_activations=nvfp4)

    dense = jax.jit(run)(x, weights, ids, w1, w3, w2)
    split = ((r"^$", ("experts", None, None)),)  # a bare stack: its leaves' paths are empty
    placed = [jax.device_put(w, tree_shardings(w, mesh, split)) for w in (w1, w3, w2)]
    with jax.set_mesh(mesh):
        fn = jax.jit(run).lower(x, weights, ids, *placed).compile()
        sharded = fn(x, weights, ids, *placed)
    if expert > 1:
        assert "all-to-all" in fn.as_text(), "the expert-parallel path did not run"
    assert float(jnp.max(jnp.abs(dense))) > 0
    assert_bitwise_equal(sharded, dense, f"{mesh_shape=} {nvfp4=} {case=} {tokens=}")


# -------------------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def models():
    from nvfp4jax.model import random_model

    return {r: random_model(preset("tiny", recipe=r), 0, include_mtp=False) for r in ("bf16", "nvfp4")}


@on_eight
def test_rules_place_weights_by_path(models):
    mesh = make_mesh(MESH_DEVICES, data=MODEL_MESHES[-1][0], tensor=2)
    block = shard_model(models["nvfp4"], mesh).segments[0].blocks[1]
    spec = lambda a: a.sharding.spec
    assert spec(block.ffn.w1.values) == P(None, "expert", None, None)
    assert spec(block.ffn.w2.global_scale) == P(None, "expert")
    assert spec(block.attn.wq_b.weight.values) == P(None, "tensor", None)
    assert spec(block.attn.wo_a) == P(None, "tensor", None, None)
    assert spec(block.attn.wo_b.weight.scales) == P(None, None, "tensor")
    assert spec(block.ffn.shared.w2.weight.values) == P(None, None, "tensor")
    assert spec(block.attn.indexer.wq_b.weight.values) == P(None, None, None)
    assert spec(block.attn.wq_b.weight.global_scale) == P(None)
    if MESH_DEVICES % 4 == 0:  # 2 output groups do not split 4 ways: replicated, not refused
        assert partition_spec((2, 32, 256), ("groups", None, None), make_mesh(MESH_DEVICES, tensor=4)) == P(None, None, None)


@on_eight
@pytest.mark.parametrize("data,tensor", MODEL_MESHES)
@pytest.mark.parametrize("recipe", ["bf16", "nvfp4"])
def test_sharded_forward_equals_single_device(models, recipe, data, tensor, rng):
    model = models[recipe]
    ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 19)), jnp.int32)
    forward = jax.jit(lambda m, t: m(t))
    single = forward(model, ids)
    mesh = make_mesh(MESH_DEVICES, data=data, tensor=tensor)
    sharded_model = shard_model(model, mesh)
    with jax.set_mesh(mesh):
        sharded = forward(sharded_model, shard_batch(ids, mesh))
    assert sharded.sharding.num_devices == MESH_DEVICES
    # recipe nvfp4 has the wider margin: a flipped NVFP4 activation code moves a logit more than a bf16 ulp
    _assert_cosine(sharded, single, 0.999 if recipe == "bf16" else 0.995, f"forward {recipe=}")


def _assert_cosine(actual, expected, tol: float, what: str):
    """Equal up to float reassociation, compared by cosine per position (every row finite).

    Row-parallel ``wo_b`` and shared ``w2`` sum their K parts across devices, in another order than
    one device's dot; the f32 difference can flip the rounding of an activation to bf16 or NVFP4
    further on (as any change of GEMM summation order does, e.g. kernel vs reference), and the
    flip propagates. Observed on CPU (tiny, 8 devices, mesh 2x2x2): bf16 forward bitwise equal,
    bf16 decode max |diff| 1e-2 of |logit| 3.5, nvfp4 forward min cosine 0.9982. A wrong
    placement or dispatch gives cosines near 0.
    """
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(a)), what
    cos = np.sum(a * e, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1))
    worst = np.unravel_index(np.argmin(cos), cos.shape)
    assert np.min(cos) >= tol, f"{what}: min cosine {np.min(cos):.6f} at {worst}, max |diff| {np.max(np.abs(a - e)):.3e}"


@on_eight
@pytest.mark.parametrize("data,tensor", MODEL_MESHES)
def test_sharded_decode_equals_single_device(models, data, tensor, rng):
    """Six one-token steps (crossing a ratio-4 compression) with the state split over ``data``
    (recipe bf16: equal up to reassociation, see ``_assert_cosine``)."""
    model = models["bf16"]
    batch, steps = 2, 6
    ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (batch, steps)), jnp.int32)
    step = jax.jit(lambda m, s, t: m.step(s, t)[::2])
    mesh = make_mesh(MESH_DEVICES, data=data, tensor=tensor)
    sharded_model = shard_model(model, mesh)
    state = init_state(model, batch, 16, page_size=2)
    sharded_state = shard_state(init_state(model, batch, 16, page_size=2), mesh)
    assert sharded_state.layers[0][0].ring.nope.sharding.spec == P(None, "data", None, None)
    for i in range(steps):
        single, state = step(model, state, ids[:, i : i + 1])
        with jax.set_mesh(mesh):
            sharded, sharded_state = step(sharded_model, sharded_state, shard_batch(ids[:, i : i + 1], mesh))
        _assert_cosine(sharded, single, 0.999, f"decode step {i}")
    np.testing.assert_array_equal(np.asarray(sharded_state.lengths), np.asarray(state.lengths))

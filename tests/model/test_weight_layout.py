"""The kernels' NVFP4 tile layout at model level (CPU): same logits, loaders tile under the kernel
backend, and sharding splits tiled weights along their tile axes."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from nvfp4jax import ops, sharding
from nvfp4jax.config import preset
from nvfp4jax.formats.nvfp4 import NVFP4Tensor, tileable
from nvfp4jax.model import random_model
from tests.conftest import assert_bitwise_equal

# the tiny structure widened so that its linears and experts fit the 64 x 128 tiles (as in the kernel model test)
CFG = preset("tiny", hidden_size=256, q_lora_rank=128, o_lora_rank=64, moe_intermediate_size=128, recipe="nvfp4")


def _nvfp4(tree) -> dict[str, NVFP4Tensor]:
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NVFP4Tensor))[0]
    return {jax.tree_util.keystr(p): x for p, x in nodes if isinstance(x, NVFP4Tensor)}


@pytest.fixture(scope="module")
def models():
    import os

    old = os.environ.get("NVFP4JAX_BACKEND")
    os.environ["NVFP4JAX_BACKEND"] = "reference"
    try:
        rows = random_model(CFG, 0, include_mtp=False)
    finally:
        if old is None:
            del os.environ["NVFP4JAX_BACKEND"]
        else:
            os.environ["NVFP4JAX_BACKEND"] = old
    return rows, ops.prepare_weights(rows, "tiled")


def test_prepare_weights_tiles_what_fits(models):
    rows, tiled = models
    before, after = _nvfp4(rows), _nvfp4(tiled)
    assert before.keys() == after.keys()
    layouts = collections.Counter(t.layout for t in after.values())
    assert layouts["tiled"] >= 10, layouts  # every attention / shared / routed linear of both layers
    for path, t in before.items():
        assert t.layout == "rows"
        assert after[path].layout == ("tiled" if tileable(t) is None else "rows"), path
        assert after[path].shape == t.shape, path
    for path, t in _nvfp4(ops.prepare_weights(tiled, "rows")).items():  # and back, bit for bit
        assert t.layout == "rows"
        assert_bitwise_equal(t.values, before[path].values, path)
        assert_bitwise_equal(t.scales.view(jnp.uint8), before[path].scales.view(jnp.uint8), path)
    with pytest.raises(ValueError, match="unknown NVFP4 layout"):
        ops.prepare_weights(rows, "columns")


def test_reference_ops_read_tiled_weights_bit_for_bit(models):
    """Every tiled weight of the model, through the reference op that uses it (GEMM for linears, the
    routed-expert op for expert stacks), gives the row-major weight's result bit for bit. (A whole-model
    comparison compiles the model twice: a minute of CI for the same check.)"""
    from nvfp4jax.ref import gemm as ref_gemm, moe as ref_moe

    rows, tiled = models
    before, after = _nvfp4(rows), _nvfp4(tiled)
    rng = np.random.default_rng(0)
    first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731 -- layer 0 of a stacked segment
    checked = 0
    for path, t in after.items():
        if t.layout != "tiled" or path.endswith((".ffn.w3", ".ffn.w2")) or not path.startswith(".segments[0]"):
            continue
        if path.endswith(".ffn.w1"):  # the expert stacks of this layer, through the routed-expert op
            base = path[: -len("w1")]
            ws_t = [first(after[base + n]) for n in ("w1", "w3", "w2")]
            ws_r = [first(before[base + n]) for n in ("w1", "w3", "w2")]
            experts, _, dim = ws_r[0].shape
            x = jnp.asarray(rng.standard_normal((5, dim)), jnp.bfloat16)
            ids = jnp.asarray(rng.integers(0, experts, (5, 2)), jnp.int32)
            wts = jnp.asarray(rng.random((5, 2)), jnp.float32)
            kw = {"swiglu_limit": 10.0, "quantize_activations": True}
            assert_bitwise_equal(ref_moe.moe_experts(x, wts, ids, *ws_t, **kw),
                                 ref_moe.moe_experts(x, wts, ids, *ws_r, **kw), path)
        else:
            w_t, w_r = first(t), first(before[path])
            x = jnp.asarray(rng.standard_normal((3, w_r.shape[1])), jnp.bfloat16)
            assert_bitwise_equal(ref_gemm.nvfp4_gemm(x, w_t), ref_gemm.nvfp4_gemm(x, w_r), path)
        checked += 1
    assert checked >= 5, checked  # wq_a, wq_b, wkv, wo_b, indexer, shared w1/w3/w2, experts (some may not fit)


def test_loaders_tile_under_the_kernel_backend(models, monkeypatch):
    monkeypatch.setattr(ops, "weight_layout", lambda: "tiled")
    loaded = random_model(CFG, 0, include_mtp=False)
    _, tiled = models
    want = _nvfp4(tiled)
    for path, t in _nvfp4(loaded).items():
        assert t.layout == want[path].layout, path
        assert_bitwise_equal(t.values, want[path].values, path)


def test_sharding_splits_tiled_weights_along_tile_axes(models):
    """A tiled weight's values ``[n/64, k/128, 64, 64]`` take the logical weight's axes on the two tile
    axes (and none inside a tile); row-major values take them on ``[n, k/2]``."""
    rows, tiled = models
    # partition_spec reads only the mesh's axis sizes: one CPU device repeated stands in for 4
    mesh = Mesh(np.array(jax.devices()[:1] * 4).reshape(1, 2, 2), sharding.MESH_AXES)
    paths = sharding._tiled(tiled)
    assert sharding._tiled(rows) == frozenset()
    cases = {".attn.wo_b.weight": ("tensor", 1), ".attn.wq_b.weight": ("tensor", 0), ".ffn.w2": ("expert", 0)}
    split = collections.Counter()
    for path, t in _nvfp4(tiled).items():
        hit = [c for c in cases if path.endswith(c)]
        if not hit or t.layout != "tiled":
            continue
        axis, logical_dim = cases[hit[0]]
        for part, arr in (("values", t.values), ("scales", t.scales)):
            logical = sharding._logical_axes(f"{path}.{part}", arr.ndim, sharding.PARAM_AXES, paths)
            spec = tuple(sharding.partition_spec(arr.shape, logical, mesh))
            assert spec[-2:] == (None, None), (path, part, spec)
            # the split axis: experts (before the tiles) for w2, else the tile axis of n or k; a tile
            # count the mesh does not divide is replicated, as any indivisible dimension is
            dim = arr.ndim - 5 if path.endswith(".ffn.w2") else arr.ndim - 4 + logical_dim
            assert spec[dim] == (axis if arr.shape[dim] % 2 == 0 else None), (path, part, arr.shape, spec)
            split[hit[0]] += spec[dim] is not None
        rows_t = _nvfp4(rows)[path]
        logical = sharding._logical_axes(f"{path}.values", rows_t.values.ndim, sharding.PARAM_AXES)
        assert len(tuple(sharding.partition_spec(rows_t.values.shape, logical, mesh))) == rows_t.values.ndim
    assert split[".attn.wq_b.weight"] and split[".ffn.w2"], split

"""A checkpoint loaded straight onto a mesh (``load_sharded``) equals ``shard_model(load_model(...))``.

The cases need 8 devices, fixed when JAX starts, so ``test_cases_on_eight_fake_cpu_devices`` re-runs
this module in a subprocess with ``--xla_force_host_platform_device_count=8`` (as tests/test_sharding.py
does) and the cases skip in a process with fewer devices. On a multi-GPU machine,
``NVFP4JAX_MESH_DEVICES=N`` runs them directly on its N devices (for N = 2: meshes 1x2x1 and 1x1x2; the
indivisible-axis case needs 8 devices and skips). The checkpoint is a synthetic tiny one in the
official layout (MXFP4 experts and FP8 linears converted to NVFP4 while loading).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.checkpoint import load_model
from nvfp4jax.checkpoint.random_weights import random_official_weights
from nvfp4jax.checkpoint.reader import Checkpoint
from nvfp4jax.checkpoint.sharded import load_sharded
from nvfp4jax.checkpoint.synthetic import write_checkpoint
from nvfp4jax.config import preset
from nvfp4jax.sharding import make_mesh, shard_batch, shard_model
from tests._fake_devices import MESH_DEVICES, NUM_DEVICES, run_on_fake_devices

on_eight = pytest.mark.skipif(len(jax.devices()) < MESH_DEVICES, reason="runs in the 8-fake-device subprocess")
#: (data, tensor) meshes of the loading cases: 1 x 8 x 1 and 2 x 2 x 2 on 8 devices; 1 x N x 1 and 1 x N/2 x 2
LOAD_MESHES = [(1, 1), (2, 2)] if MESH_DEVICES % 4 == 0 else [(1, 1), (1, 2)]
LOGITS_MESH = LOAD_MESHES[-1]


def test_cases_on_eight_fake_cpu_devices(tmp_path):
    if len(jax.devices()) >= MESH_DEVICES:
        pytest.skip("this process already has the devices; the cases run directly")
    run_on_fake_devices(__file__, tmp_path, timeout=900)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    cfg = preset("tiny")
    path = tmp_path_factory.mktemp("official")
    write_checkpoint(path, cfg, random_official_weights(cfg, seed=5), layout="official", max_shard_bytes=256 * 1024)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint_dir):
    """The single-device model per recipe, loaded once."""
    return {r: load_model(checkpoint_dir, recipe=r, progress=False)[0] for r in ("nvfp4", "bf16")}


def _bytes(a) -> np.ndarray:
    return np.atleast_1d(np.asarray(a)).view(np.uint8)


@on_eight
@pytest.mark.parametrize("data,tensor", LOAD_MESHES,
                         ids=[f"{d}x{MESH_DEVICES // (d * t)}x{t}" for d, t in LOAD_MESHES])
def test_leaves_and_shardings_equal_shard_model(checkpoint_dir, loaded, data, tensor):
    mesh = make_mesh(MESH_DEVICES, data=data, tensor=tensor)
    expected = shard_model(loaded["nvfp4"], mesh)
    model, ckpt = load_sharded(checkpoint_dir, mesh, progress=False)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    want, want_treedef = jax.tree_util.tree_flatten_with_path(expected)
    assert treedef == want_treedef
    assert len(ckpt.conversions) == len(ckpt.names())  # every tensor was read
    split = 0
    for (path, a), (_, e) in zip(leaves, want):
        where = jax.tree_util.keystr(path)
        assert a.sharding == e.sharding, f"{where}: {a.sharding.spec} != {e.sharding.spec}"
        assert a.shape == e.shape and a.dtype == e.dtype, where
        np.testing.assert_array_equal(_bytes(a), _bytes(e), err_msg=where)
        split += not a.sharding.is_fully_replicated
    # the routed experts (and, with tensor = 2, the tensor-parallel weights) really are split
    assert model.segments[0].blocks[0].ffn.w1.values.sharding.spec[1] == "expert"
    assert split >= (20 if tensor > 1 else 9), split


@on_eight
def test_sharded_logits_equal_single_device(checkpoint_dir, loaded, rng):
    """bf16 recipe on mesh 2x2x2 (two devices: 1x1x2): equal up to the row-parallel sums' reassociation
    (see test_sharding)."""
    single_model = loaded["bf16"]
    mesh = make_mesh(MESH_DEVICES, data=LOGITS_MESH[0], tensor=LOGITS_MESH[1])
    model, _ = load_sharded(checkpoint_dir, mesh, recipe="bf16", progress=False)
    ids = jnp.asarray(rng.integers(0, single_model.cfg.vocab_size, (2, 9)), jnp.int32)
    forward = jax.jit(lambda m, t: m(t))
    single = np.asarray(forward(single_model, ids), np.float64)
    with jax.set_mesh(mesh):
        sharded = forward(model, shard_batch(ids, mesh))
    assert sharded.sharding.num_devices == MESH_DEVICES
    sharded = np.asarray(sharded, np.float64)
    assert np.all(np.isfinite(sharded))
    cos = np.sum(sharded * single, -1) / (np.linalg.norm(sharded, axis=-1) * np.linalg.norm(single, axis=-1))
    assert np.min(cos) >= 0.999, f"min cosine {np.min(cos):.6f}, max |diff| {np.max(np.abs(sharded - single)):.3e}"


def _count_reads(monkeypatch):
    calls = []
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: calls.append(name) or get(self, name))
    return calls


@on_eight
@pytest.mark.skipif(len(jax.devices()) < NUM_DEVICES, reason="needs 8 devices (meshes of 6 and 8)")
def test_indivisible_axis_is_named_before_reading(checkpoint_dir, monkeypatch):
    calls = _count_reads(monkeypatch)
    with pytest.raises(ValueError) as e:  # 8 experts over 6 devices of the expert axis
        load_sharded(checkpoint_dir, make_mesh(6), progress=False)
    msg = str(e.value)
    assert "tensor 'layers.0.ffn.experts.*.w1.weight' (and in layers.1, layers.2, layers.3, mtp.0)" in msg, msg
    assert "dim 0 of size 8 (logical axis 'experts') does not divide over mesh axis 'expert' of 6 devices" in msg, msg
    with pytest.raises(ValueError) as e:  # 4 heads and 2 output groups over 8 tensor-parallel devices
        load_sharded(checkpoint_dir, make_mesh(NUM_DEVICES, tensor=8), progress=False)
    msg = str(e.value)
    assert "tensor 'layers.0.attn.attn_sink'" in msg and "'heads') does not divide over mesh axis 'tensor' of 8" in msg, msg
    assert "tensor 'layers.0.attn.wo_a.weight'" in msg and "dim 0 of size 2 (logical axis 'groups')" in msg, msg
    assert "tensor 'layers.0.attn.wo_b.weight' (and in layers.1, layers.2, layers.3, mtp.0), its NVFP4 scales: dim 1 of size 4" in msg, msg
    assert "ffn.experts" not in msg and "embed" not in msg, msg  # what does divide is not listed
    assert calls == []


def _single_device_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays() if len(a.sharding.device_set) == 1)


@on_eight
def test_transient_single_device_memory_is_one_layer(checkpoint_dir, loaded, monkeypatch):
    """Measured at every tensor read: bytes of live arrays on one device (the final leaves span the mesh).

    The sharded loader holds at most about one layer there; ``load_model`` holds the whole model.
    """
    peaks = {}
    for name, load in (("sharded", lambda: load_sharded(checkpoint_dir, make_mesh(MESH_DEVICES), progress=False)),
                       ("load_model", lambda: load_model(checkpoint_dir, progress=False))):
        seen, get = [], Checkpoint.get

        def measured(self, tensor, seen=seen, get=get):
            seen.append(_single_device_bytes())
            return get(self, tensor)

        monkeypatch.setattr(Checkpoint, "get", measured)
        base = _single_device_bytes()
        model = load()[0]
        peaks[name] = max(seen) - base
        del model
    model = loaded["nvfp4"]
    layer = max(sum(x.nbytes for x in jax.tree.leaves(blocks)) // leading
                for seg in model.segments for blocks in seg.blocks
                for leading in [jax.tree.leaves(blocks)[0].shape[0]])
    layer = max(layer, sum(x.nbytes for x in jax.tree.leaves(model.mtp.block)))
    largest_global = max(x.nbytes for x in (model.embed, model.head))
    total = sum(x.nbytes for x in jax.tree.leaves(model))
    assert peaks["sharded"] <= layer + largest_global, (peaks, layer, largest_global, total)
    assert peaks["load_model"] > 0.5 * total, (peaks, total)  # the measure sees a whole model when there is one

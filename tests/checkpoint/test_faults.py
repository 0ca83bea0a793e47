"""Every checkpoint fault gives an error naming the file and the tensor; nothing is half-loaded."""

import json
import re
import shutil

import numpy as np
import pytest

from nvfp4jax.checkpoint.reader import INDEX, open_checkpoint
from nvfp4jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors


@pytest.fixture
def official(tmp_path, official_dir):
    return shutil.copytree(official_dir, tmp_path / "ckpt")


@pytest.fixture
def nvidia(tmp_path, nvidia_dir):
    return shutil.copytree(nvidia_dir, tmp_path / "ckpt")


def index_of(path) -> dict:
    return json.loads((path / INDEX).read_text())


def shard_of(path, name) -> str:
    return index_of(path)["weight_map"][name]


def edit_shard(path, name, *, value=None, delete=False, add=None, keep_index=True):
    """Rewrite the shard holding ``name``: replace, delete, or add a tensor beside it."""
    index = index_of(path)
    shard = index["weight_map"][name]
    f = SafetensorsFile(path / shard)
    tensors = {n: f.read(n) for n in f.names()}
    if delete:
        del tensors[name]
        if not keep_index:
            del index["weight_map"][name]
    if value is not None:
        tensors[name] = value
    for extra_name, extra in (add or {}).items():
        tensors[extra_name] = extra
        index["weight_map"][extra_name] = shard
    write_safetensors(path / shard, tensors, f.metadata)
    (path / INDEX).write_text(json.dumps(index))
    return shard


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def raises_naming(path, file, tensor, what, **kwargs):
    pattern = re.escape(str(path / file)) + r".*tensor '" + re.escape(tensor) + r"'.*" + what
    with pytest.raises(CheckpointError, match=pattern):
        open_checkpoint(path, **kwargs)


def test_missing_tensor_dropped_from_index_and_shard(official):
    name = "layers.1.attn.wkv.scale"
    edit_shard(official, name, delete=True, keep_index=False)
    raises_naming(official, INDEX, name, r"missing \(expected F8_E8M0 \[1, 1\]")


def test_tensor_listed_in_index_but_absent_from_shard(official):
    name = "layers.2.ffn.experts.4.w3.weight"
    shard = edit_shard(official, name, delete=True)
    raises_naming(official, shard, name, "listed in .* but absent from this shard")


def test_extra_unknown_tensor_warns_and_loads(official):
    shard = edit_shard(official, "layers.0.attn.wq_a.weight", add={"layers.0.attn.bogus.weight": np.ones(4, np.float32)})
    with pytest.warns(UserWarning, match=re.escape(str(official / shard)) + r".*'layers\.0\.attn\.bogus\.weight'.*unknown"):
        ck = open_checkpoint(official)
    assert "layers.0.attn.bogus.weight" not in ck.names()
    assert ck.get("layers.0.attn_norm.weight").shape == (64,)


def test_wrong_shape(official):
    name = "layers.1.attn.wkv.weight"
    bad = np.zeros((128, 80), SafetensorsFile(official / shard_of(official, name)).read(name).dtype)
    shard = edit_shard(official, name, value=bad)
    raises_naming(official, shard, name, r"shape \[128, 80\], expected \[128, 64\]")


def test_wrong_dtype(official):
    name = "layers.2.attn_norm.weight"
    shard = edit_shard(official, name, value=np.ones(64, np.float32))
    raises_naming(official, shard, name, "dtype F32, expected BF16")


@pytest.mark.parametrize("bad", [0.0, np.nan, np.inf, -1.0])
def test_bad_nvidia_global_scale(nvidia, bad):
    name = "layers.2.ffn.experts.3.w2.weight_scale_2"
    shard = edit_shard(nvidia, name, value=np.array(bad, np.float32))
    raises_naming(nvidia, shard, name, "global scale must be finite and > 0")


def test_truncated_shard(official):
    shards = sorted(set(index_of(official)["weight_map"].values()))
    path = official / shards[1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*truncated shard: tensor '[^']+' ends at byte"):
        open_checkpoint(official)


def test_index_points_to_missing_shard(official):
    shards = sorted(set(index_of(official)["weight_map"].values()))
    (official / shards[2]).unlink()
    first = sorted(n for n, s in index_of(official)["weight_map"].items() if s == shards[2])[0]
    raises_naming(official, INDEX, first, f"mapped to shard '{re.escape(shards[2])}', which does not exist")


@pytest.mark.parametrize("changes, tensor, what", [
    ({"num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0]}, "layers.3.", r"num_hidden_layers=3 but the checkpoint holds layers 0\.\.3"),
    ({"hidden_size": 96}, "embed.weight", r"shape \[512, 64\], config says \[vocab_size=512, hidden_size=96\]"),
    ({"compress_ratios": [0, 128, 4, 4, 0]}, "layers.1.attn.compressor.ape", r"compress_ratios\[1\]=128 but the tensors say 4"),
    ({"n_routed_experts": 6}, "layers.0.ffn.experts.7", r"n_routed_experts=6 but layers.0 has experts 0\.\.7"),
    ({"n_routed_experts": 12}, "layers.0.ffn.experts.7", r"n_routed_experts=12 but layers.0 has experts 0\.\.7"),
    ({"num_hash_layers": 1}, "layers.1.ffn.gate.tid2eid", "num_hash_layers=1 but layer 1 has tid2eid"),
])
def test_config_does_not_match_tensors(official, changes, tensor, what):
    edit_config(official, **changes)
    pattern = re.escape(str(official / "config.json")) + r": tensor '" + re.escape(tensor) + r"[^']*': config.json does not match the tensors: " + what
    with pytest.raises(CheckpointError, match=pattern):
        open_checkpoint(official)


def test_all_faults_listed_at_once(official):
    edit_shard(official, "layers.2.attn_norm.weight", value=np.ones(64, np.float32))
    edit_shard(official, "layers.3.attn.wkv.scale", delete=True, keep_index=False)
    with pytest.raises(CheckpointError, match=r"^2 problems") as e:
        open_checkpoint(official)
    assert "'layers.2.attn_norm.weight': dtype F32" in str(e.value) and "'layers.3.attn.wkv.scale': missing" in str(e.value)


def test_nan_e8m0_scale_fails_on_decode(official):
    name = "layers.1.attn.wq_b.scale"
    scale = SafetensorsFile(official / shard_of(official, name)).read(name)
    bad = scale.view(np.uint8).copy()
    bad[0, 0] = 255
    edit_shard(official, name, value=bad.view(scale.dtype))
    ck = open_checkpoint(official)
    with pytest.raises(CheckpointError, match=re.escape(str(official / shard_of(official, name)))
                       + r": tensor 'layers\.1\.attn\.wq_b\.scale': E8M0 byte 255 \(NaN\) at \(0, 0\)"):
        ck.get("layers.1.attn.wq_b.weight")


def test_tid2eid_out_of_range(official):
    name = "layers.0.ffn.gate.tid2eid"
    t = SafetensorsFile(official / shard_of(official, name)).read(name).copy()
    t[5, 2] = 8
    shard = edit_shard(official, name, value=t)
    ck = open_checkpoint(official)
    with pytest.raises(CheckpointError, match=re.escape(str(official / shard)) + r".*'layers\.0\.ffn\.gate\.tid2eid': expert ids must lie in \[0, 8\)"):
        ck.get(name)


def test_missing_mtp(official):
    index = index_of(official)
    for shard in sorted(set(index["weight_map"].values())):
        f = SafetensorsFile(official / shard)
        write_safetensors(official / shard, {n: f.read(n) for n in f.names() if not n.startswith("mtp.")}, f.metadata)
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if not n.startswith("mtp.")}
    (official / INDEX).write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="no mtp.* tensors"):
        ck = open_checkpoint(official)
    assert not ck.has_mtp and ck.layers()[-1] == "layers.3"
    raises_naming(official, INDEX, "mtp.0.e_proj.weight", "missing", include_mtp=True)

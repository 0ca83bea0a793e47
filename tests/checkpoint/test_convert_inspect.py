"""``convert`` gives a checkpoint that loads to identical tensors with no conversion work;
``inspect`` reports layers, formats and planted anomalies (each naming file and tensor)."""

import json
import shutil

import numpy as np
import pytest

from nvfp4jax import cli, formats
from nvfp4jax.checkpoint.convert import convert_checkpoint
from nvfp4jax.checkpoint.inspect import inspect_checkpoint
from nvfp4jax.checkpoint.reader import INDEX, open_checkpoint
from nvfp4jax.checkpoint.safetensors_io import SafetensorsFile
from tests.checkpoint.test_faults import edit_shard, index_of, shard_of
from tests.conftest import assert_bitwise_equal


def assert_same(a, b, what):
    if isinstance(b, formats.NVFP4Tensor):
        assert isinstance(a, formats.NVFP4Tensor), what
        for field in ("values", "scales", "global_scale"):
            assert_bitwise_equal(getattr(a, field), getattr(b, field), f"{what} {field}")
    else:
        assert_bitwise_equal(a, b, what)


@pytest.mark.parametrize("layout, recipe", [("official", "nvfp4"), ("nvidia", "nvfp4"), ("official", "bf16")])
def test_convert_then_load_is_identical(tmp_path, official_dir, nvidia_dir, layout, recipe):
    src_dir = shutil.copytree(official_dir if layout == "official" else nvidia_dir, tmp_path / "src")
    (src_dir / "tokenizer.json").write_text('{"fake": true}')
    conversions = convert_checkpoint(src_dir, tmp_path / "dst", recipe=recipe, max_shard_bytes=300 * 1024, progress=False)
    src, dst = open_checkpoint(src_dir, recipe=recipe), open_checkpoint(tmp_path / "dst")
    assert dst.layout == "nvfp4jax" and dst.recipe == recipe and dst.config == src.config
    assert dst.names() == src.names() and len(conversions) == len(src.names())
    for name in src.names():
        assert_same(dst.get(name), src.get(name), name)
    # no conversion work: every tensor is stored as the model holds it
    assert {c.source for c in dst.conversions.values()} <= {"nvfp4", "bf16", "plain"}
    assert all(c.exact for c in dst.conversions.values())
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"fake": true}'
    assert len(set(index_of(tmp_path / "dst")["weight_map"].values())) >= 2


def test_cli_convert_and_inspect_clean(tmp_path, official_dir, capsys):
    dst = tmp_path / "dst"
    assert cli.main(["convert", str(official_dir), str(dst), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "120  mxfp4 -> nvfp4, exact" in out.replace("    ", " ") or "mxfp4 -> nvfp4, exact" in out
    assert "layers.1.ffn.experts.2.w1.weight: mxfp4 -> nvfp4, INEXACT" in out  # the planted wide expert
    assert cli.main(["convert", str(official_dir), str(dst), "--quiet"]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert cli.main(["inspect", str(dst), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "layout      nvfp4jax" in out and "anomalies   0 (0 errors)" in out
    assert cli.main(["inspect", str(official_dir), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "official"
    assert [(s["key"], s["kind"]) for s in report["layers"]] == [
        ("global", "global"), ("layers.0", "swa"), ("layers.1", "csa"), ("layers.2", "hca"), ("layers.3", "csa"),
        ("mtp.0", "swa")]
    layer1 = report["layers"][2]
    assert layer1["formats"] == {"fp8": 9, "mxfp4": 24, "plain": 22}
    # the planted wide experts are the only anomalies of the clean synthetic checkpoint (warnings)
    assert {(a["tensor"], a["severity"]) for a in report["anomalies"]} == {
        ("layers.1.ffn.experts.2.w1.scale", "warning"), ("mtp.0.ffn.experts.5.w3.scale", "warning")}


def test_inspect_reports_planted_anomalies(tmp_path, nvidia_dir):
    path = shutil.copytree(nvidia_dir, tmp_path / "ckpt")
    planted = {
        "layers.2.ffn.experts.3.w2.weight_scale_2": (np.array(0.0, np.float32), "global scale is 0.0"),
        "layers.3.ffn.experts.0.w1.input_scale": (np.array(1.6e-43, np.float32), "input_scale is 1.597"),
        "layers.1.hc_attn_base": (None, "1 non-finite values"),
        "layers.2.attn.wo_b.scale": (None, "1 E8M0 scale bytes are 255 (NaN), first at (0, 0)"),
    }
    base = SafetensorsFile(path / shard_of(path, "layers.1.hc_attn_base")).read("layers.1.hc_attn_base").copy()
    base[3] = np.nan
    scale = SafetensorsFile(path / shard_of(path, "layers.2.attn.wo_b.scale")).read("layers.2.attn.wo_b.scale")
    nan_scale = scale.view(np.uint8).copy()
    nan_scale[0, 0] = 255
    values = {"layers.1.hc_attn_base": base, "layers.2.attn.wo_b.scale": nan_scale.view(scale.dtype)}
    for name, (value, _) in planted.items():
        edit_shard(path, name, value=value if value is not None else values[name])
    report = inspect_checkpoint(path, progress=False)
    found = {p.tensor: p for p in report.anomalies}
    for name, (_, message) in planted.items():
        assert name in found, f"{name} not reported; got {sorted(found)}"
        assert message in found[name].message and found[name].file == str(path / shard_of(path, name))
    assert found["layers.3.ffn.experts.0.w1.input_scale"].severity == "warning"
    assert found["mtp.0.ffn.experts.5.w3.scale"].severity == "warning"  # planted wide MXFP4 (MTP stays MXFP4)
    assert {p.tensor for p in report.errors} == {n for n in planted if "input_scale" not in n}


def test_inspect_reports_structural_faults_without_raising(tmp_path, official_dir, capsys):
    path = shutil.copytree(official_dir, tmp_path / "ckpt")
    index = index_of(path)
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if not n.startswith("mtp.")}
    (path / INDEX).write_text(json.dumps(index))
    shards = sorted(set(index["weight_map"].values()))
    (path / shards[0]).unlink()
    report = inspect_checkpoint(path, progress=False)
    messages = [str(p) for p in report.anomalies]
    assert any("missing MTP" in m for m in messages)
    assert any(f"mapped to shard '{shards[0]}', which does not exist" in m for m in messages)
    assert any("'embed.weight': missing" in m for m in messages)
    assert cli.main(["inspect", str(path), "--quiet", "--headers-only"]) == 1
    assert "missing MTP" in capsys.readouterr().out


def test_cli_synthesize_writes_the_random_weights(tmp_path, capsys):
    from nvfp4jax.checkpoint.random_weights import random_official_weights
    from nvfp4jax.config import preset

    assert cli.main(["synthesize", str(tmp_path / "s"), "--layout", "nvidia", "--seed", "3", "--shard-size", "200KiB"]) == 0
    assert "nvidia layout" in capsys.readouterr().out
    ck = open_checkpoint(tmp_path / "s")
    assert ck.layout == "nvidia" and len(set(index_of(tmp_path / "s")["weight_map"].values())) >= 5
    name = "layers.2.ffn.experts.6.w3.weight"
    expected = formats.quantize(random_official_weights(preset("tiny"), 3)[name])
    assert_same(ck.get(name), expected, name)


def test_reading_is_lazy(official_dir, monkeypatch):
    """Opening reads headers only; get() reads exactly the stored tensors of one weight."""
    reads = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, name: reads.append(name) or original(self, name))
    ck = open_checkpoint(official_dir)
    assert reads == []
    ck.get("layers.2.ffn.experts.3.w2.weight")
    assert reads == ["layers.2.ffn.experts.3.w2.weight", "layers.2.ffn.experts.3.w2.scale"]

"""Loaded tensors equal the source weights: bitwise where the conversion is exact, else within
quantisation error; both published layouts, all recipes."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nvfp4jax import formats
from nvfp4jax.checkpoint.random_weights import source_specs
from nvfp4jax.checkpoint.reader import INDEX, open_checkpoint
from nvfp4jax.checkpoint.synthetic import encode_source
from tests.checkpoint.conftest import PLANTED_WIDE, SHARD_BYTES
from tests.conftest import assert_bitwise_equal


def assert_nvfp4_equal(actual, expected, what):
    assert isinstance(actual, formats.NVFP4Tensor), f"{what}: got {type(actual).__name__}"
    assert_bitwise_equal(actual.values, expected.values, f"{what} values")
    assert_bitwise_equal(actual.scales, expected.scales, f"{what} scales")
    assert_bitwise_equal(actual.global_scale, jnp.asarray(expected.global_scale, jnp.float32).reshape(()), f"{what} global")


def assert_fp8_close(w, src, scale, what):
    """FP8 e4m3 with power-of-two block scale s: |err| <= 2^-4 |x| (normal) or 2^-10 s (subnormal)."""
    s = np.repeat(np.repeat(np.asarray(formats.e8m0_to_float(scale)), 128, 0), 128, 1)[: src.shape[0], : src.shape[1]]
    err = np.abs(np.asarray(w, np.float32) - src)
    bound = 2.0**-4 * np.abs(src) + 2.0**-10 * s
    assert np.all(err <= bound), f"{what}: FP8 error {err.max():.3e} exceeds its rounding bound"


def check_tensor(ck, name, value, src):
    t, stored = ck.tensor(name), ck.read_stored(name)
    for sname, array in encode_source(t, src).items():  # the file holds exactly what was written
        assert_bitwise_equal(stored[sname], array, f"{name} stored {sname}")
    conversion = ck.conversions[name]
    if t.format == "plain":
        if t.stored[0].dtype == "I64":
            assert_bitwise_equal(value, src.astype(np.int32), name)
        else:
            assert_bitwise_equal(value, src.astype(ml_dtypes.bfloat16 if t.stored[0].dtype == "BF16" else np.float32), name)
        return
    bf16 = t.linear == "wo_a" or ck.recipe == "bf16"
    if t.format == "fp8":
        exact_float = formats.decode_fp8_block(stored[t.name], stored[f"{t.base}.scale"])
        assert_fp8_close(exact_float, src, stored[f"{t.base}.scale"], name)
    elif t.format == "mxfp4":
        exact_float = formats.decode_mxfp4(stored[t.name], stored[f"{t.base}.scale"])
    else:  # ModelOpt NVFP4 was quantised from the source by the writer
        q = formats.quantize(src)
        exact_float = formats.dequantize(q)
        if not bf16:
            assert_nvfp4_equal(value, q, name)
            assert conversion.exact
            return
    if bf16:
        assert_bitwise_equal(value, exact_float.astype(jnp.bfloat16), name)
        assert conversion.exact == bool(jnp.array_equal(exact_float.astype(jnp.bfloat16).astype(jnp.float32), exact_float))
        return
    if t.format == "mxfp4" and name not in PLANTED_WIDE:
        assert conversion.exact, conversion.describe()
        assert_bitwise_equal(formats.dequantize(value), exact_float, f"{name} dequantised")
        assert_bitwise_equal(value.values, stored[t.name].view(np.uint8), f"{name} codes kept")
        return
    # FP8 linears and the planted wide experts: re-quantised from the exact float values
    assert not conversion.exact, conversion.describe()
    assert_nvfp4_equal(value, formats.quantize(exact_float), name)
    rel = float(jnp.linalg.norm(formats.dequantize(value) - src) / jnp.linalg.norm(src))
    assert rel < 0.12 if name not in PLANTED_WIDE else rel < 0.2, f"{name}: relative error {rel:.3f}"


@pytest.mark.parametrize("layout", ["official", "nvidia"])
@pytest.mark.parametrize("recipe", ["nvfp4", "bf16"])
def test_round_trip(layout, recipe, tiny_source, official_dir, nvidia_dir):
    cfg, weights = tiny_source
    path = official_dir if layout == "official" else nvidia_dir
    ck = open_checkpoint(path, recipe=recipe)
    assert ck.layout == layout and ck.recipe == recipe and ck.config.replace(recipe="nvfp4") == cfg
    assert ck.names() == [s.name for s in source_specs(cfg)]
    seen = []
    for key, values in ck.iter_layers(progress=False):
        assert set(values) == set(ck.layer_names(key))
        for name, value in values.items():
            check_tensor(ck, name, value, weights[name])
            seen.append(name)
    assert seen == ck.names()
    mx_inexact = {c.name for c in ck.inexact() if c.source == "mxfp4"}
    if recipe == "nvfp4":
        assert mx_inexact == (set(PLANTED_WIDE) if layout == "official" else {PLANTED_WIDE[1]})


def test_checkpoint_is_sharded_with_an_index(official_dir):
    index = json.loads((official_dir / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    for shard in shards:
        assert (official_dir / shard).stat().st_size <= 2 * SHARD_BYTES
    config = json.loads((official_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"


def test_nvidia_config_ignores_mtp(nvidia_dir):
    qc = json.loads((nvidia_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and "mtp.*" in qc["ignore"]


def test_layer_access_and_w4a16(official_dir, tiny_source):
    cfg, weights = tiny_source
    ck = open_checkpoint(official_dir, recipe="nvfp4-w4a16")
    assert ck.layers() == ["global", "layers.0", "layers.1", "layers.2", "layers.3", "mtp.0"]
    assert ck.layer_names(2) == ck.layer_names("layers.2")
    assert "layers.2.attn.compressor.ape" in ck.layer_names(2)
    name = "layers.3.ffn.experts.1.w2.weight"
    stored = ck.read_stored(name)
    value = ck.get(name)
    assert_bitwise_equal(formats.dequantize(value), formats.decode_mxfp4(stored[name], stored[name[:-7] + ".scale"]), name)
    with pytest.raises(KeyError, match="no layer"):
        ck.layer_names(9)

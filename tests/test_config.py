import dataclasses
import json
from collections import Counter

import pytest

from nvfp4jax.config import FLASH_HF, HF_KEYS, PRO_HF, DeepSeekV4Config, preset, yarn_ramp_bounds

# Values from the spec (deepseek-v4.md §1.1), written out independently of the presets.
SPEC = {
    "flash": dict(hidden_size=4096, num_layers=43, num_heads=64, q_lora_rank=1024, o_groups=8, index_topk=512,
                  num_experts=256, moe_intermediate_size=2048, routed_scaling_factor=1.5),
    "pro": dict(hidden_size=7168, num_layers=61, num_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
                num_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5),
}
COMMON = dict(vocab_size=129280, num_kv_heads=1, head_dim=512, rope_head_dim=64, o_lora_rank=1024, sliding_window=128,
              compress_rope_theta=160000, rope_theta=10000, index_num_heads=64, index_head_dim=128,
              num_experts_per_token=6, num_shared_experts=1, num_hash_layers=3, swiglu_limit=10.0, hc_mult=4,
              hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, num_mtp_layers=1, bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_presets_equal_spec_values(name):
    cfg = preset(name)
    for field, value in {**COMMON, **SPEC[name]}.items():
        assert getattr(cfg, field) == value, f"{name}.{field}"
    assert cfg.rope_scaling_dict == {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                     "beta_fast": 32, "beta_slow": 1}


def test_layer_schedule_matches_spec():
    flash, pro = preset("flash"), preset("pro")
    assert Counter(flash.layer_types) == {"swa": 2, "csa": 21, "hca": 20}
    assert flash.layer_types[:4] == ("swa", "swa", "csa", "hca") and flash.layer_types[-1] == "csa"
    assert Counter(pro.layer_types) == {"csa": 30, "hca": 31}
    assert pro.layer_types[:3] == ("hca", "hca", "csa")
    assert flash.mtp_layer_type == pro.mtp_layer_type == "swa"
    assert len(flash.compress_ratios) == 44 and len(pro.compress_ratios) == 62
    assert [flash.is_hash_layer(i) for i in range(5)] == [True, True, True, False, False]
    assert not flash.is_hash_layer(flash.num_layers), "the MTP block is score-routed"
    assert flash.rope_params(0) == (10000.0, False) and flash.rope_params(43) == (10000.0, False)
    assert flash.rope_params(2) == (160000.0, True) and pro.rope_params(0) == (160000.0, True)


def test_yarn_bounds_from_spec():
    assert yarn_ramp_bounds(160000.0, 64, 65536, 32.0, 1.0) == (15, 25)


def test_tiny_keeps_the_real_structure():
    tiny = preset("tiny")
    assert tiny.sliding_window == 128 and set(tiny.compress_ratios) == {0, 4, 128}
    assert {"swa", "csa", "hca"} <= set(tiny.layer_types) and tiny.hc_mult == 4 and tiny.num_mtp_layers == 1
    assert any(tiny.is_hash_layer(i) for i in range(tiny.num_layers))
    assert not all(tiny.is_hash_layer(i) for i in range(tiny.num_layers))
    hash_types = {t for i, t in enumerate(tiny.layer_types) if tiny.is_hash_layer(i)}
    assert "csa" in hash_types, "tiny should hash-route a CSA layer too"


@pytest.mark.parametrize("name", ["flash", "pro", "tiny"])
def test_round_trip_through_json(tmp_path, name):
    cfg = preset(name)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    back = DeepSeekV4Config.from_json(tmp_path)
    assert back == cfg and back.extra == cfg.extra
    assert back.extra["quantization_config"]["weight_block_size"] == [128, 128], "unknown keys are kept"


def test_missing_and_bad_keys_are_clear_errors():
    d = dict(FLASH_HF)
    del d["hidden_size"], d["index_topk"]
    with pytest.raises(ValueError, match="hidden_size, index_topk"):
        DeepSeekV4Config.from_hf_dict(d)
    with pytest.raises(ValueError, match="compress_ratios has 43 entries"):
        DeepSeekV4Config.from_hf_dict({**FLASH_HF, "compress_ratios": FLASH_HF["compress_ratios"][:-1]})
    with pytest.raises(ValueError, match="0, 4 and 128"):
        DeepSeekV4Config.from_hf_dict({**PRO_HF, "compress_ratios": [2] * 62})
    with pytest.raises(ValueError, match="unknown recipe"):
        preset("tiny", recipe="int8")


def test_fields_are_unique_and_hf_keys_cover_them():
    names = [f.name for f in dataclasses.fields(DeepSeekV4Config)]
    assert len(names) == len(set(names))
    ours = {"recipe", "quant_simulation", "compute_dtype", "extra"}
    assert set(HF_KEYS) == set(names) - ours
    assert len(set(HF_KEYS.values())) == len(HF_KEYS)
    hash(preset("flash"))  # usable as a static (hashable) field

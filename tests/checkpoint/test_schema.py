"""The official schema reproduces the published tensor counts (spec §6.1), without allocating.

Expected counts are derived by hand from the spec's per-block table (not from the schema code):
per block 6 hc F32 + attn_sink F32 + (bias F32 unless hashed) + (ape F32 if compressed) + (indexer
ape F32 if CSA); BF16 5 norms/gate + 3 compressor (compressed) + 4 indexer (CSA); F8_E4M3 8 linears
+ 1 indexer (CSA); E8M0 one per FP8 linear + 3 per expert; I8 3 per expert; I64 tid2eid (hashed).
Globals: 3 BF16 + 3 F32; MTP adds e/h_proj (F8), 3 norms (BF16), 3 hc_head (F32).
"""

from collections import Counter

import pytest

from nvfp4jax.checkpoint.layouts import stored_schema
from nvfp4jax.checkpoint.schema import official_schema
from nvfp4jax.config import preset


def expected_counts(cfg) -> Counter:
    blocks = list(range(cfg.num_layers)) + [cfg.num_layers] * cfg.num_mtp_layers
    c = Counter(BF16=3 + 3 * cfg.num_mtp_layers, F32=3 + 3 * cfg.num_mtp_layers, F8_E4M3=2 * cfg.num_mtp_layers)
    for layer in blocks:
        r, hashed, E = cfg.compress_ratio(layer), cfg.is_hash_layer(layer), cfg.num_experts
        c["F32"] += 6 + 1 + (not hashed) + (r > 0) + (r == 4)
        c["BF16"] += 5 + 3 * (r > 0) + 4 * (r == 4)
        c["F8_E4M3"] += 8 + (r == 4)
        c["I8"] += 3 * E
        c["I64"] += hashed
    c["F8_E8M0"] = c["F8_E4M3"] + c["I8"]
    return c


def test_flash_counts_match_the_published_checkpoint():
    counts = Counter(s.dtype for s in official_schema(preset("flash")))
    published = {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34167, "I64": 3, "I8": 33792}
    assert dict(counts) == published
    assert sum(counts.values()) == 69187
    assert counts == expected_counts(preset("flash"))


def test_pro_counts():
    counts = Counter(s.dtype for s in official_schema(preset("pro")))
    # 61 layers (30 CSA, 31 HCA), 384 experts, MTP: derived from the spec table by hand
    assert dict(counts) == {"BF16": 619, "F32": 590, "F8_E4M3": 528, "F8_E8M0": 71952, "I64": 3, "I8": 71424}
    assert counts == expected_counts(preset("pro"))


@pytest.mark.parametrize("name, total", [("flash", 1575), ("pro", 2343)])
def test_mtp_namespace(name, total):
    mtp = [s for s in official_schema(preset(name)) if s.name.startswith("mtp.")]
    assert len(mtp) == total
    assert sum(s.name.endswith(".scale") for s in mtp) == {"flash": 778, "pro": 1162}[name]


def test_flash_shapes_from_real_headers():
    specs = {s.name: s for s in official_schema(preset("flash"))}
    assert specs["layers.2.attn.wq_b.weight"].shape == (32768, 1024)
    assert specs["layers.2.attn.wq_b.scale"].shape == (256, 8)
    assert specs["layers.5.ffn.experts.17.w2.weight"].shape == (4096, 1024)
    assert specs["layers.5.ffn.experts.17.w2.scale"].shape == (4096, 64)
    assert specs["layers.3.attn.compressor.ape"].shape == (128, 512)
    assert specs["layers.0.ffn.gate.tid2eid"].shape == (129280, 6)


def test_official_layout_is_the_schema():
    cfg = preset("tiny")
    ours = [(s.name, s.dtype, s.shape) for s in stored_schema(cfg, "official")]
    assert ours == [(s.name, s.dtype, s.shape) for s in official_schema(cfg)]


def test_nvidia_layout_replaces_backbone_experts_only():
    cfg = preset("flash")
    official = Counter(s.dtype for s in official_schema(cfg))
    nvidia = Counter(s.dtype for s in stored_schema(cfg, "nvidia"))
    backbone = 3 * cfg.num_experts * cfg.num_layers
    assert nvidia["U8"] == backbone
    assert nvidia["I8"] == official["I8"] - backbone == 3 * cfg.num_experts  # MTP experts stay MXFP4
    assert nvidia["F8_E4M3"] == official["F8_E4M3"] + backbone
    assert nvidia["F32"] == official["F32"] + 2 * backbone
    assert nvidia["F8_E8M0"] == official["F8_E8M0"] - backbone
    specs = {s.name: s for s in stored_schema(cfg, "nvidia")}
    assert specs["layers.4.ffn.experts.3.w1.weight_scale"].shape == (2048, 4096 // 16)
    assert specs["layers.4.ffn.experts.3.w1.weight_scale_2"].shape == ()
    assert specs["mtp.0.ffn.experts.3.w1.scale"].dtype == "F8_E8M0"

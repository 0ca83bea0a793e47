"""The official DeepSeek-V4 checkpoint schema (spec §6.1): every tensor name, dtype and shape.

This is the interface between checkpoints, the model's weight mapping and the HF parity harness.
Names are the official "native" keys (no ``model.`` prefix). Shapes are storage shapes: FP8
linears ``[out, in]`` with E8M0 ``.scale`` ``[ceil(out/128), ceil(in/128)]``; FP4 experts packed
``[out, in/2]`` (int8) with E8M0 ``.scale`` ``[out, in/32]``. Nothing is allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from nvfp4jax.config import DeepSeekV4Config

#: safetensors dtype names used by the official checkpoints
BF16, F32, F8_E4M3, F8_E8M0, I8, I64, U8 = "BF16", "F32", "F8_E4M3", "F8_E8M0", "I8", "I64", "U8"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: logical float shape of a quantized weight (``[out, in]``); equals ``shape`` otherwise
    logical_shape: tuple[int, ...]
    #: "fp8" (block-128 linear), "fp4" (MXFP4 expert), or "plain"
    format: str = "plain"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plain(name: str, dtype: str, *shape: int) -> Iterator[TensorSpec]:
    yield TensorSpec(name, dtype, tuple(shape), tuple(shape))


def _fp8(name: str, out: int, inp: int) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{name}.weight", F8_E4M3, (out, inp), (out, inp), "fp8")
    yield TensorSpec(f"{name}.scale", F8_E8M0, (_cdiv(out, 128), _cdiv(inp, 128)), (_cdiv(out, 128), _cdiv(inp, 128)))


def _fp4(name: str, out: int, inp: int) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{name}.weight", I8, (out, inp // 2), (out, inp), "fp4")
    yield TensorSpec(f"{name}.scale", F8_E8M0, (out, inp // 32), (out, inp // 32))


def _compressor(prefix: str, cfg: DeepSeekV4Config, ratio: int, dim: int) -> Iterator[TensorSpec]:
    c = 2 if ratio == 4 else 1
    yield from _plain(f"{prefix}.ape", F32, ratio, c * dim)
    yield from _plain(f"{prefix}.wkv.weight", BF16, c * dim, cfg.hidden_size)
    yield from _plain(f"{prefix}.wgate.weight", BF16, c * dim, cfg.hidden_size)
    yield from _plain(f"{prefix}.norm.weight", BF16, dim)


def block_schema(cfg: DeepSeekV4Config, layer: int, prefix: str) -> Iterator[TensorSpec]:
    """Tensors of block ``layer`` (``layer == num_layers`` is the MTP block) under ``prefix``."""
    d, hc = cfg.hidden_size, cfg.hc_mult
    mix = (2 + hc) * hc
    for site in ("attn", "ffn"):
        yield from _plain(f"{prefix}.hc_{site}_fn", F32, mix, hc * d)
        yield from _plain(f"{prefix}.hc_{site}_base", F32, mix)
        yield from _plain(f"{prefix}.hc_{site}_scale", F32, 3)
    yield from _plain(f"{prefix}.attn_norm.weight", BF16, d)
    yield from _plain(f"{prefix}.ffn_norm.weight", BF16, d)
    a = f"{prefix}.attn"
    H, D, G, O, q = cfg.num_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank, cfg.q_lora_rank
    yield from _plain(f"{a}.attn_sink", F32, H)
    yield from _fp8(f"{a}.wq_a", q, d)
    yield from _plain(f"{a}.q_norm.weight", BF16, q)
    yield from _fp8(f"{a}.wq_b", H * D, q)
    yield from _fp8(f"{a}.wkv", D, d)
    yield from _plain(f"{a}.kv_norm.weight", BF16, D)
    yield from _fp8(f"{a}.wo_a", G * O, (H // G) * D)
    yield from _fp8(f"{a}.wo_b", d, G * O)
    ratio = cfg.compress_ratio(layer)
    if ratio:
        yield from _compressor(f"{a}.compressor", cfg, ratio, D)
    if ratio == 4:
        nI, dI = cfg.index_num_heads, cfg.index_head_dim
        yield from _fp8(f"{a}.indexer.wq_b", nI * dI, q)
        yield from _plain(f"{a}.indexer.weights_proj.weight", BF16, nI, d)
        yield from _compressor(f"{a}.indexer.compressor", cfg, 4, dI)
    f, E, I = f"{prefix}.ffn", cfg.num_experts, cfg.moe_intermediate_size
    yield from _plain(f"{f}.gate.weight", BF16, E, d)
    if cfg.is_hash_layer(layer):
        yield from _plain(f"{f}.gate.tid2eid", I64, cfg.vocab_size, cfg.num_experts_per_token)
    else:
        yield from _plain(f"{f}.gate.bias", F32, E)
    for w, (o, i) in (("w1", (I, d)), ("w2", (d, I)), ("w3", (I, d))):
        yield from _fp8(f"{f}.shared_experts.{w}", o, i)
    for e in range(E):
        for w, (o, i) in (("w1", (I, d)), ("w2", (d, I)), ("w3", (I, d))):
            yield from _fp4(f"{f}.experts.{e}.{w}", o, i)


def global_schema(cfg: DeepSeekV4Config) -> Iterator[TensorSpec]:
    d, V, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    yield from _plain("embed.weight", BF16, V, d)
    yield from _plain("head.weight", BF16, V, d)
    yield from _plain("norm.weight", BF16, d)
    yield from _plain("hc_head_fn", F32, hc, hc * d)
    yield from _plain("hc_head_base", F32, hc)
    yield from _plain("hc_head_scale", F32, 1)


def mtp_schema(cfg: DeepSeekV4Config, index: int = 0) -> Iterator[TensorSpec]:
    d, hc, p = cfg.hidden_size, cfg.hc_mult, f"mtp.{index}"
    yield from _fp8(f"{p}.e_proj", d, d)
    yield from _fp8(f"{p}.h_proj", d, d)
    for n in ("enorm", "hnorm", "norm"):
        yield from _plain(f"{p}.{n}.weight", BF16, d)
    yield from _plain(f"{p}.hc_head_fn", F32, hc, hc * d)
    yield from _plain(f"{p}.hc_head_base", F32, hc)
    yield from _plain(f"{p}.hc_head_scale", F32, 1)
    yield from block_schema(cfg, cfg.num_layers + index, p)


def official_schema(cfg: DeepSeekV4Config, *, include_mtp: bool = True) -> Iterator[TensorSpec]:
    """Every tensor of the official checkpoint, in a stable order (global, layers, MTP)."""
    yield from global_schema(cfg)
    for layer in range(cfg.num_layers):
        yield from block_schema(cfg, layer, f"layers.{layer}")
    if include_mtp:
        for i in range(cfg.num_mtp_layers):
            yield from mtp_schema(cfg, i)

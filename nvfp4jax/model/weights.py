"""Building the model from tensors named as in the official checkpoint (spec §6.1).

``model_from_tensors(cfg, get)`` asks ``get(name)`` for every tensor, layer by layer, and checks
each against the schema (shape, and NVFP4 structure for the big linears) before placing it.
``get`` returns, per tensor (design §4):

* big linears (experts, shared experts, wq_a, wq_b, wkv, wo_b, indexer wq_b, MTP e/h_proj):
  an ``NVFP4Tensor`` (recipes ``nvfp4``, ``nvfp4-w4a16``) or a float array (``bf16``);
* everything else: a float or integer array at its logical shape (``wo_a`` dequantized).

Float arrays are cast to the model's dtype for that leaf (the compute dtype, or float32 for the
F32 tensors). :func:`random_model` feeds the same path from deterministic random source weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4jax.checkpoint.random_weights import random_tensor
from nvfp4jax.checkpoint.schema import (
    F32,
    I64,
    TensorSpec,
    block_schema,
    global_schema,
    mtp_schema,
)
from nvfp4jax import ops
from nvfp4jax.config import DeepSeekV4Config
from nvfp4jax.formats import nvfp4 as nvfp4_format
from nvfp4jax.formats.nvfp4 import NVFP4Tensor
from nvfp4jax.model.attention import Attention, Compressor, Indexer
from nvfp4jax.model.block import Block
from nvfp4jax.model.layers import Linear
from nvfp4jax.model.mhc import HyperConnection, HyperHead
from nvfp4jax.model.moe import MoE, SharedExpert
from nvfp4jax.model.transformer import MTP, Segment, Transformer, segment_schedule

Getter = Callable[[str], "jax.Array | np.ndarray | NVFP4Tensor"]


def is_big_linear(spec: TensorSpec) -> bool:
    """Weights that run as NVFP4 GEMMs in the NVFP4 recipes (every quantized linear but ``wo_a``)."""
    return spec.format != "plain" and not spec.name.endswith("wo_a.weight")


def compute_dtype(cfg: DeepSeekV4Config):
    return jnp.dtype(cfg.compute_dtype)


class _Checked:
    """Wraps a getter: validates every tensor against the schema and converts it to the leaf dtype."""

    def __init__(self, cfg: DeepSeekV4Config, get: Getter, specs: dict[str, TensorSpec], layout: str | None = None):
        self.cfg, self.get, self.specs = cfg, get, specs
        self.layout = ops.weight_layout() if layout is None else layout

    def __call__(self, name: str):
        spec = self.specs[name]
        value = self.get(name)
        if is_big_linear(spec) and self.cfg.recipe != "bf16":
            if not isinstance(value, NVFP4Tensor):
                raise TypeError(f"{name}: recipe {self.cfg.recipe} needs an NVFP4Tensor, got {type(value).__name__}")
            if value.shape != spec.logical_shape or value.global_scale.shape != ():
                raise ValueError(f"{name}: NVFP4 shape {value.shape} / global {value.global_scale.shape}, "
                                 f"expected {spec.logical_shape} with a per-tensor global scale")
            if value.values.dtype != jnp.uint8 or value.scales.dtype != jnp.float8_e4m3fn:
                raise TypeError(f"{name}: NVFP4 values/scales must be uint8/float8_e4m3fn")
            return nvfp4_format.to_layout(NVFP4Tensor(jnp.asarray(value.values), jnp.asarray(value.scales),
                                                      jnp.asarray(value.global_scale, jnp.float32)), self.layout)
        if isinstance(value, NVFP4Tensor):
            raise TypeError(f"{name}: recipe {self.cfg.recipe} expects a plain array, got an NVFP4Tensor")
        arr = jnp.asarray(value)
        if tuple(arr.shape) != spec.logical_shape:
            raise ValueError(f"{name}: shape {tuple(arr.shape)}, expected {spec.logical_shape}")
        if spec.dtype == I64:
            if not jnp.issubdtype(arr.dtype, jnp.integer):
                raise TypeError(f"{name}: expected integer expert ids, got {arr.dtype}")
            if int(arr.min()) < 0 or int(arr.max()) >= self.cfg.num_experts:
                raise ValueError(f"{name}: expert ids outside [0, {self.cfg.num_experts})")
            return arr.astype(jnp.int32)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating tensor, got {arr.dtype}")
        return arr.astype(jnp.float32 if spec.dtype == F32 else compute_dtype(self.cfg))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _hc(cfg, get, p, site):
    return HyperConnection(get(f"{p}.hc_{site}_fn"), get(f"{p}.hc_{site}_base"), get(f"{p}.hc_{site}_scale"),
                           cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)


def _compressor(get, p, ratio):
    return Compressor(get(f"{p}.wkv.weight"), get(f"{p}.wgate.weight"), get(f"{p}.ape"), get(f"{p}.norm.weight"), ratio)


def build_block(cfg: DeepSeekV4Config, layer: int, prefix: str, get) -> Block:
    lin = lambda n: Linear(get(f"{prefix}.{n}.weight"), cfg.recipe)
    a = f"{prefix}.attn"
    ratio = cfg.compress_ratio(layer)
    compressor = _compressor(get, f"{a}.compressor", ratio) if ratio else None
    indexer = None
    if ratio == 4:
        indexer = Indexer(Linear(get(f"{a}.indexer.wq_b.weight"), cfg.recipe), get(f"{a}.indexer.weights_proj.weight"),
                          _compressor(get, f"{a}.indexer.compressor", 4), cfg.index_num_heads, cfg.index_head_dim,
                          cfg.quant_simulation)
    wo_a = get(f"{a}.wo_a.weight").reshape(cfg.o_groups, cfg.o_lora_rank, -1)
    attn = Attention(lin("attn.wq_a"), get(f"{a}.q_norm.weight"), lin("attn.wq_b"), lin("attn.wkv"),
                     get(f"{a}.kv_norm.weight"), wo_a, lin("attn.wo_b"), get(f"{a}.attn_sink"), compressor, indexer,
                     cfg, cfg.layer_type(layer))
    f = f"{prefix}.ffn"
    experts = {w: _stack([get(f"{f}.experts.{e}.{w}.weight") for e in range(cfg.num_experts)]) for w in ("w1", "w2", "w3")}
    hashed = cfg.is_hash_layer(layer)
    shared = SharedExpert(lin("ffn.shared_experts.w1"), lin("ffn.shared_experts.w3"), lin("ffn.shared_experts.w2"),
                          cfg.swiglu_limit)
    moe = MoE(get(f"{f}.gate.weight"), None if hashed else get(f"{f}.gate.bias"),
              get(f"{f}.gate.tid2eid") if hashed else None, experts["w1"], experts["w3"], experts["w2"], shared,
              cfg.num_experts_per_token, cfg.routed_scaling_factor, cfg.swiglu_limit, cfg.recipe)
    return Block(_hc(cfg, get, prefix, "attn"), get(f"{prefix}.attn_norm.weight"), attn, _hc(cfg, get, prefix, "ffn"),
                 get(f"{prefix}.ffn_norm.weight"), moe, cfg.rms_norm_eps)


def model_from_tensors(cfg: DeepSeekV4Config, get: Getter, *, include_mtp: bool = True, progress=None) -> Transformer:
    """Build the model, asking ``get`` for each official tensor name, one layer at a time.

    ``progress`` (optional) is called with each finished layer index (e.g. a tqdm ``update``).
    """
    specs = {s.name: s for s in global_schema(cfg)}
    for layer in range(cfg.num_layers):
        specs.update({s.name: s for s in block_schema(cfg, layer, f"layers.{layer}")})
    with_mtp = include_mtp and cfg.num_mtp_layers > 0
    if with_mtp:
        specs.update({s.name: s for s in mtp_schema(cfg, 0)})
    g = _Checked(cfg, get, specs)
    segments = []
    for first, period, repeats in segment_schedule(cfg):
        per_position = [[] for _ in range(period)]
        for r in range(repeats):
            for k in range(period):
                layer = first + r * period + k
                per_position[k].append(build_block(cfg, layer, f"layers.{layer}", g))
                if progress is not None:
                    progress(layer)
        segments.append(Segment(tuple(_stack(blocks) for blocks in per_position), first))
    mtp = build_mtp(cfg, g) if with_mtp else None
    return Transformer(g("embed.weight"), tuple(segments), build_head_mix(cfg, g), g("norm.weight"), g("head.weight"), mtp, cfg)


def build_head_mix(cfg: DeepSeekV4Config, g: Getter, prefix: str = "") -> HyperHead:
    """The mHC head (``{prefix}hc_head_*``) that mixes the residual streams before a norm and head."""
    return HyperHead(g(f"{prefix}hc_head_fn"), g(f"{prefix}hc_head_base"), g(f"{prefix}hc_head_scale"),
                     cfg.rms_norm_eps, cfg.hc_eps)


def build_mtp(cfg: DeepSeekV4Config, g: Getter) -> MTP:
    """The MTP block ``mtp.0``: its projections, norms, mHC head and one more decoder block."""
    p = "mtp.0"
    return MTP(Linear(g(f"{p}.e_proj.weight"), cfg.recipe), Linear(g(f"{p}.h_proj.weight"), cfg.recipe),
               g(f"{p}.enorm.weight"), g(f"{p}.hnorm.weight"), g(f"{p}.norm.weight"), build_head_mix(cfg, g, f"{p}."),
               build_block(cfg, cfg.num_layers, p, g), cfg.rms_norm_eps)


@jax.jit
def _quantize_weight(w):
    """``formats.nvfp4.quantize`` (per-tensor global) as one compiled program per weight shape."""
    w = w.astype(jnp.float32)
    return nvfp4_format.quantize_with_global(w, nvfp4_format.global_scale_from_amax(jnp.max(jnp.abs(w))))


def prepare_source(cfg: DeepSeekV4Config, spec: TensorSpec, value: np.ndarray):
    """A float *source* weight as the recipe holds it: NVFP4 (per-tensor global) for big linears."""
    if is_big_linear(spec) and cfg.recipe != "bf16":
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{spec.name}: non-finite source weight")
        return _quantize_weight(value)
    return value


def source_getter(cfg: DeepSeekV4Config, source: Callable[[str], np.ndarray]) -> Getter:
    """Turn a getter of float source weights (official names) into one for :func:`model_from_tensors`."""
    specs = {}

    def get(name: str):
        if not specs:
            from nvfp4jax.checkpoint.schema import official_schema

            specs.update({s.name: s for s in official_schema(cfg)})
        return prepare_source(cfg, specs[name], source(name))

    return get


def random_model(cfg: DeepSeekV4Config, seed: int = 0, *, include_mtp: bool = True) -> Transformer:
    """The model with deterministic random weights (``random_weights.random_tensor``) for any config."""
    from nvfp4jax.checkpoint.schema import official_schema

    specs = {s.name: s for s in official_schema(cfg, include_mtp=include_mtp)}
    return model_from_tensors(cfg, source_getter(cfg, lambda n: random_tensor(cfg, specs[n], seed)),
                              include_mtp=include_mtp)

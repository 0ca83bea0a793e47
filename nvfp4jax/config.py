"""DeepSeek-V4 configuration: the HF ``config.json`` keys the model uses, presets, layer schedule.

Field names are spelled out (``num_layers`` rather than ``num_hidden_layers``); :data:`HF_KEYS`
maps each to its HF key. Unknown HF keys are kept in ``extra`` and written back by
:meth:`DeepSeekV4Config.to_hf_dict`. Options that are ours rather than the checkpoint's (the
precision recipe, the QAT-simulation switch) are not HF keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

LayerType = Literal["swa", "csa", "hca"]
Recipe = Literal["nvfp4", "nvfp4-w4a16", "bf16"]
RECIPES: tuple[str, ...] = ("nvfp4", "nvfp4-w4a16", "bf16")
_RATIO_TO_TYPE: dict[int, LayerType] = {0: "swa", 4: "csa", 128: "hca"}

#: our field -> HF config.json key (required unless the field has a default below)
HF_KEYS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rope_head_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_lora_rank": "o_lora_rank",
    "o_groups": "o_groups",
    "sliding_window": "sliding_window",
    "compress_ratios": "compress_ratios",
    "compress_rope_theta": "compress_rope_theta",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "index_num_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "num_experts": "n_routed_experts",
    "num_experts_per_token": "num_experts_per_tok",
    "num_shared_experts": "n_shared_experts",
    "moe_intermediate_size": "moe_intermediate_size",
    "num_hash_layers": "num_hash_layers",
    "scoring_func": "scoring_func",
    "topk_method": "topk_method",
    "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit",
    "hidden_act": "hidden_act",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "rms_norm_eps": "rms_norm_eps",
    "num_mtp_layers": "num_nextn_predict_layers",
    "max_position_embeddings": "max_position_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "tie_word_embeddings": "tie_word_embeddings",
    "expert_dtype": "expert_dtype",
}
_OPTIONAL = {
    "topk_method": "noaux_tc", "norm_topk_prob": True, "hidden_act": "silu", "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "num_mtp_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "expert_dtype": "fp4", "max_position_embeddings": 1048576,
}


@dataclasses.dataclass(frozen=True)
class DeepSeekV4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    sliding_window: int
    compress_ratios: tuple[int, ...]  # num_layers + num_mtp_layers entries (MTP last)
    compress_rope_theta: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]  # HF dict as sorted items (hashable)
    index_num_heads: int
    index_head_dim: int
    index_topk: int
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    moe_intermediate_size: int
    num_hash_layers: int
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    expert_dtype: str = "fp4"
    # ---- ours, not HF keys
    recipe: str = "nvfp4"  # one of RECIPES (validated in __post_init__ with a clear error)
    #: the model's own QAT simulations (FP8 KV nope dims, FP4+Hadamard indexer); off only to compare
    #: with implementations that compute in plain floating point (HF transformers)
    quant_simulation: bool = True
    #: activation dtype between ops ("bfloat16" as the official model; "float32" for parity tests)
    compute_dtype: str = "bfloat16"
    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be 'bfloat16' or 'float32', got {self.compute_dtype!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        expected = self.num_layers + self.num_mtp_layers
        if len(self.compress_ratios) != expected:
            raise ValueError(
                f"compress_ratios has {len(self.compress_ratios)} entries, expected num_hidden_layers + "
                f"num_nextn_predict_layers = {expected}"
            )
        bad = sorted({r for r in self.compress_ratios if r not in _RATIO_TO_TYPE})
        if bad:
            raise ValueError(f"compress_ratios may only hold 0, 4 and 128, got {bad}")
        if self.compress_ratios[self.num_layers:] and any(self.compress_ratios[self.num_layers:]):
            raise ValueError("the MTP layer must be sliding-window only (compress ratio 0)")
        if self.num_heads % self.o_groups:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of o_groups {self.o_groups}")
        if not 0 < self.rope_head_dim <= self.head_dim or self.rope_head_dim % 2:
            raise ValueError(f"rope_head_dim {self.rope_head_dim} must be even and at most head_dim {self.head_dim}")
        if self.num_kv_heads != 1:
            raise ValueError(f"DeepSeek-V4 has one shared K=V head, got num_key_value_heads={self.num_kv_heads}")
        if self.scoring_func != "sqrtsoftplus":
            raise ValueError(f"only scoring_func 'sqrtsoftplus' is implemented, got {self.scoring_func!r}")
        if self.num_experts_per_token > self.num_experts:
            raise ValueError("num_experts_per_tok exceeds n_routed_experts")

    # ------------------------------------------------------------------ derived schedule
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def layer_types(self) -> tuple[LayerType, ...]:
        """Attention type of each backbone layer 0..L-1."""
        return tuple(_RATIO_TO_TYPE[r] for r in self.compress_ratios[: self.num_layers])

    @property
    def mtp_layer_type(self) -> LayerType:
        return _RATIO_TO_TYPE[self.compress_ratios[self.num_layers]] if self.num_mtp_layers else "swa"

    def layer_type(self, layer: int) -> LayerType:
        """Type of layer ``layer``; ``layer == num_layers`` is the MTP block."""
        return _RATIO_TO_TYPE[self.compress_ratios[layer]]

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        """Hash-routed MoE (layers ``< num_hash_layers``; never the MTP block)."""
        return layer < min(self.num_hash_layers, self.num_layers)

    def rope_params(self, layer: int) -> tuple[float, bool]:
        """(theta, use_yarn) of a layer: compressed layers use compress_rope_theta with YaRN."""
        if self.compress_ratios[layer] > 0:
            return float(self.compress_rope_theta), self.rope_scaling_dict.get("type", self.rope_scaling_dict.get("rope_type")) == "yarn"
        return float(self.rope_theta), False

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> DeepSeekV4Config:
        kwargs: dict[str, Any] = {}
        missing = []
        for field, key in HF_KEYS.items():
            if key in d:
                kwargs[field] = d[key]
            elif field in _OPTIONAL:
                kwargs[field] = _OPTIONAL[field]
            else:
                missing.append(key)
        if missing:
            raise ValueError(f"config.json is missing required DeepSeek-V4 keys: {', '.join(missing)}")
        if isinstance(kwargs["eos_token_id"], list):
            kwargs["eos_token_id"] = int(kwargs["eos_token_id"][0])
        kwargs["compress_ratios"] = tuple(int(r) for r in kwargs["compress_ratios"])
        for f in dataclasses.fields(cls):  # JSON writes 160000 for 160000.0
            if f.type == "float" and f.name in kwargs:
                kwargs[f.name] = float(kwargs[f.name])
        kwargs["rope_scaling"] = tuple(sorted((kwargs["rope_scaling"] or {}).items()))
        known = set(HF_KEYS.values())
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> DeepSeekV4Config:
        """Read an HF ``config.json`` (or a checkpoint directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for field, key in HF_KEYS.items():
            value = getattr(self, field)
            if field == "compress_ratios":
                value = list(value)
            elif field == "rope_scaling":
                value = dict(value)
            d[key] = value
        return d

    def replace(self, **changes) -> DeepSeekV4Config:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
_COMMON = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "o_lora_rank": 1024,
    "sliding_window": 128, "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128,
    "num_experts_per_tok": 6, "n_shared_experts": 1, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "swiglu_limit": 10.0, "hidden_act": "silu",
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True,
}

#: V4-Flash ``config.json`` (current revision)
FLASH_HF: dict[str, Any] = {
    **_COMMON, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "q_lora_rank": 1024,
    "o_groups": 8, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "index_topk": 512,
    "n_routed_experts": 256, "moe_intermediate_size": 2048, "routed_scaling_factor": 1.5,
}
#: V4-Pro ``config.json``
PRO_HF: dict[str, Any] = {
    **_COMMON, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
    "o_groups": 16, "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0], "index_topk": 1024,
    "n_routed_experts": 384, "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5,
}
#: CPU-sized, real structure: window 128, ratios 4 and 128, SWA/CSA/HCA layers, hash and score
#: routing, 4 mHC streams, an MTP block; head/rope/indexer dims keep their real relations.
TINY_HF: dict[str, Any] = {
    **_COMMON, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 64, "o_lora_rank": 32, "o_groups": 2,
    "compress_ratios": [0, 4, 128, 4, 0], "index_n_heads": 16, "index_head_dim": 128, "index_topk": 8,
    "n_routed_experts": 8, "moe_intermediate_size": 32, "routed_scaling_factor": 1.5, "num_hash_layers": 2,
}
PRESETS = {"flash": FLASH_HF, "pro": PRO_HF, "tiny": TINY_HF}


def preset(name: str, **overrides) -> DeepSeekV4Config:
    """``flash``, ``pro`` or ``tiny``; ``overrides`` replace fields (e.g. ``recipe="bf16"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DeepSeekV4Config.from_hf_dict(PRESETS[name], **overrides)


def yarn_ramp_bounds(theta: float, rope_dim: int, original_max: int, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    """(lo, hi) of the YaRN ramp (DeepSeek variant); theta=160000 -> (15, 25) for rope_dim 64."""

    def corr(n_rot: float) -> float:
        return rope_dim * math.log(original_max / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    return max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), rope_dim - 1)

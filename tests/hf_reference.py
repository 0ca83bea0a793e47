"""HF ``transformers`` DeepSeek-V4 as an independent oracle for our reference model.

Both sides are built from the same dict ``official name -> float32 numpy array`` (the output of
:func:`nvfp4jax.checkpoint.random_weights.random_official_weights`, or a dequantised checkpoint).
The HF model runs in float32, eval mode, eager attention. What HF computes differently from the
spec, and what our model must switch off to compare with it, is listed in ``docs/hf_vs_spec.md``.

Public functions:

* :func:`hf_config` -- our config as a transformers ``DeepseekV4Config`` (float32, eager);
* :func:`hf_state_dict` -- the name mapping (official name -> HF tensor), strict both ways;
* :func:`hf_model` -- a loaded ``DeepseekV4ForCausalLM``;
* :func:`hf_logits` -- full-sequence prefill logits from position 0, no cache;
* :func:`hf_hidden_states` -- per-layer mHC streams and the final collapsed state;
* :func:`hf_greedy` -- greedy decoding with transformers' own ``generate`` and cache;
* :func:`hf_generate` -- the same, also returning each step's logits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from nvfp4jax.config import DeepSeekV4Config

#: HF config keys of ours that transformers ignores or that only describe checkpoint storage
_DROPPED_HF_KEYS = ("quantization_config", "torch_dtype", "transformers_version", "architectures")

#: official global names -> HF names
_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}

#: official block-relative names -> HF block-relative names (one-to-one copies)
_BLOCK = {
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",  # [G*O, (H/G)*D], viewed [G, O, (H/G)*D] by both
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERT = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.weight")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def hf_config(cfg: DeepSeekV4Config) -> DeepseekV4Config:
    """``cfg`` as a transformers config: same ``config.json`` keys, float32, eager attention.

    HF derives ``layer_types`` / ``mlp_layer_types`` / ``rope_parameters`` from the legacy keys
    (``compress_ratios``, ``num_hash_layers``, ``rope_scaling``) exactly as it does when loading the
    real checkpoint; the result is checked against our schedule.
    """
    if cfg.num_shared_experts != 1:
        raise ValueError(f"transformers has exactly one shared expert, got n_shared_experts={cfg.num_shared_experts}")
    if not cfg.norm_topk_prob or cfg.topk_method != "noaux_tc":
        raise ValueError("transformers always renormalises the top-k weights (noaux_tc, norm_topk_prob=True)")
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in _DROPPED_HF_KEYS}
    hf = DeepseekV4Config(**d, dtype="float32")
    hf._attn_implementation = "eager"  # the only backend V4 supports (it needs the sink column)
    hf._experts_implementation = "eager"  # the per-expert loop of DeepseekV4Experts, not torch._grouped_mm
    types = {"swa": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
    expected = [types[t] for t in cfg.layer_types]
    if hf.layer_types != expected:
        raise ValueError(f"HF layer_types {hf.layer_types} != ours {expected}")
    mlp = ["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.num_layers)]
    if hf.mlp_layer_types != mlp:
        raise ValueError(f"HF mlp_layer_types {hf.mlp_layer_types} != ours {mlp}")
    if hf.qk_rope_head_dim != cfg.rope_head_dim:
        raise ValueError(f"HF rope dim {hf.qk_rope_head_dim} != ours {cfg.rope_head_dim}")
    return hf


def hf_state_dict(cfg: DeepSeekV4Config, weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map official (non-MTP) weights onto HF state-dict names.

    Routed experts are stacked: ``gate_up_proj[e] = concat(w1_e, w3_e)`` along the output dim
    (HF splits it with ``chunk(2)``: gate first, up second), ``down_proj[e] = w2_e``. Every other
    tensor is copied unchanged (both sides use ``[out, in]``). Raises if a name is not understood or
    an expert is missing; ``mtp.*`` names are skipped (transformers does not build the MTP block).
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    unknown = []
    for name, value in weights.items():
        if name.startswith("mtp."):
            continue
        if name in _GLOBAL:
            out[_GLOBAL[name]] = _tensor(value)
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            unknown.append(name)
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if rest in _BLOCK:
            out[f"model.layers.{layer}.{_BLOCK[rest]}"] = _tensor(value)
        elif (e := _EXPERT.fullmatch(rest)) is not None:
            experts.setdefault((layer, e.group(2)), {})[int(e.group(1))] = np.asarray(value)
        else:
            unknown.append(name)
    if unknown:
        raise KeyError(f"official names with no HF counterpart: {unknown[:10]} ({len(unknown)} in all)")
    layers = sorted({layer for layer, _ in experts})
    for layer in layers:
        stacks = {}
        for w in ("w1", "w2", "w3"):
            have = experts.get((layer, w), {})
            if sorted(have) != list(range(cfg.num_experts)):
                missing = sorted(set(range(cfg.num_experts)) - set(have))
                raise KeyError(f"layer {layer}: routed experts missing for {w}: {missing}")
            stacks[w] = np.stack([have[e] for e in range(cfg.num_experts)])
        prefix = f"model.layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = _tensor(np.concatenate([stacks["w1"], stacks["w3"]], axis=1))
        out[f"{prefix}.down_proj"] = _tensor(stacks["w2"])
    return out


def _tensor(value: np.ndarray) -> torch.Tensor:
    value = np.asarray(value)
    if value.dtype.kind in "iu":
        return torch.from_numpy(value.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def hf_model(cfg: DeepSeekV4Config, weights: Mapping[str, np.ndarray]) -> DeepseekV4ForCausalLM:
    """A float32, eval-mode ``DeepseekV4ForCausalLM`` holding ``weights``.

    Raises if any HF parameter or persistent buffer would stay unset, if a mapped tensor has no HF
    slot, or if a shape differs. (The rotary ``inv_freq`` buffers are computed from the config, not
    loaded, and are not in the state dict.)
    """
    model = DeepseekV4ForCausalLM(hf_config(cfg)).eval()
    target = model.state_dict()
    source = hf_state_dict(cfg, weights)
    unset = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    if unset or extra:
        raise KeyError(f"HF tensors left unmapped: {unset}; mapped names HF does not have: {extra}")
    wrong = [(k, tuple(source[k].shape), tuple(target[k].shape)) for k in target if source[k].shape != target[k].shape]
    if wrong:
        raise ValueError(f"shape mismatches (name, ours, HF): {wrong}")
    model.load_state_dict(source, strict=True)
    return model


def _ids(input_ids: np.ndarray) -> torch.Tensor:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be an integer [batch, seq] array, got {ids.dtype} {ids.shape}")
    return torch.from_numpy(ids.astype(np.int64))


def hf_logits(
    cfg: DeepSeekV4Config,
    weights: Mapping[str, np.ndarray],
    input_ids: np.ndarray,
    *,
    model: DeepseekV4ForCausalLM | None = None,
) -> np.ndarray:
    """Prefill logits ``[B, S, V]`` float32 of ``input_ids`` ``[B, S]`` from position 0, no cache.

    Pass ``model`` (from :func:`hf_model`) to reuse a loaded model; ``weights`` is then unused.
    """
    model = hf_model(cfg, weights) if model is None else model
    with torch.no_grad():
        out = model(input_ids=_ids(input_ids), use_cache=False)
    return out.logits.float().numpy()


@dataclasses.dataclass(frozen=True)
class HFTrace:
    """Intermediate HF states of one prefill (all float32 numpy).

    ``streams[l]`` is the mHC residual stream ``X`` entering layer ``l`` (``[B, S, hc_mult, d]``,
    uncollapsed): ``streams[0]`` is the embedding repeated ``hc_mult`` times and
    ``streams[num_layers]`` the output of the last layer (before ``HCHead``). ``collapsed`` is
    ``HCHead(streams[-1])`` ``[B, S, d]`` (before the final norm), ``final`` is
    ``RMSNorm(collapsed; norm.weight)`` (the LM-head input), ``logits`` ``[B, S, V]``.
    """

    streams: list[np.ndarray]
    collapsed: np.ndarray
    final: np.ndarray
    logits: np.ndarray


def hf_hidden_states(
    cfg: DeepSeekV4Config,
    weights: Mapping[str, np.ndarray],
    input_ids: np.ndarray,
    *,
    model: DeepseekV4ForCausalLM | None = None,
) -> HFTrace:
    """Per-layer states of a no-cache prefill, to localise a mismatch layer by layer.

    Captured with forward hooks rather than ``output_hidden_states``: transformers' tuple
    ``hidden_states`` holds ``streams[0..L-1]`` but replaces its last entry with the *normed,
    collapsed* ``final`` state, so the last layer's own output stream would be lost.
    """
    model = hf_model(cfg, weights) if model is None else model
    streams: list[torch.Tensor] = []
    collapsed: list[torch.Tensor] = []

    def take_input(module, args):
        if not streams:
            streams.append(args[0])

    def take_output(module, args, output):
        streams.append(output)

    layers = model.model.layers
    hooks = [layers[0].register_forward_pre_hook(take_input)]
    hooks += [layer.register_forward_hook(take_output) for layer in layers]
    hooks.append(model.model.hc_head.register_forward_hook(lambda m, a, o: collapsed.append(o)))
    try:
        with torch.no_grad():
            out = model(input_ids=_ids(input_ids), use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    as_np: Callable[[torch.Tensor], np.ndarray] = lambda t: t.detach().float().numpy()
    return HFTrace(
        streams=[as_np(s) for s in streams],
        collapsed=as_np(collapsed[0]),
        final=as_np(out.hidden_states[-1]),
        logits=as_np(out.logits),
    )


def hf_greedy(
    cfg: DeepSeekV4Config,
    weights: Mapping[str, np.ndarray],
    input_ids: np.ndarray,
    max_new_tokens: int,
    *,
    model: DeepseekV4ForCausalLM | None = None,
) -> list[int]:
    """The ``max_new_tokens`` tokens transformers' ``generate`` picks greedily after ``input_ids`` ``[1, S]``.

    Uses HF's own cache (sliding window of the last 127 keys + the new one, compressor buffers and
    CSA overlap state); never stops early at EOS. Returns only the new tokens.
    """
    return hf_generate(cfg, weights, input_ids, max_new_tokens, model=model)[0]


def hf_generate(
    cfg: DeepSeekV4Config,
    weights: Mapping[str, np.ndarray],
    input_ids: np.ndarray,
    max_new_tokens: int,
    *,
    model: DeepseekV4ForCausalLM | None = None,
) -> tuple[list[int], np.ndarray]:
    """Greedy ``generate`` as :func:`hf_greedy`, also returning the logits of every step ``[max_new_tokens, V]``.

    Row ``i`` is the (unprocessed) logit vector from which new token ``i`` was picked: row 0 comes from
    the cached prefill of the prompt, row ``i > 0`` from the one-token decode step at position
    ``S + i - 1``.
    """
    ids = _ids(input_ids)
    if ids.shape[0] != 1:
        raise ValueError(f"hf_greedy takes one sequence, got batch {ids.shape[0]}")
    model = hf_model(cfg, weights) if model is None else model
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=cfg.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, ids.shape[1]:].tolist()
    if len(new) != max_new_tokens:
        raise RuntimeError(f"generate returned {len(new)} tokens, expected {max_new_tokens}")
    return new, torch.cat(out.logits, dim=0).float().numpy()

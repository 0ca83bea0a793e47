"""Synthetic checkpoints: known float source weights written in a published layout.

:func:`write_checkpoint` encodes source weights (official name -> float32 / int64, e.g. from
:func:`~nvfp4jax.checkpoint.random_weights.random_official_weights`) exactly as the published
checkpoints store them, so the loader can be proven on a twin of the real files:

* ``official``: FP8 linears via :func:`formats.encode_fp8_block` (E8M0 128x128 scales), routed
  experts via :func:`formats.encode_mxfp4` (I8 pairs + E8M0 per 32), BF16 / F32 / I64 as the schema;
* ``nvidia``: as official, except backbone routed experts in ModelOpt NVFP4, quantised from the
  source with :func:`formats.quantize` (``weight`` U8, ``weight_scale`` F8_E4M3,
  ``weight_scale_2`` F32 = the global scale, ``input_scale`` F32 = 1.0, unused by our recipes);
  ``config.json`` gains a ModelOpt ``quantization_config`` whose ``ignore`` list holds ``mtp.*``;
* ``nvfp4jax``: our own layout (what ``convert`` writes), quantised from the source.
"""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from nvfp4jax import formats
from nvfp4jax.checkpoint.layouts import LogicalTensor, logical_tensors
from nvfp4jax.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardedWriter
from nvfp4jax.config import DeepSeekV4Config

NVIDIA_QUANTIZATION_CONFIG = {
    "quant_method": "modelopt",
    "quant_algo": "NVFP4",
    "group_size": 16,
    "producer": {"name": "modelopt"},
    "ignore": ["mtp.*", "embed", "head", "*.attn.*", "*.shared_experts.*", "*.ffn.gate"],
}


def e8m0_bytes(scale) -> np.ndarray:
    """E8M0 scales as ``float8_e8m0fnu``, reinterpreting the bytes (never a numeric cast)."""
    return np.asarray(formats.as_e8m0_bytes(scale)).view(ml_dtypes.float8_e8m0fnu)


def nvfp4_arrays(t: LogicalTensor, q: formats.NVFP4Tensor) -> dict[str, np.ndarray]:
    """An NVFP4 tensor under ``t``'s stored names (ModelOpt or ours); checkpoints are row-major."""
    q = formats.nvfp4.untile_weight(q)
    values, scales = np.asarray(q.values), np.asarray(q.scales)
    g = np.asarray(q.global_scale, np.float32).reshape(())
    if t.format == "modelopt":
        return {t.name: values, f"{t.base}.weight_scale": scales, f"{t.base}.weight_scale_2": g,
                f"{t.base}.input_scale": np.array(1.0, np.float32)}
    return {f"{t.base}.values": values, f"{t.base}.scales": scales, f"{t.base}.global_scale": g}


def encode_source(t: LogicalTensor, value: np.ndarray) -> dict[str, np.ndarray]:
    """Stored arrays of ``t`` (by stored name) from its float source value."""
    if t.format == "plain":
        spec = t.stored[0]
        dtype = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "I64": np.int64, "I32": np.int32}[spec.dtype]
        return {t.name: np.asarray(value).astype(dtype)}
    if t.format == "fp8":
        q = formats.encode_fp8_block(value)
        return {t.name: np.asarray(q.weight), f"{t.base}.scale": e8m0_bytes(q.scale)}
    if t.format == "mxfp4":
        q = formats.encode_mxfp4(value)
        return {t.name: np.asarray(q.weight), f"{t.base}.scale": e8m0_bytes(q.scale)}
    if t.format in ("modelopt", "nvfp4"):
        return nvfp4_arrays(t, formats.quantize(value))
    if t.format == "bf16":
        return {t.name: np.asarray(value).astype(ml_dtypes.bfloat16)}
    raise ValueError(f"{t.name}: unknown stored format {t.format}")


def checkpoint_config(cfg: DeepSeekV4Config, layout: str, recipe: str = "nvfp4") -> dict[str, Any]:
    """``config.json`` of ``cfg`` in ``layout``."""
    d = cfg.to_hf_dict()
    if layout == "nvidia":
        d["quantization_config"] = dict(NVIDIA_QUANTIZATION_CONFIG)
    elif layout == "nvfp4jax":
        d["quantization_config"] = {
            "quant_method": "nvfp4jax", "recipe": recipe, "format_version": 1,
            "linear_format": "bf16 <name>.weight" if recipe == "bf16" else
            "nvfp4 <base>.values (U8 packed E2M1, low nibble first) / .scales (F8_E4M3 per 16) / .global_scale (F32)",
        }
    return d


def write_checkpoint(
    path: str | os.PathLike,
    cfg: DeepSeekV4Config,
    weights: dict[str, np.ndarray],
    *,
    layout: str = "official",
    recipe: str = "nvfp4",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    include_mtp: bool = True,
    progress: bool = False,
) -> list[str]:
    """Write ``weights`` (every source tensor of ``cfg``) as a sharded checkpoint; returns the shard files."""
    tensors = list(logical_tensors(cfg, layout, recipe=recipe, include_mtp=include_mtp))
    missing = [t.name for t in tensors if t.name not in weights]
    if missing:
        raise KeyError(f"source weights lack {len(missing)} tensors of the schema, e.g. {missing[:3]}")
    writer = ShardedWriter(path, max_shard_bytes=max_shard_bytes)
    for t in tqdm(tensors, desc=f"writing {layout} checkpoint", unit="tensor", disable=not progress):
        value = weights[t.name]
        if tuple(np.shape(value)) != t.logical_shape:
            raise ValueError(f"source tensor '{t.name}' has shape {np.shape(value)}, the schema says {t.logical_shape}")
        for name, array in encode_source(t, value).items():
            writer.add(name, array)
    return writer.close(checkpoint_config(cfg, layout, recipe))

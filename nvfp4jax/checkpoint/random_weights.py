"""Deterministic random *source* weights by official tensor name (float32, logical shapes).

One generator serves the random-weight model, the synthetic checkpoints and the HF parity
harness, so all three see the same weights. Each tensor depends only on (seed, name): a layer
can be generated alone, in any order. Scales keep activations O(1) through the network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from nvfp4jax.checkpoint.schema import F32, I64, TensorSpec, official_schema
from nvfp4jax.config import DeepSeekV4Config


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_tensor(cfg: DeepSeekV4Config, spec: TensorSpec, seed: int) -> np.ndarray:
    """The source value of one tensor (no ``.scale`` companions: those belong to a storage format).

    Floats are returned as float32 at ``spec.logical_shape``; ``tid2eid`` as int64 with distinct
    experts per row.
    """
    name, shape = spec.name, spec.logical_shape
    rng = _rng(seed, name)
    base = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    if spec.dtype == I64:  # tid2eid: k distinct experts per token
        keys = rng.random((shape[0], cfg.num_experts))
        return np.argsort(keys, axis=1)[:, : shape[1]].astype(np.int64)
    if name.endswith(("norm.weight",)):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if base.startswith("hc_") and name.endswith("_fn"):
        return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    if name.endswith("_base"):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("_scale") and spec.dtype == F32:
        return (0.5 + 0.5 * rng.random(shape)).astype(np.float32)
    if name.endswith("attn_sink"):
        return rng.standard_normal(shape).astype(np.float32)
    if name.endswith(".ape"):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("gate.bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "embed.weight":
        return rng.standard_normal(shape).astype(np.float32)
    if len(shape) == 2:  # every linear: [out, in]
        return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    raise ValueError(f"no random initialiser for {name} {spec}")


def source_specs(cfg: DeepSeekV4Config, *, include_mtp: bool = True) -> Iterator[TensorSpec]:
    """The schema without the storage-only ``.scale`` companions of quantized weights."""
    quantized = set()
    for spec in official_schema(cfg, include_mtp=include_mtp):
        if spec.format != "plain":
            quantized.add(spec.name[: -len(".weight")])
        elif spec.name.endswith(".scale") and spec.name[: -len(".scale")] in quantized:
            continue
        yield spec


def random_official_weights(cfg: DeepSeekV4Config, seed: int = 0, *, include_mtp: bool = True) -> dict[str, np.ndarray]:
    """All source weights of ``cfg`` by official name (use only for small configs: it allocates them)."""
    return {s.name: random_tensor(cfg, s, seed) for s in source_specs(cfg, include_mtp=include_mtp)}

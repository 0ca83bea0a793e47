"""Checkpoint layouts: how each logical tensor of the model is stored on disk.

A *logical* tensor is one source weight by its official name (``layers.3.attn.wq_a.weight``,
``embed.weight``; the names of :func:`nvfp4jax.checkpoint.random_weights.source_specs`). A layout
says which stored tensors (safetensors name, dtype, shape) hold it and in which format:

| layout | big linears (`BIG_LINEARS`) | `wo_a` | routed experts | rest |
| --- | --- | --- | --- | --- |
| ``official`` (DeepSeek) | ``fp8``: `.weight` F8_E4M3 + `.scale` E8M0 per 128x128 | ``fp8`` | ``mxfp4``: `.weight` I8 + `.scale` E8M0 per 32 | BF16 / F32 / I64 |
| ``nvidia`` (ModelOpt NVFP4) | as official | as official | backbone: ``modelopt``: `.weight` U8, `.weight_scale` F8_E4M3 per 16, `.weight_scale_2` F32 [], `.input_scale` F32 []; MTP: ``mxfp4`` | as official |
| ``nvfp4jax`` (ours, written by ``convert``) | ``nvfp4``: `<base>.values` U8 [out,in/2], `<base>.scales` F8_E4M3 [out,in/16], `<base>.global_scale` F32 [] (recipe bf16: ``bf16`` `.weight` BF16) | ``bf16`` `.weight` BF16 | as big linears | BF16 / F32; `tid2eid` I32 |

``<base>`` is the logical name without ``.weight``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from nvfp4jax.checkpoint.random_weights import source_specs
from nvfp4jax.checkpoint.schema import BF16, F8_E4M3, F8_E8M0, F32, I8, I64, U8, TensorSpec
from nvfp4jax.config import DeepSeekV4Config

LAYOUTS = ("official", "nvidia", "nvfp4jax")
I32 = "I32"
#: ``quantization_config.quant_method`` of each layout's ``config.json``
QUANT_METHODS = {"official": "fp8", "nvidia": "modelopt", "nvfp4jax": "nvfp4jax"}

_LAYER = re.compile(r"^(layers\.\d+|mtp\.\d+)\.")
_BACKBONE_EXPERT = re.compile(r"^layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$")


@dataclasses.dataclass(frozen=True)
class LogicalTensor:
    """One model weight and the stored tensors that hold it in a given layout."""

    name: str
    logical_shape: tuple[int, ...]
    #: "fp8", "mxfp4", "modelopt" (NVIDIA NVFP4), "nvfp4" (ours), "bf16" (a dequantised linear), "plain"
    format: str
    stored: tuple[TensorSpec, ...]
    #: "big" (NVFP4 under the nvfp4 recipes), "wo_a" (always BF16), or "" (not a quantised linear)
    linear: str = ""

    @property
    def base(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


def layer_key(name: str) -> str:
    """``layers.3`` / ``mtp.0`` for block tensors, ``global`` for the rest."""
    m = _LAYER.match(name)
    return m.group(1) if m else "global"


def _spec(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, dtype, shape, shape)


def _official(src: TensorSpec, linear: str) -> LogicalTensor:
    out, inp = src.logical_shape
    base = src.name[: -len(".weight")]
    if src.format == "fp8":
        scale = _spec(f"{base}.scale", F8_E8M0, (-(-out // 128), -(-inp // 128)))
        return LogicalTensor(src.name, src.logical_shape, "fp8", (_spec(src.name, F8_E4M3, (out, inp)), scale), linear)
    scale = _spec(f"{base}.scale", F8_E8M0, (out, inp // 32))
    return LogicalTensor(src.name, src.logical_shape, "mxfp4", (_spec(src.name, I8, (out, inp // 2)), scale), linear)


def _modelopt(src: TensorSpec) -> LogicalTensor:
    out, inp = src.logical_shape
    base = src.name[: -len(".weight")]
    stored = (
        _spec(src.name, U8, (out, inp // 2)),
        _spec(f"{base}.weight_scale", F8_E4M3, (out, inp // 16)),
        _spec(f"{base}.weight_scale_2", F32, ()),
        _spec(f"{base}.input_scale", F32, ()),
    )
    return LogicalTensor(src.name, src.logical_shape, "modelopt", stored, "big")


def _ours(src: TensorSpec, linear: str, recipe: str) -> LogicalTensor:
    out, inp = src.logical_shape
    base = src.name[: -len(".weight")]
    if linear == "wo_a" or recipe == "bf16":
        return LogicalTensor(src.name, src.logical_shape, "bf16", (_spec(src.name, BF16, (out, inp)),), linear)
    stored = (
        _spec(f"{base}.values", U8, (out, inp // 2)),
        _spec(f"{base}.scales", F8_E4M3, (out, inp // 16)),
        _spec(f"{base}.global_scale", F32, ()),
    )
    return LogicalTensor(src.name, src.logical_shape, "nvfp4", stored, linear)


def logical_tensors(cfg: DeepSeekV4Config, layout: str, *, recipe: str = "nvfp4", include_mtp: bool = True) -> Iterator[LogicalTensor]:
    """Every logical tensor of ``cfg`` with its storage in ``layout`` (``recipe`` only matters for ``nvfp4jax``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    for src in source_specs(cfg, include_mtp=include_mtp):
        if src.format == "plain":
            dtype = I32 if layout == "nvfp4jax" and src.dtype == I64 else src.dtype
            yield LogicalTensor(src.name, src.logical_shape, "plain", (_spec(src.name, dtype, src.shape),))
            continue
        linear = "wo_a" if src.name.endswith(".attn.wo_a.weight") else "big"
        if layout == "official" or (layout == "nvidia" and not _BACKBONE_EXPERT.match(src.name)):
            yield _official(src, linear)
        elif layout == "nvidia":
            yield _modelopt(src)
        else:
            yield _ours(src, linear, recipe)


def stored_schema(cfg: DeepSeekV4Config, layout: str, *, recipe: str = "nvfp4", include_mtp: bool = True) -> Iterator[TensorSpec]:
    """The flat list of stored tensors (what the safetensors headers must hold)."""
    for t in logical_tensors(cfg, layout, recipe=recipe, include_mtp=include_mtp):
        yield from t.stored

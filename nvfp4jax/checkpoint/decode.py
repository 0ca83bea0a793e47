"""Decode one logical tensor from its stored arrays into what the model holds, per recipe (design §4).

| stored format | recipe ``nvfp4`` / ``nvfp4-w4a16`` (big linears) | recipe ``bf16``, and ``wo_a`` always |
| --- | --- | --- |
| ``mxfp4`` (official experts) | :func:`formats.mxfp4_to_nvfp4`, exact where the block exponents allow (proved bitwise), else re-quantised and reported | dequantised (exact) |
| ``fp8`` (official linears) | dequantise, then :func:`formats.quantize` (per-tensor global) | dequantised (exact) |
| ``modelopt`` (NVIDIA NVFP4) | as is: ``weight``, ``weight_scale``, ``weight_scale_2`` | dequantised |
| ``nvfp4`` (ours) | as is | dequantised |
| ``bf16`` (ours, a dequantised linear) | :func:`formats.quantize` | as is |

Everything else: BF16 -> bfloat16, F32 -> float32, I64/I32 ``tid2eid`` -> int32 (checked to lie in
``[0, num_experts)``). Every decode returns a :class:`Conversion` saying whether it was exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from nvfp4jax import formats
from nvfp4jax.checkpoint.layouts import LogicalTensor
from nvfp4jax.checkpoint.safetensors_io import CheckpointError
from nvfp4jax.config import DeepSeekV4Config


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How one tensor went from storage to the model."""

    name: str
    source: str  # stored format: fp8, mxfp4, modelopt, nvfp4, bf16, plain
    target: str  # nvfp4, bfloat16, float32, int32
    exact: bool  # the model sees exactly the stored values (bitwise after dequantisation)
    detail: str = ""

    def describe(self) -> str:
        kind = "exact" if self.exact else "INEXACT"
        return f"{self.name}: {self.source} -> {self.target}, {kind}" + (f" ({self.detail})" if self.detail else "")


def target_format(t: LogicalTensor, recipe: str) -> str:
    """``nvfp4`` or ``bfloat16`` for a quantised linear, the stored kind otherwise."""
    if not t.linear:
        return "plain"
    return "bfloat16" if t.linear == "wo_a" or recipe == "bf16" else "nvfp4"


def check_global_scale(value: np.ndarray, where: str, name: str) -> None:
    """A per-tensor global scale must be one finite, positive float (NVIDIA has shipped zeros)."""
    v = np.asarray(value, np.float32).reshape(-1)
    if v.size != 1 or not np.isfinite(v[0]) or v[0] <= 0:
        raise CheckpointError(f"{where}: tensor '{name}': global scale must be finite and > 0, got {v.tolist()}")


def _nvfp4(t: LogicalTensor, arrays: dict[str, np.ndarray], where: Callable[[str], str]) -> formats.NVFP4Tensor:
    """The stored NVFP4 triple (ModelOpt names or ours), checked."""
    if t.format == "modelopt":
        values, scales, g_name = arrays[t.name], arrays[f"{t.base}.weight_scale"], f"{t.base}.weight_scale_2"
    else:
        values, scales, g_name = arrays[f"{t.base}.values"], arrays[f"{t.base}.scales"], f"{t.base}.global_scale"
    check_global_scale(arrays[g_name], where(g_name), g_name)
    s = scales.astype(np.float32)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        bad = tuple(int(i) for i in np.argwhere(~(np.isfinite(s) & (s >= 0)))[0])
        raise CheckpointError(f"{where(scales_name(t))}: tensor '{scales_name(t)}': block scale at {bad} is {s[bad]} (must be finite, >= 0)")
    g = jnp.asarray(np.asarray(arrays[g_name], np.float32).reshape(()))
    return formats.NVFP4Tensor(jnp.asarray(values.view(np.uint8)), jnp.asarray(scales), g)


def scales_name(t: LogicalTensor) -> str:
    return f"{t.base}.weight_scale" if t.format == "modelopt" else f"{t.base}.scales"


def dequantize_stored(t: LogicalTensor, arrays: dict[str, np.ndarray], where: Callable[[str], str]) -> jnp.ndarray:
    """The float32 values a stored linear means (exact for every stored format)."""
    if t.format == "fp8":
        out = formats.decode_fp8_block(arrays[t.name], arrays[f"{t.base}.scale"])
    elif t.format == "mxfp4":
        out = formats.decode_mxfp4(arrays[t.name], arrays[f"{t.base}.scale"])
    elif t.format in ("modelopt", "nvfp4"):
        out = formats.dequantize(_nvfp4(t, arrays, where))
    elif t.format == "bf16":
        out = jnp.asarray(arrays[t.name]).astype(jnp.float32)
    else:
        raise ValueError(f"{t.name}: not a quantised linear ({t.format})")
    if not bool(jnp.all(jnp.isfinite(out))):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(out)))[0])
        scale = " (check its scales, e.g. an E8M0 byte 255 = NaN)" if t.format != "bf16" else ""
        raise CheckpointError(f"{where(t.stored[0].name)}: tensor '{t.stored[0].name}': non-finite value at {bad} after dequantisation{scale}")
    return out


def _bitwise_equal(a: jnp.ndarray, b: jnp.ndarray) -> bool:
    return bool(jnp.array_equal(a, b))


def decode(t: LogicalTensor, arrays: dict[str, np.ndarray], cfg: DeepSeekV4Config, recipe: str, where: Callable[[str], str]):
    """``(value, Conversion)`` for ``t`` from its stored ``arrays`` (by stored name); ``where(stored_name)`` is its file."""
    if not t.linear:
        return _decode_plain(t, arrays[t.name], cfg, where(t.name))
    target = target_format(t, recipe)
    if target == "bfloat16":
        if t.format == "bf16":
            return jnp.asarray(arrays[t.name]), Conversion(t.name, t.format, target, True)
        w = dequantize_stored(t, arrays, where)
        out = w.astype(jnp.bfloat16)
        exact = _bitwise_equal(out.astype(jnp.float32), w)
        return out, Conversion(t.name, t.format, target, exact, "" if exact else "dequantised values rounded to bfloat16")
    if t.format in ("modelopt", "nvfp4"):
        return _nvfp4(t, arrays, where), Conversion(t.name, t.format, target, True)
    if t.format == "mxfp4":
        out, rep = formats.mxfp4_to_nvfp4(arrays[t.name], arrays[f"{t.base}.scale"], strict=False, name=t.name)
        return out, Conversion(t.name, t.format, target, rep.exact, rep.describe())
    w = dequantize_stored(t, arrays, where)
    out = formats.quantize(w)
    err = float(jnp.max(jnp.abs(formats.dequantize(out) - w)))
    amax = float(jnp.max(jnp.abs(w)))
    return out, Conversion(t.name, t.format, target, err == 0.0, f"re-quantised: max abs error {err:.3e} (amax {amax:.3e})")


def _decode_plain(t: LogicalTensor, a: np.ndarray, cfg: DeepSeekV4Config, where: str):
    if a.dtype.kind in "iu":
        if a.size and (a.min() < 0 or a.max() >= cfg.num_experts):
            raise CheckpointError(
                f"{where}: tensor '{t.name}': expert ids must lie in [0, {cfg.num_experts}), got [{a.min()}, {a.max()}]"
            )
        return jnp.asarray(a.astype(np.int32)), Conversion(t.name, "plain", "int32", True)
    out = jnp.asarray(a)
    return out, Conversion(t.name, "plain", str(out.dtype), True)

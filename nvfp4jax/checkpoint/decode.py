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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4jax import formats
from nvfp4jax.checkpoint.layouts import LogicalTensor
from nvfp4jax.checkpoint.safetensors_io import CheckpointError
from nvfp4jax.config import DeepSeekV4Config
from nvfp4jax.formats.mxfp4 import E4M3_POW2_MAX, E4M3_POW2_MIN


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


# Jitted per shape: eager op-by-op dispatch makes a Flash expert ~0.6 s on CPU, jitted ~0.05 s.
_decode_fp8 = jax.jit(formats.decode_fp8_block)
_decode_mxfp4 = jax.jit(formats.decode_mxfp4)
_dequantize = jax.jit(formats.dequantize)


@jax.jit
def _requantize(w: jax.Array):
    """NVFP4 (per-tensor global) of finite float32 ``w``, with the max abs error it makes."""
    q = formats.quantize(w)
    return q, jnp.max(jnp.abs(formats.dequantize(q) - w))


@jax.jit
def _mxfp4_as_nvfp4(weight: jax.Array, scale: jax.Array):
    """The exact MXFP4 -> NVFP4 rule of :func:`formats.mxfp4_to_nvfp4`, jitted, with its bitwise proof.

    Keeps the codes; block scale ``2 ** (e_b - G)`` on both 16-halves of each non-zero 32-block
    (0 on all-zero blocks), global ``2 ** G`` with ``G = max e_b - 8``. Returns the tensor, whether
    its dequantisation equals the MXFP4 one bit for bit, and the exponent range of non-zero blocks.
    """
    codes = formats.unpack_e2m1(weight)
    nonzero = jnp.any((codes.reshape(*scale.shape, 32) & 0x7) != 0, axis=-1)
    e = formats.e8m0_exponent(scale)
    lo = jnp.min(jnp.where(nonzero, e, jnp.int32(1 << 20)))
    hi = jnp.max(jnp.where(nonzero, e, jnp.int32(-(1 << 20))))
    g_exp = jnp.where(jnp.any(nonzero), hi - E4M3_POW2_MAX, jnp.int32(0))
    one = jnp.float32(1.0)
    block = jnp.where(nonzero, jnp.ldexp(one, jnp.clip(e - g_exp, E4M3_POW2_MIN, E4M3_POW2_MAX)), jnp.float32(0.0))
    out = formats.NVFP4Tensor(weight, jnp.repeat(block, 2, axis=-1).astype(jnp.float8_e4m3fn), jnp.ldexp(one, g_exp))
    exact = jnp.array_equal(formats.dequantize(out), formats.decode_mxfp4(weight, scale))
    return out, exact, lo, hi, g_exp


def _check_e8m0(t: LogicalTensor, arrays: dict[str, np.ndarray], where: Callable[[str], str]) -> np.ndarray:
    """The E8M0 ``.scale`` bytes of an official linear; byte 255 (NaN) is an error."""
    name = f"{t.base}.scale"
    b = arrays[name].view(np.uint8)
    if np.any(b == 255):
        bad = tuple(int(i) for i in np.argwhere(b == 255)[0])
        raise CheckpointError(f"{where(name)}: tensor '{name}': E8M0 byte 255 (NaN) at {bad}, {int(np.sum(b == 255))} in all")
    return b


def dequantize_stored(t: LogicalTensor, arrays: dict[str, np.ndarray], where: Callable[[str], str]) -> jax.Array:
    """The float32 values a stored linear means (exact for every stored format)."""
    if t.format == "fp8":
        out = _decode_fp8(arrays[t.name], _check_e8m0(t, arrays, where))
    elif t.format == "mxfp4":
        out = _decode_mxfp4(arrays[t.name].view(np.uint8), _check_e8m0(t, arrays, where))
    elif t.format in ("modelopt", "nvfp4"):
        out = _dequantize(_nvfp4(t, arrays, where))
    elif t.format == "bf16":
        out = jnp.asarray(arrays[t.name]).astype(jnp.float32)
    else:
        raise ValueError(f"{t.name}: not a quantised linear ({t.format})")
    if not bool(jnp.all(jnp.isfinite(out))):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(out)))[0])
        name = t.stored[0].name
        raise CheckpointError(f"{where(name)}: tensor '{name}': non-finite value at {bad} after dequantisation")
    return out


def _mxfp4_to_nvfp4(t: LogicalTensor, arrays: dict[str, np.ndarray], where: Callable[[str], str]):
    weight, scale = arrays[t.name].view(np.uint8), _check_e8m0(t, arrays, where)
    out, exact, lo, hi, g_exp = _mxfp4_as_nvfp4(weight, scale)
    if bool(exact):
        nonzero = int(lo) <= int(hi)
        report = formats.ConversionReport(True, int(lo) if nonzero else None, int(hi) if nonzero else None, int(g_exp), 0.0)
        return out, report
    # the exponents do not fit E4M3: the formats module re-quantises and reports
    return formats.mxfp4_to_nvfp4(weight, scale, strict=False, name=t.name)


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
        exact = bool(jnp.array_equal(out.astype(jnp.float32), w))
        return out, Conversion(t.name, t.format, target, exact, "" if exact else "dequantised values rounded to bfloat16")
    if t.format in ("modelopt", "nvfp4"):
        return _nvfp4(t, arrays, where), Conversion(t.name, t.format, target, True)
    if t.format == "mxfp4":
        out, report = _mxfp4_to_nvfp4(t, arrays, where)
        return out, Conversion(t.name, t.format, target, report.exact, report.describe())
    w = dequantize_stored(t, arrays, where)
    out, err = _requantize(w)
    amax = float(jnp.max(jnp.abs(w)))
    return out, Conversion(t.name, t.format, target, float(err) == 0.0, f"re-quantised: max abs error {float(err):.3e} (amax {amax:.3e})")


def _decode_plain(t: LogicalTensor, a: np.ndarray, cfg: DeepSeekV4Config, where: str):
    if a.dtype.kind in "iu":
        if a.size and (a.min() < 0 or a.max() >= cfg.num_experts):
            raise CheckpointError(
                f"{where}: tensor '{t.name}': expert ids must lie in [0, {cfg.num_experts}), got [{a.min()}, {a.max()}]"
            )
        return jnp.asarray(a.astype(np.int32)), Conversion(t.name, "plain", "int32", True)
    out = jnp.asarray(a)
    return out, Conversion(t.name, "plain", str(out.dtype), True)

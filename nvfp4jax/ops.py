"""The one dispatch table: op name -> CuTeDSL kernel (by GPU arch) or pure-JAX reference.

``NVFP4JAX_BACKEND`` = ``auto`` (default: kernels on an sm_90/sm_100 GPU when CuTeDSL imports,
otherwise the reference), ``reference`` or ``cutedsl`` (an error where kernels cannot run; never a
silent fallback). Kernel modules are imported lazily, on first use, so importing nvfp4jax never
compiles or registers anything. The model calls ops only through this module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable

import jax

from nvfp4jax.ref import gemm as _ref_gemm
from nvfp4jax.ref import moe as _ref_moe

BACKENDS = ("auto", "reference", "cutedsl")


@dataclasses.dataclass(frozen=True)
class Op:
    reference: Callable
    #: arch ("sm_90a", "sm_100a") -> "module:function" of the kernel's JAX function
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)


TABLE: dict[str, Op] = {
    "quantize_nvfp4": Op(_ref_gemm.quantize_nvfp4, kernels={"sm_90a": "nvfp4jax.kernels.quantize:quantize_nvfp4"}),
    "nvfp4_gemm": Op(_ref_gemm.nvfp4_gemm, kernels={"sm_90a": "nvfp4jax.kernels.gemm:nvfp4_gemm"}),
    "moe_experts": Op(_ref_moe.moe_experts),
}


def register_kernel(op: str, arch: str, target: str) -> None:
    """Register ``module:function`` as the kernel of ``op`` on ``arch`` (done in this file's table)."""
    TABLE[op] = dataclasses.replace(TABLE[op], kernels={**TABLE[op].kernels, arch: target})


@functools.cache
def gpu_arch() -> str | None:
    """``sm_90a`` / ``sm_100a`` for the first GPU, or None without one."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0])
    return {9: "sm_90a", 10: "sm_100a"}.get(major)


@functools.cache
def _cutedsl_available() -> bool:
    try:
        importlib.import_module("cutlass.jax")
    except Exception:  # noqa: BLE001 — any import failure means no kernels
        return False
    return True


def backend() -> str:
    """The backend in force: ``reference`` or ``cutedsl`` (resolving ``auto``)."""
    choice = os.environ.get("NVFP4JAX_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"NVFP4JAX_BACKEND={choice!r}; choose one of {BACKENDS}")
    can = gpu_arch() is not None and _cutedsl_available()
    if choice == "cutedsl" and not can:
        raise RuntimeError(
            f"NVFP4JAX_BACKEND=cutedsl but kernels cannot run here (GPU arch {gpu_arch()}, "
            f"CuTeDSL importable: {_cutedsl_available()})"
        )
    return "cutedsl" if choice == "cutedsl" or (choice == "auto" and can) else "reference"


def implementation(name: str) -> Callable:
    """The function that runs op ``name`` under the current backend."""
    op = TABLE[name]
    if backend() == "reference":
        return op.reference
    target = op.kernels.get(gpu_arch())
    if target is None:
        if os.environ.get("NVFP4JAX_BACKEND") == "cutedsl":
            raise RuntimeError(f"op {name!r} has no {gpu_arch()} kernel")
        return op.reference
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def quantize_nvfp4(x, norm_weight=None, eps: float = 1e-6):
    return implementation("quantize_nvfp4")(x, norm_weight, eps)


def nvfp4_gemm(x, w, out_dtype=None):
    import jax.numpy as jnp

    return implementation("nvfp4_gemm")(x, w, jnp.bfloat16 if out_dtype is None else out_dtype)


def moe_experts(x, weights, expert_ids, w1, w3, w2, *, swiglu_limit: float, quantize_activations: bool):
    # expert parallelism (issue 8): under `jax.set_mesh(mesh)` with an `expert` axis > 1 the op runs
    # split over that axis with all-to-all dispatch (nvfp4jax/model/moe_ep.py); otherwise it is the op itself
    from nvfp4jax.model.moe_ep import moe_experts_in_context

    return moe_experts_in_context(implementation("moe_experts"), x, weights, expert_ids, w1, w3, w2,
                                  swiglu_limit=swiglu_limit, quantize_activations=quantize_activations)

"""The one dispatch table: op name -> CuTeDSL kernel (by GPU arch) or pure-JAX reference.

``NVFP4JAX_BACKEND`` = ``auto`` (default: kernels on an sm_90/sm_100 GPU when CuTeDSL imports,
otherwise the reference), ``reference`` or ``cutedsl`` (an error where kernels cannot run; never a
silent fallback). Kernel modules are imported lazily, on first use, so importing nvfp4jax never
compiles or registers anything. The model calls ops only through this module.

Per-call shape support: a kernel may come with a ``supports`` function (``"module:function"``,
registered beside it by arch) that takes the op's array arguments and returns ``None`` when it can
run them, else the reason (naming the offending shape). Shapes are static under ``jax.jit``, so
this is a trace-time decision per call site:

* ``auto``: an unsupported call runs the reference instead (e.g. the tiny preset's 64-wide
  linears, below the GEMM kernel's ``n % 64``, ``k % 128`` tiles). Each fallback is logged once
  per (op, argument shapes) as a warning on the ``nvfp4jax.ops`` logger and recorded in
  :func:`fallbacks`, so it is never silent.
* ``cutedsl``: an unsupported call raises ``ValueError`` with the kernel's reason.
* ``reference``: the check is not made.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
from collections.abc import Callable

import jax

from nvfp4jax.ref import gemm as _ref_gemm
from nvfp4jax.ref import moe as _ref_moe

BACKENDS = ("auto", "reference", "cutedsl")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Op:
    reference: Callable
    #: arch ("sm_90a", "sm_100a") -> "module:function" of the kernel's JAX function
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    #: arch -> "module:function" of ``supports(*array_args) -> str | None`` (None: the kernel runs
    #: them; else the reason). An arch without an entry runs every call on its kernel.
    supports: dict[str, str] = dataclasses.field(default_factory=dict)


TABLE: dict[str, Op] = {
    "quantize_nvfp4": Op(_ref_gemm.quantize_nvfp4, kernels={"sm_90a": "nvfp4jax.kernels.quantize:quantize_nvfp4"},
                         supports={"sm_90a": "nvfp4jax.kernels.quantize:supports"}),
    "nvfp4_gemm": Op(_ref_gemm.nvfp4_gemm, kernels={"sm_90a": "nvfp4jax.kernels.gemm:nvfp4_gemm"},
                     supports={"sm_90a": "nvfp4jax.kernels.gemm:supports"}),
    "nvfp4_linear": Op(_ref_gemm.nvfp4_linear, kernels={"sm_90a": "nvfp4jax.kernels.gemm:nvfp4_linear"},
                       supports={"sm_90a": "nvfp4jax.kernels.gemm:linear_supports"}),
    "moe_experts": Op(_ref_moe.moe_experts, kernels={"sm_90a": "nvfp4jax.kernels.moe:moe_experts"},
                      supports={"sm_90a": "nvfp4jax.kernels.moe:supports"}),
}

#: (op, argument shapes) -> reason, for every call that fell back to the reference under ``auto``
_FALLBACKS: dict[tuple, str] = {}


def register_kernel(op: str, arch: str, target: str, supports: str | None = None) -> None:
    """Register ``module:function`` as the kernel of ``op`` on ``arch`` (done in this file's table),
    with an optional ``module:function`` shape check (see the module docstring)."""
    extra = {arch: supports} if supports is not None else {}
    TABLE[op] = dataclasses.replace(
        TABLE[op], kernels={**TABLE[op].kernels, arch: target}, supports={**TABLE[op].supports, **extra}
    )


def fallbacks() -> dict[tuple, str]:
    """Every (op, argument shapes) that ran the reference under ``auto`` for lack of kernel support,
    with the kernel's reason."""
    return dict(_FALLBACKS)


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


def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def _shapes(args: tuple) -> tuple:
    """A hashable description of the arguments' shapes and dtypes (pytree leaves; None kept)."""
    leaves = jax.tree.leaves(args, is_leaf=lambda a: a is None)
    return tuple(None if a is None else (tuple(a.shape), str(a.dtype)) for a in leaves)


def implementation(name: str, *args) -> Callable:
    """The function that runs op ``name`` under the current backend.

    ``args`` are the op's array arguments (those its kernel's ``supports`` check takes); with them,
    an unsupported call falls back to the reference under ``auto`` (logged) and raises
    ``ValueError`` under ``cutedsl``. Without them the answer is the op's kernel, unchecked.
    """
    op = TABLE[name]
    if backend() == "reference":
        return op.reference
    arch = gpu_arch()
    target = op.kernels.get(arch)
    if target is None:
        if os.environ.get("NVFP4JAX_BACKEND") == "cutedsl":
            raise RuntimeError(f"op {name!r} has no {arch} kernel")
        return op.reference
    if args and arch in op.supports:
        reason = _resolve(op.supports[arch])(*args)
        if reason is not None:
            if os.environ.get("NVFP4JAX_BACKEND") == "cutedsl":
                raise ValueError(f"op {name!r}: the {arch} kernel cannot run this call: {reason} "
                                 "(NVFP4JAX_BACKEND=cutedsl; auto would run the reference)")
            key = (name, _shapes(args))
            if key not in _FALLBACKS:
                _FALLBACKS[key] = reason
                _log.warning("nvfp4jax: op %r runs the reference, not the %s kernel: %s", name, arch, reason)
            return op.reference
    return _resolve(target)


def quantize_nvfp4(x, norm_weight=None, eps: float = 1e-6):
    return implementation("quantize_nvfp4", x, norm_weight)(x, norm_weight, eps)


def nvfp4_gemm(x, w, out_dtype=None):
    import jax.numpy as jnp

    return implementation("nvfp4_gemm", x, w)(x, w, jnp.bfloat16 if out_dtype is None else out_dtype)


def nvfp4_linear(x, w, out_dtype=None):
    """Recipe ``nvfp4``'s linear, ``nvfp4_gemm(quantize_nvfp4(x), w)``, as one op: the kernels choose how
    X travels between the two (decoded, for the warp-specialized prefill GEMM)."""
    import jax.numpy as jnp

    return implementation("nvfp4_linear", x, w)(x, w, jnp.bfloat16 if out_dtype is None else out_dtype)


def moe_experts(x, weights, expert_ids, w1, w3, w2, *, swiglu_limit: float, quantize_activations: bool):
    # expert parallelism (issue 8): under `jax.set_mesh(mesh)` with an `expert` axis > 1 the op runs
    # split over that axis with all-to-all dispatch (nvfp4jax/model/moe_ep.py); otherwise it is the op itself
    from nvfp4jax.model.moe_ep import moe_experts_in_context

    return moe_experts_in_context(implementation("moe_experts", x, weights, expert_ids, w1, w3, w2), x, weights, expert_ids, w1, w3, w2,
                                  swiglu_limit=swiglu_limit, quantize_activations=quantize_activations)


def weight_layout() -> str:
    """The NVFP4 weight layout the backend in force reads fastest: ``tiled`` (the kernels' tile
    layout, ``formats.nvfp4.tile_weight``) under ``cutedsl``, ``rows`` under the reference. Either
    layout gives the same results on either backend; the wrong one costs a rearrangement per call."""
    return "tiled" if backend() == "cutedsl" else "rows"


def prepare_weights(tree, layout: str | None = None):
    """``tree`` (a model, a layer, any pytree) with its NVFP4 weights in ``layout`` (default
    :func:`weight_layout`). The model loaders do this as they read each weight; call it on a model
    built by hand. Weights the tile layout does not fit, and per-row (activation) tensors, are kept."""
    from nvfp4jax.formats import nvfp4 as fmt

    layout = weight_layout() if layout is None else layout
    if layout not in fmt.LAYOUTS:  # also for a tree without NVFP4 leaves
        raise ValueError(f"unknown NVFP4 layout {layout!r}; one of {fmt.LAYOUTS}")
    return jax.tree.map(lambda t: fmt.to_layout(t, layout) if isinstance(t, fmt.NVFP4Tensor) else t, tree,
                        is_leaf=lambda t: isinstance(t, fmt.NVFP4Tensor))

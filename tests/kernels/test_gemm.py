"""NVFP4 GEMM kernel vs nvfp4jax.ref: cosine gate and the two-reference rule, every V4 linear shape.

``NVFP4JAX_GPU_TESTS=quick`` runs a reduced matrix (every shape at two m values, a few prefills).
"""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax import ops
from nvfp4jax.formats.nvfp4 import quantize, tile_weight
from nvfp4jax.ref import gemm as ref
from tests.conftest import assert_bitwise_equal
from tests.kernels._gpu import (
    FLASH_LINEARS,
    M_VALUES,
    PRO_LINEARS,
    activations,
    fresh_jit,
    poison_device_memory,
)

pytestmark = pytest.mark.gpu
cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import gemm as kg

_quantize_w = jax.jit(lambda w: quantize(w))
_ref_gemm = jax.jit(ref.nvfp4_gemm)
_kernel_gemm = jax.jit(kg.nvfp4_gemm)


@jax.jit
def _oracle(x, w):
    """float32 oracle of the same quantized math, without the BF16 output rounding."""
    if isinstance(x, type(w)):
        xd, gx = ref._dequant_unscaled(x), x.global_scale[:, None]
    else:
        xd, gx = x.astype(jnp.float32), jnp.float32(1.0)
    acc = jnp.dot(xd, ref._dequant_unscaled(w).T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return acc * gx * w.global_scale


def _weights(rng, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    return _quantize_w(jnp.asarray(w))


@jax.jit
def _metrics(got, want, oracle):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    dot = jnp.sum(got * want)
    cos = dot / jnp.maximum(jnp.sqrt(jnp.sum(got * got)) * jnp.sqrt(jnp.sum(want * want)), 1e-30)
    err_k = jnp.sqrt(jnp.mean((got - oracle) ** 2))
    err_r = jnp.sqrt(jnp.mean((want - oracle) ** 2))
    return jnp.all(jnp.isfinite(got)), 1 - cos, err_k, err_r, 1e-6 * jnp.sqrt(jnp.mean(oracle**2))


def _check(x, w, case, kernel=_kernel_gemm):
    """The kernel on ``w`` in the tile layout (as a loaded model holds it) vs the reference on row-major ``w``."""
    wt = tile_weight(w) if w.shape[0] % 64 == 0 and w.shape[1] % 128 == 0 else w
    poison_device_memory()
    got = kernel(x, wt)
    finite, cos_diff, err_k, err_r, floor = (float(v) for v in _metrics(got, _ref_gemm(x, w), _oracle(x, w)))
    assert finite, f"{case}: non-finite output (unwritten element?)"
    assert cos_diff < 1e-5, f"{case} 1-cos={cos_diff:.3e}"
    assert err_k <= 2 * err_r + floor, f"{case} kernel rms err {err_k:.3e} > 2 x ref {err_r:.3e} + {floor:.3e}"


#: W4A4: every V4 linear at decode sizes (one and several 16-token tiles, the 64-token tile and one
#: past it), odd m and a full prefill (the 128 x 128 tiles); W4A16 the same without the odd m
FLASH_M = M_VALUES
PRO_M = (1, 16, 64, 65, 200, 4096)
W4A16_M = (1, 16, 64, 65, 4096)
SHAPES = [(f"flash.{name}", n, k) for name, n, k in FLASH_LINEARS] + [(f"pro.{name}", n, k) for name, n, k in PRO_LINEARS]
CASES = [(name, n, k, m) for name, n, k in SHAPES for m in (FLASH_M if name.startswith("flash") else PRO_M)]
W4A16_CASES = [(name, n, k, m) for name, n, k in SHAPES for m in W4A16_M]
if os.environ.get("NVFP4JAX_GPU_TESTS") == "quick":
    # a device-time-limited pass (~1-2 min on an H100): every shape at one decode and one larger m,
    # a few prefills, W4A16 at each tile kind
    CASES = [c for c in CASES if c[3] in ((1, 65) if c[0].startswith("flash") else (1, 200))]
    CASES += [("flash.wq_a", 1024, 4096, 4096), ("flash.mtp.e_proj/h_proj", 4096, 4096, 4096)]
    W4A16_CASES = [("flash.wq_a", 1024, 4096, 1), ("flash.wq_a", 1024, 4096, 4096), ("flash.shared.w2", 4096, 2048, 65),
                   ("flash.wkv", 512, 4096, 16), ("pro.wo_b", 7168, 16384, 1), ("pro.shared.w1/w3", 3072, 7168, 64)]


@pytest.mark.parametrize("name,n,k,m", CASES)
def test_gemm_w4a4(rng, name, n, k, m):
    w = _weights(rng, n, k)
    x = ref.quantize_nvfp4(activations(rng, m, k))
    _check(x, w, f"W4A4 {name} {m=} {n=} {k=}")


@pytest.mark.parametrize("name,n,k,m", W4A16_CASES)
def test_gemm_w4a16(rng, name, n, k, m):
    w = _weights(rng, n, k)
    x = activations(rng, m, k)
    _check(x, w, f"W4A16 {name} {m=} {n=} {k=}")


@pytest.mark.parametrize("n,k,m,act_nvfp4,prefetch", [
    (128, 1024, 3, True, 1), (128, 1024, 1, False, 1), (4096, 4096, 1, False, 1), (1024, 4096, 16, True, 1),
    (1536, 7168, 64, True, 1), (512, 4096, 37, False, 1), (32768, 1024, 1, False, 2), (1024, 4096, 5, True, 3)])
@pytest.mark.parametrize("w_regs", ["1", "0"])
def test_gemm_decode_paths(rng, monkeypatch, n, k, m, act_nvfp4, prefetch, w_regs):
    """Both decode-tile paths with ``NVFP4JAX_GEMM_PREFETCH`` buffers: W decoded into wgmma's A registers
    (the default; K permuted inside a tile) and, with ``NVFP4JAX_GEMM_W_REGS=0``, through BF16 shared-memory
    stages (the other cases run the default)."""
    monkeypatch.setenv(kg.W_REGS_ENV, w_regs)
    monkeypatch.setenv(kg.PREFETCH_ENV, str(prefetch))
    cfg = kg.choose_config(m, n, k, act_nvfp4)
    assert cfg.w_regs == (w_regs == "1") and cfg.prefetch == prefetch, cfg
    w = _weights(rng, n, k)
    x = activations(rng, m, k)
    x = ref.quantize_nvfp4(x) if act_nvfp4 else x
    _check(x, w, f"w_regs={w_regs} {m=} {n=} {k=} {act_nvfp4=}", fresh_jit(kg.nvfp4_gemm))


@pytest.mark.parametrize("n,k,m,split,act_nvfp4", [(512, 7168, 1, 7, False), (512, 7168, 16, 14, True),
                                                     (1536, 7168, 1, 28, True), (1536, 7168, 3, 56, False)])
def test_gemm_decode_split_not_a_power_of_two(rng, monkeypatch, n, k, m, split, act_nvfp4):
    """A decode K split that is not a power of two (``choose_config`` only doubles it, so V4-Pro's k = 7168, 56 K
    tiles of 128, stops at 8: Pro wkv gets 64 CTAs, wq_a 192), forced as ``benchmarks/gemm_tune.py`` does:
    the kernel's limit is only ``k % (tile_k * split) == 0``; these are the configs ``tune-split`` times."""
    cfg = dataclasses.replace(kg.choose_config(m, n, k, act_nvfp4), split=split)
    assert cfg.tile_k == 128 and cfg.w_regs and kg.GemmNvfp4Sm90.can_implement(cfg), cfg
    monkeypatch.setattr(kg, "choose_config", lambda *a, **kw: cfg)
    w = _weights(rng, n, k)
    x = activations(rng, m, k)
    x = ref.quantize_nvfp4(x) if act_nvfp4 else x
    _check(x, w, f"split={split} {m=} {n=} {k=} {act_nvfp4=}", fresh_jit(kg.nvfp4_gemm))


def test_gemm_small_case(rng):
    """The case run under compute-sanitizer memcheck (odd m, one N tile, K split); a row-major weight
    (rearranged inside the call) gives the same bits as the tiled one."""
    w = _weights(rng, 128, 1024)
    for x in (ref.quantize_nvfp4(activations(rng, 3, 1024)), activations(rng, 70, 1024)):
        _check(x, w, "small")
        assert_bitwise_equal(_kernel_gemm(x, w), _kernel_gemm(x, tile_weight(w)))


def test_gemm_rejects_bad_shapes(rng):
    w = _weights(rng, 96, 256)
    with pytest.raises(ValueError, match="n % 64"):
        kg.nvfp4_gemm(jnp.zeros((2, 256), jnp.bfloat16), w)
    w = _weights(rng, 128, 256)
    with pytest.raises(ValueError, match="disagree on k"):
        kg.nvfp4_gemm(jnp.zeros((2, 512), jnp.bfloat16), w)


@pytest.mark.parametrize("n,k", [(64, 128), (128, 256), (96, 256), (64, 64), (64, 192), (32, 128)])
def test_supports_matches_the_kernel(rng, n, k):
    """``kg.supports`` (what ops.py consults) accepts exactly the shapes the kernel runs, correctly."""
    w = _weights(rng, n, k)
    for x in (activations(rng, 5, k), ref.quantize_nvfp4(activations(rng, 5, k))):
        case = f"{n=} {k=} {type(x).__name__}"
        reason = kg.supports(x, w)
        assert (reason is None) == (n % 64 == 0 and k % 128 == 0), f"{case}: {reason}"
        if reason is None:
            _check(x, w, case)
        else:
            with pytest.raises(ValueError, match=re.escape(reason)):
                kg.nvfp4_gemm(x, w)


def test_ops_fall_back_per_shape(rng, monkeypatch):
    """Under ``auto`` an unsupported weight shape runs the reference (same bits), a supported one the
    kernel; under ``cutedsl`` the unsupported one raises."""
    monkeypatch.setattr(ops, "_FALLBACKS", {})
    monkeypatch.setenv("NVFP4JAX_BACKEND", "auto")
    x = activations(rng, 5, 256)
    small, fit = _weights(rng, 96, 256), _weights(rng, 128, 256)
    assert ops.implementation("nvfp4_gemm", x, fit) is kg.nvfp4_gemm
    assert ops.implementation("nvfp4_gemm", x, small) is ref.nvfp4_gemm
    got = jax.jit(lambda a, b: ops.nvfp4_gemm(a, b))(x, small)
    assert_bitwise_equal(got, _ref_gemm(x, small), "auto fallback vs the reference")
    assert [key[0] for key in ops.fallbacks()] == ["nvfp4_gemm"]
    monkeypatch.setenv("NVFP4JAX_BACKEND", "cutedsl")
    with pytest.raises(ValueError, match="nvfp4_gemm"):
        jax.jit(lambda a, b: ops.nvfp4_gemm(a, b) + 0)(x, small)

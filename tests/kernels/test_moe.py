"""MoE kernel (routed experts) vs ``nvfp4jax.ref.moe.moe_experts``: cosine gate and the two-reference rule.

Expert shapes are V4-Flash (dim 4096, inter 2048) and V4-Pro (dim 7168, inter 3072) with fewer
experts (16 and 8) so that the float32 references fit and run quickly; routings come from
``ref.moe.route`` on random router logits (6 distinct experts per token), plus edge cases: experts
with no tokens, every token on expert 0, the degenerate routing with all 6 slots of every token on
expert 0 (one expert gets ``6 x tokens`` rows), one choice per row with zero-weight padding rows
(how the expert-parallel path calls the op), and T = 1.

**The oracle.** The recipe's quantization decisions are part of its definition, so the oracle must
make them too: a float32 computation *without* the NVFP4 round trips would measure the recipe's
quantization error, not the kernel's. The reference, on BF16 ``x``, rounds the GEMM
outputs ``gate``/``up``, the SwiGLU output ``h`` and each expert's ``y`` to BF16 (as the official
model does); the oracle is the same reference fed ``x`` in float32, where those casts become no-ops
and nothing else changes (``x`` converts exactly, so the L1 activation quantization is identical;
the L2 one quantizes the unrounded float32 ``h``). It is the same recipe with exact intermediates:
what the rule asks of the kernel is to be no further from it than twice the reference is.

**The cosine gate** ``1 - cos(kernel, reference) < 1e-4``: the kernel makes the reference's BF16
roundings (gate/up in its epilogue, ``h`` and ``y`` as BF16), so only float32 summation order and
the epilogue's SiLU differ. These flip a BF16 or NVFP4 rounding rarely (a ~1e-7 relative change crosses a
2^-8 BF16 step with probability ~1e-5 per element; a BF16 flip of ``h`` moves its NVFP4 rounding
with probability ~1e-2), so the expected difference is far below 1e-6 (an estimate, not measured).
The gate is not looser because a looser one would accept a kernel that skips the BF16 roundings of
gate/up (the oracle's math): measured on CPU with this file's inputs (Flash shapes), that changes ~1%
of the NVFP4 roundings of ``h`` and lands 3.1e-4 (T = 64) .. 4.8e-4 (T = 3) from the reference in
recipe ``nvfp4`` (in ``nvfp4-w4a16`` it is 5.8e-6 and passes: no quantization follows those roundings).
Bugs injected into a stand-in kernel on CPU gave 1-cos of 6.7e-3 (routing weights ignored), 5.6e-2
(one of the 6 slots dropped) and 2e-4 .. 0.3 (SwiGLU clamp missing): all fail. The reference keeps
its BF16 roundings on the GPU only because ``tests/conftest.py`` turns XLA's excess precision off
(with it on, the GPU reference skipped them and sat ~7e-4 from the kernel, measured on an H100).

``NVFP4JAX_GPU_TESTS=quick`` runs a reduced matrix (Flash at T in {1, 200} in both recipes, Pro at
T = 64, the edge cases in recipe ``nvfp4``).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.formats.nvfp4 import quantize, tile_weight
from nvfp4jax.ref import moe as ref
from tests.kernels._gpu import activations, fresh_jit, poison_device_memory

pytestmark = pytest.mark.gpu
cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import moe as km

TOPK = 6
SWIGLU_LIMIT = 10.0
COS_TOL = 1e-4
#: model -> (experts, dim, inter, routed scale): the real V4 expert shapes, fewer experts
MODELS = {"flash": (16, 4096, 2048, 1.5), "pro": (8, 7168, 3072, 2.5)}
T_VALUES = (1, 3, 64, 200, 1000)
RECIPES = {"nvfp4": True, "w4a16": False}

_STATIC = ("swiglu_limit", "quantize_activations")
_kernel = jax.jit(km.moe_experts, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _reference_and_oracle(x, weights, expert_ids, w1, w3, w2, *, swiglu_limit, quantize_activations):
    """The reference on BF16 ``x`` and the oracle: the reference on float32 ``x`` (module docstring)."""
    kw = {"swiglu_limit": swiglu_limit, "quantize_activations": quantize_activations}
    return (ref.moe_experts(x, weights, expert_ids, w1, w3, w2, **kw),
            ref.moe_experts(x.astype(jnp.float32), weights, expert_ids, w1, w3, w2, **kw))


@functools.partial(jax.jit, static_argnums=1)
def _random_nvfp4_stack(key, shape):
    """``0.02 * normal`` matrices quantized one per expert (global scale per expert, shape ``[experts]``)."""
    return jax.vmap(quantize)(0.02 * jax.random.normal(key, shape, jnp.float32))


@functools.cache
def _experts(model: str):
    """(w1, w3, w2) of ``model``, made once on the device and shared by every case."""
    e, d, inter, _ = MODELS[model]
    keys = jax.random.split(jax.random.key(sum(map(ord, model))), 3)
    return (_random_nvfp4_stack(keys[0], (e, inter, d)), _random_nvfp4_stack(keys[1], (e, inter, d)),
            _random_nvfp4_stack(keys[2], (e, d, inter)))


@jax.jit
def _metrics(got, want, oracle):
    def cos_diff(a, b):
        dot = jnp.sum(a * b)
        return 1 - dot / jnp.maximum(jnp.sqrt(jnp.sum(a * a)) * jnp.sqrt(jnp.sum(b * b)), 1e-30)

    err_k = jnp.sqrt(jnp.mean((got - oracle) ** 2))
    err_r = jnp.sqrt(jnp.mean((want - oracle) ** 2))
    floor = 1e-6 * jnp.sqrt(jnp.mean(oracle**2))
    return jnp.all(jnp.isfinite(got)), cos_diff(got, want), cos_diff(want, oracle), err_k, err_r, floor


def _inputs(rng, model: str, t: int, bias=None):
    """BF16 ``x`` (per-block outliers, zero blocks and a zero row; scaled so that ~1% of gates and ~2%
    of ups reach the clamp at 10) and a routing from random router logits."""
    e, d, _, scale = MODELS[model]
    x = activations(rng, t, d) * jnp.bfloat16(0.25)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    weights, expert_ids = ref.route(logits, TOPK, scale, bias=jnp.zeros(e, jnp.float32) if bias is None else bias)
    return x, weights, expert_ids


@functools.cache
def _tiled_experts(model: str):
    """``_experts(model)`` in the kernels' tile layout, as a loaded model holds them."""
    return tuple(tile_weight(w) for w in _experts(model))


def _check(case: str, model: str, x, weights, expert_ids, quantize_activations: bool, kernel=None,
           tiled=None, ref_ids=None):
    """The kernel on tiled experts vs the reference (and oracle) on the row-major ones. ``tiled``: the
    kernel's banks instead of ``_tiled_experts(model)``, computing as ``_experts(model)`` does with the
    ids ``ref_ids`` (a bank of repeated experts)."""
    kernel = _kernel if kernel is None else kernel
    w1, w3, w2 = _experts(model)
    kw = {"swiglu_limit": SWIGLU_LIMIT, "quantize_activations": quantize_activations}
    want, oracle = _reference_and_oracle(x, weights, expert_ids if ref_ids is None else ref_ids, w1, w3, w2, **kw)
    poison_device_memory()
    got = kernel(x, weights, expert_ids, *(_tiled_experts(model) if tiled is None else tiled), **kw)
    assert got.shape == want.shape and got.dtype == jnp.float32, f"{case}: {got.shape} {got.dtype}"
    finite, cos_k, cos_r, err_k, err_r, floor = (float(v) for v in _metrics(got, want, oracle))
    assert finite, f"{case}: non-finite output (unwritten element?)"
    assert cos_k < COS_TOL, f"{case} 1-cos={cos_k:.3e} (reference vs oracle: {cos_r:.3e})"
    assert err_k <= 2 * err_r + floor, f"{case} kernel rms err {err_k:.3e} > 2 x ref {err_r:.3e} + {floor:.3e}"


CASES = [(m, r, t) for m in MODELS for r in RECIPES for t in T_VALUES]
EDGE_RECIPES = tuple(RECIPES)
if os.environ.get("NVFP4JAX_GPU_TESTS") == "quick":
    CASES = [("flash", r, t) for r in RECIPES for t in (1, 200)] + [("pro", "nvfp4", 64)]
    EDGE_RECIPES = ("nvfp4",)


@pytest.mark.parametrize("model,recipe,t", CASES)
def test_moe_random_routing(rng, model, recipe, t):
    x, weights, expert_ids = _inputs(rng, model, t)
    _check(f"{model} {recipe} {t=}", model, x, weights, expert_ids, RECIPES[recipe])


@pytest.mark.parametrize("w_regs", ["1", "0"])
@pytest.mark.parametrize("recipe,t", [("nvfp4", 1), ("nvfp4", 37), ("w4a16", 8)])
def test_moe_decode_paths(rng, monkeypatch, recipe, t, w_regs):
    """Both grouped GEMMs' decode tiles with W decoded into wgmma's A registers (the default) and,
    with ``NVFP4JAX_GEMM_W_REGS=0``, through BF16 shared-memory stages."""
    from nvfp4jax.kernels import gemm as kg

    monkeypatch.setenv(kg.W_REGS_ENV, w_regs)
    e, d, inter, _ = MODELS["flash"]
    cfg = km.choose_grouped_config(t * TOPK, e, 2 * inter, d, True, gate_up=True, swiglu_limit=10.0)
    assert cfg.w_regs == (w_regs == "1"), cfg
    x, weights, expert_ids = _inputs(rng, "flash", t)
    _check(f"w_regs={w_regs} flash {recipe} {t=}", "flash", x, weights, expert_ids, RECIPES[recipe],
           fresh_jit(km.moe_experts, static_argnames=_STATIC))  # traced afresh: reads the variable


@pytest.mark.parametrize("recipe,t,per_sm,split", [("nvfp4", 128, "4", 1), ("w4a16", 128, "4", 1),
                                                   ("nvfp4", 128, "", 2), ("nvfp4", 40, "", 2)])
def test_moe_l2_tile_w_128(rng, monkeypatch, recipe, t, per_sm, split):
    """``NVFP4JAX_MOE_L2_TILE_W=128`` (session 12; the default from 264 CTAs since session 13, forced here so the
    cases do not depend on that rule): L2's decode tiles with 128 weight rows per CTA;
    T = 128 gives the 16 test experts ~48 rows each (48-token tiles), T = 40 ~15 (16-token tiles); without a
    K split as at V4's expert counts (``NVFP4JAX_MOE_CTAS_PER_SM=4`` here) and with one."""
    monkeypatch.setenv(km.L2_TILE_W_ENV, "128")
    monkeypatch.setenv(km.CTAS_PER_SM_ENV, per_sm)
    e, d, inter, _ = MODELS["flash"]
    cfg = km.choose_grouped_config(t * TOPK, e, d, inter, RECIPES[recipe], gate_up=False, swiglu_limit=10.0)
    assert cfg.tile_w == 128 and cfg.tile_t <= 64 and cfg.split == split, cfg
    x, weights, expert_ids = _inputs(rng, "flash", t)
    _check(f"L2 tile_w 128 flash {recipe} {t=}", "flash", x, weights, expert_ids, RECIPES[recipe],
           fresh_jit(km.moe_experts, static_argnames=_STATIC))  # traced afresh: reads the variable


def _bias(experts: int, value: float, which) -> jax.Array:
    return jnp.zeros(experts, jnp.float32).at[jnp.asarray(which)].set(value)


@pytest.mark.parametrize("recipe", EDGE_RECIPES)
def test_moe_experts_without_tokens(rng, recipe):
    """Experts 3 and 15 (the last) never chosen: their tile-table entries are empty."""
    e = MODELS["flash"][0]
    x, weights, expert_ids = _inputs(rng, "flash", 64, bias=_bias(e, -1e4, [3, e - 1]))
    counts = np.bincount(np.asarray(expert_ids).ravel(), minlength=e)
    assert counts[3] == counts[e - 1] == 0 and counts.sum() == 64 * TOPK
    _check(f"no tokens on experts 3, {e - 1}, {recipe}", "flash", x, weights, expert_ids, RECIPES[recipe])


@pytest.mark.parametrize("recipe", EDGE_RECIPES)
def test_moe_every_token_on_expert_zero(rng, recipe):
    """A bias forces expert 0 into every token's 6 (its weight still comes from the unbiased score)."""
    x, weights, expert_ids = _inputs(rng, "flash", 200, bias=_bias(MODELS["flash"][0], 1e4, [0]))
    assert np.all((np.asarray(expert_ids) == 0).sum(axis=1) == 1)
    _check(f"expert 0 in every token, {recipe}", "flash", x, weights, expert_ids, RECIPES[recipe])


@pytest.mark.parametrize("recipe", EDGE_RECIPES)
def test_moe_one_expert_gets_every_row(rng, recipe):
    """Degenerate input (not a top-k routing): all 6 slots of all 200 tokens on expert 0, 1200 rows."""
    x, weights, expert_ids = _inputs(rng, "flash", 200)
    _check(f"all rows on expert 0, {recipe}", "flash", x, weights, jnp.zeros_like(expert_ids), RECIPES[recipe])


def test_moe_one_choice_per_row_with_padding(rng):
    """``k = 1`` rows with zero-weight, zero padding rows on expert 0, as the expert-parallel path
    (``nvfp4jax/model/moe_ep.py``) calls the op on each rank."""
    e, _, _, scale = MODELS["flash"]
    x, _, _ = _inputs(rng, "flash", 96)
    x = x.at[64:].set(0)
    weights = jnp.where(jnp.arange(96)[:, None] < 64, jnp.float32(scale), jnp.float32(0))
    expert_ids = jnp.where(jnp.arange(96)[:, None] < 64, jnp.asarray(rng.integers(0, e, (96, 1)), jnp.int32), 0)
    _check("k=1 with padding rows", "flash", x, weights, expert_ids, True)

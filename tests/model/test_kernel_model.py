"""The model with its linears on the sm_90a kernels vs the same model on the reference ops (GPU).

Config: the tiny structure widened so every NVFP4 linear meets the GEMM kernel's shape rules
(n % 64, k % 128): hidden 256, q_lora 128, o_lora 64, expert width 128 (routed experts go through
``ops.moe_experts``, on its kernel where that kernel's ``supports`` accepts them). The quantize
kernel is bitwise and the GEMM differs from the reference only in float32 summation order, so the
logits agree to within BF16 rounding; a discrete choice (top-6 experts, indexer top-k) can flip on
a near-tie, hence a cosine gate on the logits rather than equality.

Under ``NVFP4JAX_BACKEND=auto`` the plain tiny preset (hidden 64), whose linears are all below the
GEMM kernel's tiles, runs them on the reference (logged fallbacks) and the activation quantize on
its kernel; a hidden-128 variant mixes both (wq_a and wkv fit the tiles, the rest do not). Their
routed experts (width 32) are below the MoE kernel's tiles too and fall back the same way.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax import ops
from nvfp4jax.config import preset
from nvfp4jax.model import random_model
from nvfp4jax.model.layers import Linear

pytestmark = pytest.mark.gpu
pytest.importorskip("cutlass")

CFG = preset("tiny", hidden_size=256, q_lora_rank=128, o_lora_rank=64, moe_intermediate_size=128)


def _check_logits(got, want, case):
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999, f"{case}: min logit cosine {cos.min():.6f}"
    assert np.abs(got - want).max() / np.abs(want).max() < 0.05, case


@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-w4a16"])
def test_kernel_model_matches_reference_model(recipe, monkeypatch):
    cfg = CFG.replace(recipe=recipe)
    model = random_model(cfg, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 150)))
    monkeypatch.setenv("NVFP4JAX_BACKEND", "reference")
    want = np.asarray(jax.jit(lambda m, i: m(i))(model, ids))
    monkeypatch.setenv("NVFP4JAX_BACKEND", "cutedsl")
    assert ops.implementation("nvfp4_gemm") is not ops.TABLE["nvfp4_gemm"].reference
    got = np.asarray(jax.jit(lambda m, i: m(i) + 0.0)(model, ids))  # a distinct function: traced anew
    _check_logits(got, want, recipe)


def _linear_shapes(model) -> set[tuple[int, int]]:
    """(n, k) of every Linear the forward pass uses (the MTP module's are not used)."""
    leaves = jax.tree.leaves(eqx.tree_at(lambda m: m.mtp, model, None), is_leaf=lambda x: isinstance(x, Linear))
    return {tuple(leaf.weight.shape[-2:]) for leaf in leaves if isinstance(leaf, Linear)}


@pytest.mark.parametrize("hidden", [64, 128])
@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-w4a16"])
def test_auto_falls_back_on_small_linears(recipe, hidden, monkeypatch):
    """``auto`` on the plain tiny preset: linears the GEMM kernel cannot tile run the reference
    (each recorded as a fallback), the others and the quantize run the kernels, logits match."""
    cfg = preset("tiny", recipe=recipe, hidden_size=hidden)
    model = random_model(cfg, 0)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)))
    monkeypatch.setenv("NVFP4JAX_BACKEND", "reference")
    want = np.asarray(jax.jit(lambda m, i: m(i))(model, ids))
    monkeypatch.setenv("NVFP4JAX_BACKEND", "auto")
    monkeypatch.setattr(ops, "_FALLBACKS", {})
    assert ops.backend() == "cutedsl"
    got = np.asarray(jax.jit(lambda m, i: m(i) + 0.0)(model, ids))
    _check_logits(got, want, f"{recipe} hidden {hidden}")
    fallen = {(key[1][-3][0][0], 2 * key[1][-3][0][1]) for key in ops.fallbacks() if key[0] == "nvfp4_gemm"}
    shapes = _linear_shapes(model)
    assert fallen == {(n, k) for n, k in shapes if n % 64 or k % 128}, (fallen, shapes)
    assert {key[0] for key in ops.fallbacks()} == {"nvfp4_gemm", "moe_experts"}, ops.fallbacks()  # quantize ran its kernel
    if hidden == 64:
        assert fallen == shapes
    else:
        assert shapes - fallen == {(64, 128), (128, 128)}

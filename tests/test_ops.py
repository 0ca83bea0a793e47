"""Dispatch (nvfp4jax/ops.py) on CPU: backend choice and the per-shape kernel fallback.

A fake kernel module is registered in ``sys.modules`` and the GPU is faked by patching
``ops.gpu_arch`` / ``ops._cutedsl_available``, so every decision is checked without a GPU. The
fake kernel and the reference give different values, so each test sees which one ran.
"""

import importlib
import logging
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax import ops
from nvfp4jax.formats.nvfp4 import quantize
from nvfp4jax.ref import gemm as ref
from tests.conftest import assert_bitwise_equal

FAKE = "fake_nvfp4jax_kernels"


def _reference(x):
    return x + 1.0


def _kernel(x):
    return x + 2.0


def _supports(x):
    """The fake kernel's rule: rows a multiple of 4."""
    return None if x.shape[0] % 4 == 0 else f"fake kernel needs rows % 4 == 0, got shape {x.shape}"


def _never_called(*args):
    raise AssertionError("supports() must not be consulted here")


@pytest.fixture
def fake_gpu(monkeypatch):
    """An sm_90a GPU with CuTeDSL, a fake kernel module and a table of fake ops; returns the call log."""
    calls = []
    module = types.ModuleType(FAKE)
    module.kernel = _kernel
    module.supports = lambda *args: calls.append(args) or _supports(*args)
    module.never = _never_called
    monkeypatch.setitem(sys.modules, FAKE, module)
    monkeypatch.setattr(ops, "gpu_arch", lambda: "sm_90a")
    monkeypatch.setattr(ops, "_cutedsl_available", lambda: True)
    monkeypatch.setattr(ops, "_FALLBACKS", {})
    monkeypatch.setattr(ops, "TABLE", {
        "checked": ops.Op(_reference, kernels={"sm_90a": f"{FAKE}:kernel"}, supports={"sm_90a": f"{FAKE}:supports"}),
        "unchecked": ops.Op(_reference, kernels={"sm_90a": f"{FAKE}:kernel"}),
        "other_arch": ops.Op(_reference, kernels={"sm_100a": f"{FAKE}:kernel"}, supports={"sm_100a": f"{FAKE}:never"}),
        "no_kernel": ops.Op(_reference),
    })
    monkeypatch.delenv("NVFP4JAX_BACKEND", raising=False)
    return calls


def _run(name, x):
    return np.asarray(jax.jit(lambda a: ops.implementation(name, a)(a))(x))


def _fallback_records(caplog):
    return [r for r in caplog.records if r.name == "nvfp4jax.ops" and r.levelno == logging.WARNING]


def test_auto_runs_the_kernel_on_supported_shapes(fake_gpu, caplog):
    x = jnp.zeros((8, 3), jnp.float32)
    assert ops.implementation("checked", x) is _kernel
    np.testing.assert_array_equal(_run("checked", x), np.full((8, 3), 2.0, np.float32))
    assert fake_gpu and all(args[0].shape == (8, 3) for args in fake_gpu), "supports() saw the arguments"
    assert ops.fallbacks() == {} and not _fallback_records(caplog)


def test_auto_falls_back_per_shape_and_logs_once(fake_gpu, caplog):
    caplog.set_level(logging.WARNING, logger="nvfp4jax.ops")
    small = jnp.zeros((3, 5), jnp.float32)
    np.testing.assert_array_equal(_run("checked", small), np.full((3, 5), 1.0, np.float32))  # the reference
    np.testing.assert_array_equal(_run("checked", small + 0), np.full((3, 5), 1.0, np.float32))  # traced anew
    records = _fallback_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "'checked'" in message and "sm_90a" in message and "rows % 4 == 0, got shape (3, 5)" in message
    key = ("checked", (((3, 5), "float32"),))
    assert ops.fallbacks() == {key: "fake kernel needs rows % 4 == 0, got shape (3, 5)"}
    # another unsupported shape is logged on its own; a supported one is not a fallback
    np.testing.assert_array_equal(_run("checked", jnp.zeros((5, 5), jnp.float32)), np.full((5, 5), 1.0, np.float32))
    np.testing.assert_array_equal(_run("checked", jnp.zeros((4, 5), jnp.float32)), np.full((4, 5), 2.0, np.float32))
    assert len(_fallback_records(caplog)) == 2 and len(ops.fallbacks()) == 2
    assert "shape (5, 5)" in _fallback_records(caplog)[1].getMessage()


def test_cutedsl_raises_the_kernels_reason(fake_gpu, monkeypatch, caplog):
    monkeypatch.setenv("NVFP4JAX_BACKEND", "cutedsl")
    with pytest.raises(ValueError, match=r"'checked'.*rows % 4 == 0, got shape \(3, 5\)"):
        _run("checked", jnp.zeros((3, 5), jnp.float32))
    np.testing.assert_array_equal(_run("checked", jnp.zeros((4, 5), jnp.float32)), np.full((4, 5), 2.0, np.float32))
    assert ops.fallbacks() == {} and not _fallback_records(caplog)


def test_reference_backend_never_consults_the_kernel(fake_gpu, monkeypatch):
    monkeypatch.setenv("NVFP4JAX_BACKEND", "reference")
    np.testing.assert_array_equal(_run("checked", jnp.zeros((4, 5), jnp.float32)), np.full((4, 5), 1.0, np.float32))
    assert fake_gpu == [] and ops.fallbacks() == {}


def test_ops_without_a_check_or_a_kernel(fake_gpu, monkeypatch):
    odd = jnp.zeros((3, 5), jnp.float32)
    assert ops.implementation("unchecked", odd) is _kernel  # no supports entry: every shape on the kernel
    assert ops.implementation("other_arch", odd) is _reference  # no sm_90a kernel: reference, unchecked
    assert ops.implementation("no_kernel", odd) is _reference
    assert ops.implementation("checked") is _kernel  # no arguments: the op's kernel, unchecked
    assert fake_gpu == [] and ops.fallbacks() == {}
    monkeypatch.setenv("NVFP4JAX_BACKEND", "cutedsl")
    with pytest.raises(RuntimeError, match="'no_kernel' has no sm_90a kernel"):
        ops.implementation("no_kernel", odd)


@pytest.mark.parametrize("arch,cutedsl", [(None, True), ("sm_90a", False), (None, False)])
def test_backend_without_kernels(fake_gpu, monkeypatch, arch, cutedsl):
    monkeypatch.setattr(ops, "gpu_arch", lambda: arch)
    monkeypatch.setattr(ops, "_cutedsl_available", lambda: cutedsl)
    assert ops.backend() == "reference"
    assert ops.implementation("checked", jnp.zeros((4, 5), jnp.float32)) is _reference
    monkeypatch.setenv("NVFP4JAX_BACKEND", "cutedsl")
    with pytest.raises(RuntimeError, match="kernels cannot run here"):
        ops.backend()
    monkeypatch.setenv("NVFP4JAX_BACKEND", "gpu")
    with pytest.raises(ValueError, match="NVFP4JAX_BACKEND='gpu'"):
        ops.backend()


def test_register_kernel_with_a_check(fake_gpu):
    ops.register_kernel("no_kernel", "sm_90a", f"{FAKE}:kernel", supports=f"{FAKE}:supports")
    assert ops.implementation("no_kernel", jnp.zeros((4, 1), jnp.float32)) is _kernel
    assert ops.implementation("no_kernel", jnp.zeros((2, 1), jnp.float32)) is _reference
    ops.register_kernel("unchecked", "sm_100a", f"{FAKE}:kernel")
    assert ops.TABLE["unchecked"].supports == {} and set(ops.TABLE["unchecked"].kernels) == {"sm_90a", "sm_100a"}


def test_model_ops_pass_their_arrays_to_the_check(fake_gpu, monkeypatch, rng):
    """``ops.quantize_nvfp4`` / ``ops.nvfp4_gemm`` hand (x, norm_weight) / (x, w) to the check; a
    refused call gives exactly the reference's result."""
    seen = {}

    def refuse(name):
        def supports(*args):
            seen[name] = args
            return "refused"

        return supports

    module = sys.modules[FAKE]
    module.refuse_q, module.refuse_g = refuse("quantize_nvfp4"), refuse("nvfp4_gemm")
    for name, fn in (("quantize_nvfp4", "refuse_q"), ("nvfp4_gemm", "refuse_g")):
        ops.TABLE[name] = ops.Op(getattr(ref, name), kernels={"sm_90a": f"{FAKE}:never"},
                                 supports={"sm_90a": f"{FAKE}:{fn}"})
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    norm = jnp.asarray(1 + 0.1 * rng.standard_normal(64), jnp.bfloat16)
    w = quantize(jnp.asarray(0.02 * rng.standard_normal((32, 64)), jnp.float32))
    xq = ops.quantize_nvfp4(x, norm, 1e-6)
    y = ops.nvfp4_gemm(xq, w)
    assert seen["quantize_nvfp4"][0] is x and seen["quantize_nvfp4"][1] is norm
    assert seen["nvfp4_gemm"][0] is xq and seen["nvfp4_gemm"][1] is w
    want_q = ref.quantize_nvfp4(x, norm, 1e-6)
    for got, want in zip(jax.tree.leaves(xq), jax.tree.leaves(want_q)):
        assert_bitwise_equal(got, want, "fallback quantize")
    assert_bitwise_equal(y, ref.nvfp4_gemm(want_q, w, jnp.bfloat16), "fallback gemm")
    assert {key[0] for key in ops.fallbacks()} == {"quantize_nvfp4", "nvfp4_gemm"}


def test_the_table_names_the_kernel_checks():
    for name, module in (("quantize_nvfp4", "quantize"), ("nvfp4_gemm", "gemm")):
        assert ops.TABLE[name].supports["sm_90a"] == f"nvfp4jax.kernels.{module}:supports"
        assert ops.TABLE[name].kernels["sm_90a"] == f"nvfp4jax.kernels.{module}:{name}"
    assert ops.TABLE["nvfp4_linear"].supports["sm_90a"] == "nvfp4jax.kernels.gemm:linear_supports"
    assert ops.TABLE["nvfp4_linear"].kernels["sm_90a"] == "nvfp4jax.kernels.gemm:nvfp4_linear"


def test_linear_op_is_quantize_then_gemm(fake_gpu, rng):
    """``ops.nvfp4_linear`` (recipe nvfp4's linears) hands (x, w) to its check; refused, it gives exactly
    ``nvfp4_gemm(quantize_nvfp4(x), w)`` of the reference."""
    seen = {}

    def refuse(*args):
        seen["args"] = args
        return "refused"

    sys.modules[FAKE].refuse_l = refuse
    ops.TABLE["nvfp4_linear"] = ops.Op(ref.nvfp4_linear, kernels={"sm_90a": f"{FAKE}:never"},
                                       supports={"sm_90a": f"{FAKE}:refuse_l"})
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    w = quantize(jnp.asarray(0.02 * rng.standard_normal((32, 64)), jnp.float32))
    y = ops.nvfp4_linear(x, w, jnp.float32)
    assert seen["args"][0] is x and seen["args"][1] is w
    assert_bitwise_equal(y, ref.nvfp4_gemm(ref.quantize_nvfp4(x), w, jnp.float32), "fallback linear")
    assert {key[0] for key in ops.fallbacks()} == {"nvfp4_linear"}


def test_linear_kernel_check():
    """The linear's rule is the GEMM's on the quantized X: any float X dtype (a float32 X's quantize
    falls back by itself), the weight's tiles decide."""
    supports = _real_check("nvfp4_linear")
    fit = quantize(jnp.zeros((128, 256), jnp.float32))
    small = quantize(jnp.zeros((64, 64), jnp.float32))
    for dtype in (jnp.bfloat16, jnp.float32):
        assert supports(jnp.zeros((3, 256), dtype), fit) is None
        assert "k % 128" in supports(jnp.zeros((3, 64), dtype), small)
    assert "[m, k]" in supports(jnp.zeros((2, 3, 256), jnp.bfloat16), fit)


def _real_check(op):
    pytest.importorskip("cutlass")
    target = ops.TABLE[op].supports["sm_90a"]
    module = importlib.import_module(target.split(":")[0])
    if not hasattr(module, "supports"):
        pytest.skip(f"{target} is not written yet")
    return ops._resolve(target)


def test_gemm_kernel_check(rng):
    """The real GEMM rule (n % 64, k % 128) decides the V4 shapes and the tiny preset's 64-wide ones."""
    supports = _real_check("nvfp4_gemm")
    for (n, k), ok in {(1024, 4096): True, (512, 7168): True, (64, 128): True, (64, 64): False, (32, 128): False,
                       (96, 256): False}.items():
        w = quantize(jnp.zeros((n, k), jnp.float32))
        for x in (jnp.zeros((3, k), jnp.bfloat16), ref.quantize_nvfp4(jnp.zeros((3, k), jnp.bfloat16))):
            reason = supports(x, w)
            assert (reason is None) == ok, f"{n=} {k=} {type(x).__name__}: {reason}"
            assert ok or str(n if n % 64 else k) in reason, reason
    w = quantize(jnp.zeros((64, 128), jnp.float32))
    assert supports(jnp.zeros((3, 128), jnp.float32), w) is not None, "the kernel takes BF16 or NVFP4 x only"


def test_quantize_kernel_check():
    supports = _real_check("quantize_nvfp4")
    for k in (16, 64, 4096, 7168):
        assert supports(jnp.zeros((3, k), jnp.bfloat16), None) is None, k
        assert supports(jnp.zeros((3, k), jnp.bfloat16), jnp.ones((k,), jnp.bfloat16)) is None, k
    assert supports(jnp.zeros((3, 24), jnp.bfloat16), None) is not None
    assert supports(jnp.zeros((3, 64), jnp.float32), None) is not None, "the kernel takes BF16 x only"
    assert supports(jnp.zeros((3, 64), jnp.bfloat16), jnp.ones((32,), jnp.bfloat16)) is not None

"""Global test strictness and shared helpers.

Strict dtype promotion and rank promotion catch silent upcasts and broadcasting bugs. Seeds come
from a hash of the test's node id, so every test sees its own, reproducible inputs.
"""

import gc
import hashlib
import os

# The references' BF16 roundings (GEMM outputs, SwiGLU output, ...) are part of the recipe. XLA's
# default excess-precision rule may drop an f32 -> bf16 -> f32 convert pair inside one program, and
# on the GPU it does: the reference MoE then skips the BF16 rounding of gate/up/h and lands ~7e-4
# (1 - cos) from the kernel, which makes them (measured on an H100, jax 0.11.2). Tests run without it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_xdist_auto_num_workers(config) -> int:
    """Worker processes for ``-n auto`` (set in addopts): two for the CPU suite, which is mostly XLA
    compiles (single-threaded; CI has 2 cores), none (in-process) when GPU tests are selected, where one
    process must own the device. ``NVFP4JAX_TEST_WORKERS`` overrides."""
    if os.environ.get("NVFP4JAX_TEST_WORKERS"):
        return int(os.environ["NVFP4JAX_TEST_WORKERS"])
    markexpr = config.getoption("markexpr", "") or ""
    if "gpu" in markexpr.replace("not gpu", ""):
        return 0
    return min(2, os.cpu_count() or 1)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: a process runs many modules, and holding
    every module's XLA executables grew the single-process suite to 9.3 GB three quarters of the way
    (CI once died in an XLA compile late in such a run, exit 139; cause unknown)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def seed(request) -> int:
    return int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little")


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_bitwise_equal(actual, expected, what: str = "") -> None:
    """Bitwise equality of two arrays (any dtype), naming the first mismatching coordinate."""
    a, e = np.atleast_1d(np.asarray(actual)), np.atleast_1d(np.asarray(expected))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
    av, ev = a.view(np.uint8).reshape(a.shape + (-1,)), e.view(np.uint8).reshape(e.shape + (-1,))
    bad = np.argwhere(np.any(av != ev, axis=-1))
    assert bad.size == 0, (
        f"{what}: {len(bad)} of {a.size} elements differ; first at {tuple(bad[0])}: "
        f"{a[tuple(bad[0])]!r} != {e[tuple(bad[0])]!r}"
    )

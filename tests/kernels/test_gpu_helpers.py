"""CPU: the GPU tests' helpers behave as those tests assume."""

import os

import jax
import jax.numpy as jnp

from tests.kernels._gpu import fresh_jit


def test_fresh_jit_reads_trace_time_settings(monkeypatch):
    """Tests that switch a kernel path with an ``NVFP4JAX_*`` variable need a fresh trace per setting:
    ``jax.jit(fn)`` shares one trace cache per function (a second wrapper reuses the first trace),
    ``fresh_jit(fn)`` does not."""

    def fn(x):
        return x + (1.0 if os.environ.get("NVFP4JAX_TEST_SETTING") == "a" else 2.0)

    x = jnp.zeros(3)
    monkeypatch.setenv("NVFP4JAX_TEST_SETTING", "a")
    assert float(jax.jit(fn)(x)[0]) == 1.0 and float(fresh_jit(fn)(x)[0]) == 1.0
    monkeypatch.setenv("NVFP4JAX_TEST_SETTING", "b")
    assert float(jax.jit(fn)(x)[0]) == 1.0  # the pitfall: the first trace again
    assert float(fresh_jit(fn)(x)[0]) == 2.0

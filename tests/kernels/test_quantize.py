"""NVFP4 quantize kernel vs nvfp4jax.ref (bitwise without the norm; bounded with the fused norm)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.ref import gemm as ref
from tests.conftest import assert_bitwise_equal
from tests.formats.oracle import nvfp4_oracle
from tests.kernels._gpu import M_VALUES, activations, poison_device_memory

pytestmark = pytest.mark.gpu
cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import quantize as kq  # noqa: E402

K_VALUES = (1024, 1536, 2048, 3072, 4096, 7168, 8192, 16384)


_ref = jax.jit(ref.quantize_nvfp4, static_argnums=2)


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_quantize_bitwise(rng, m, k):
    x = activations(rng, m, k)
    poison_device_memory()
    got = jax.jit(kq.quantize_nvfp4)(x)
    want = _ref(x, None, 1e-6)
    case = f"{m=} {k=}"
    # and against the independent NumPy / ml_dtypes oracle of tests/formats
    codes, scales, gscale = nvfp4_oracle(np.asarray(x, np.float32), per_row=True)
    assert_bitwise_equal(got.global_scale, gscale, f"oracle global {case}")
    assert_bitwise_equal(got.scales, scales, f"oracle scales {case}")
    assert_bitwise_equal(got.values, codes[:, 0::2] | (codes[:, 1::2] << 4), f"oracle values {case}")
    assert_bitwise_equal(got.global_scale, want.global_scale, f"global {case}")
    assert_bitwise_equal(got.scales, want.scales, f"scales {case}")
    assert_bitwise_equal(got.values, want.values, f"values {case}")


@pytest.mark.parametrize("k", (1024, 4096, 7168))
@pytest.mark.parametrize("m", (1, 65, 512))
def test_quantize_fused_rmsnorm(rng, m, k):
    """Fused RMSNorm: only rsqrt.approx and the sum order differ from the reference (see module doc)."""
    x = activations(rng, m, k)
    w = jnp.asarray(1.0 + 0.1 * rng.standard_normal(k), jnp.bfloat16)
    poison_device_memory()
    got = jax.jit(kq.quantize_nvfp4, static_argnums=2)(x, w, 1e-6)
    want = _ref(x, w, 1e-6)
    case = f"{m=} {k=}"
    g, gw = np.asarray(got.global_scale), np.asarray(want.global_scale)
    assert np.all(np.abs(g - gw) <= gw * 2.0**-7), f"global scales differ by more than a BF16 ulp: {case}"
    blocks_differ = np.any(
        np.asarray(got.values).reshape(m, k // 16, 8) != np.asarray(want.values).reshape(m, k // 16, 8), axis=-1
    ) | (np.asarray(got.scales).view(np.uint8) != np.asarray(want.scales).view(np.uint8))
    assert blocks_differ.mean() < 0.01, f"{blocks_differ.mean():.4f} of blocks differ: {case}"
    a = np.asarray(got.dequantize(), np.float64).ravel()
    b = np.asarray(want.dequantize(), np.float64).ravel()
    cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)
    assert 1 - cos < 1e-5, f"{case} 1-cos={1 - cos:.3e}"


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 16"):
        kq.quantize_nvfp4(jnp.zeros((2, 24), jnp.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        kq.quantize_nvfp4(jnp.zeros((2, 32), jnp.float32))

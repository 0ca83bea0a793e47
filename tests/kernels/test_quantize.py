"""NVFP4 quantize kernel vs nvfp4jax.ref (bitwise without the norm; bounded with the fused norm)."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nvfp4jax.formats.nvfp4 import NVFP4Tensor
from nvfp4jax.ref import gemm as ref
from tests.conftest import assert_bitwise_equal
from tests.formats.oracle import nvfp4_oracle
from tests.kernels._gpu import M_VALUES, activations, poison_device_memory

pytestmark = pytest.mark.gpu
cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import quantize as kq

K_VALUES = (1024, 1536, 4096, 7168, 16384)




@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_quantize_bitwise(rng, m, k):
    """Bitwise vs the independent NumPy / ml_dtypes oracle of design §3 (tests/formats/oracle.py).

    Not vs ``nvfp4jax.ref`` run through XLA: on jax 0.11.2 (the GPU machine) XLA turns the
    reference's ``exact_div`` into a reciprocal multiply (global scales 1 ulp off on ~20% of rows,
    seen on GPU and CPU), so that reference is not bit-exact there; the kernel uses ``div.rn``.
    """
    x = activations(rng, m, k)
    poison_device_memory()
    got = jax.jit(kq.quantize_nvfp4)(x)
    case = f"{m=} {k=}"
    codes, scales, gscale = nvfp4_oracle(np.asarray(x, np.float32), per_row=True)
    assert_bitwise_equal(got.global_scale, gscale, f"global {case}")
    assert_bitwise_equal(got.scales, scales, f"scales {case}")
    assert_bitwise_equal(got.values, codes[:, 0::2] | (codes[:, 1::2] << 4), f"values {case}")


def adversarial_rows(k: int) -> np.ndarray:
    """BF16 rows whose values sit exactly on E2M1 midpoints of their blocks' divisors and one BF16 ulp
    above: a row's first value 2688 * 2**j makes the global scale exactly 2**j, a block's first value
    6 s 2**j makes its E4M3 scale exactly s, so ``t s 2**j`` is the quotient ``t`` (a tie) exactly.
    Scales s include E4M3 subnormals; 2**j spans the fast path, the slow path (divisors below 2**-64)
    and, last, a row below MIN_AMAX (global scale 1, all codes 0). Signs alternate, -0.0 included."""
    mids = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    s_list = np.float32([1.0, 1.5, 0.875, 2.0**-7, 224.0, 2.0**-9, 3 * 2.0**-9, 448.0])
    rows = []
    for j in (0, -10, 20, -70, -90, -110):
        row = np.zeros(k, np.float32)
        for b in range(k // 16):
            sc = s_list[b % len(s_list)]
            ties = mids * sc
            up = (ties.astype(ml_dtypes.bfloat16).view(np.uint16) + 1).view(ml_dtypes.bfloat16).astype(np.float32)
            blk = np.concatenate([[6 * sc], ties, up, [-0.0]]).astype(np.float32)
            blk[2::3] *= -1
            row[16 * b:16 * b + 16] = blk * np.float32(2.0**j)
        row[0] = np.float32(2688 * 2.0**j)
        rows.append(row)
    rows.append(np.float32(2.0**-118) * np.resize(np.float32([1, -1, 0.5]), k))  # amax < MIN_AMAX
    x = np.stack(rows)
    assert np.array_equal(x.astype(ml_dtypes.bfloat16).astype(np.float32), x), "not exact in BF16"
    return x


@pytest.mark.parametrize("k", (1024, 7168))
def test_quantize_bitwise_adversarial(k):
    """Exact E2M1 ties and their neighbours on the fast and slow paths, tiny rows: bitwise vs the oracle."""
    x = jnp.asarray(adversarial_rows(k), jnp.bfloat16)
    poison_device_memory()
    got = jax.jit(kq.quantize_nvfp4)(x)
    codes, scales, gscale = nvfp4_oracle(np.asarray(x, np.float32), per_row=True)
    case = f"adversarial {k=}"
    assert_bitwise_equal(got.global_scale, gscale, f"global {case}")
    assert_bitwise_equal(got.scales, scales, f"scales {case}")
    assert_bitwise_equal(got.values, codes[:, 0::2] | (codes[:, 1::2] << 4), f"values {case}")


@pytest.mark.parametrize("m,k", [(1, 1024), (65, 4096), (300, 7168), (4096, 4096)])
def test_quantize_decoded_bitwise(rng, m, k):
    """The decoded quantize (recipe nvfp4's prefill on gemm_ws) writes exactly ``dequant_rows`` of the
    plain kernel's NVFP4 result, and the same scales and global scales; and the adversarial rows' ties."""
    from nvfp4jax.kernels import gemm_ws as kw

    for case, x in ((f"random {m=} {k=}", activations(rng, m, k)),
                    (f"adversarial {k=}", jnp.asarray(adversarial_rows(k), jnp.bfloat16))):
        want = jax.jit(kq.quantize_nvfp4)(x)
        poison_device_memory()
        xd, scales, gscale = jax.jit(kq.quantize_nvfp4_decoded)(x)
        assert_bitwise_equal(xd, jax.jit(kw.dequant_rows)(want), f"decoded values {case}")
        assert_bitwise_equal(scales, want.scales, f"scales {case}")
        assert_bitwise_equal(gscale, want.global_scale, f"global {case}")


@pytest.mark.parametrize("k", (1024, 4096, 7168))
@pytest.mark.parametrize("m", (1, 65, 512))
def test_quantize_fused_rmsnorm(rng, m, k):
    """Fused RMSNorm vs quantize(ref.rms_norm(x)): only rsqrt.approx and the sum order differ."""
    x = activations(rng, m, k)
    w = jnp.asarray(1.0 + 0.1 * rng.standard_normal(k), jnp.bfloat16)
    poison_device_memory()
    got = jax.jit(kq.quantize_nvfp4, static_argnums=2)(x, w, 1e-6)
    normed = np.asarray(jax.jit(ref.rms_norm, static_argnums=2)(x, w, 1e-6), np.float32)
    codes, scales, gscale = nvfp4_oracle(normed, per_row=True)
    want_values = codes[:, 0::2] | (codes[:, 1::2] << 4)
    case = f"{m=} {k=}"
    g = np.asarray(got.global_scale)
    assert np.all(np.abs(g - gscale) <= gscale * 2.0**-7), f"global scales differ by more than a BF16 ulp: {case}"
    blocks_differ = np.any(np.asarray(got.values).reshape(m, k // 16, 8) != want_values.reshape(m, k // 16, 8), axis=-1)
    blocks_differ |= np.asarray(got.scales).view(np.uint8) != scales.view(np.uint8)
    assert blocks_differ.mean() < 0.01, f"{blocks_differ.mean():.4f} of blocks differ: {case}"
    a = np.asarray(got.dequantize(), np.float64).ravel()
    b = (np.asarray(NVFP4Tensor(jnp.asarray(want_values), jnp.asarray(scales), jnp.asarray(gscale)).dequantize(), np.float64)).ravel()
    cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)
    assert 1 - cos < 1e-5, f"{case} 1-cos={1 - cos:.3e}"


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 16"):
        kq.quantize_nvfp4(jnp.zeros((2, 24), jnp.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):  # every refusal is kq.supports' reason, a ValueError
        kq.quantize_nvfp4(jnp.zeros((2, 32), jnp.float32))


@pytest.mark.parametrize("k", (16, 24, 64, 4096))
def test_supports_matches_the_kernel(rng, k):
    """``kq.supports`` (what ops.py consults) accepts exactly what the kernel runs (BF16 x, k % 16 == 0,
    a BF16 [k] norm weight), and what it accepts comes out bitwise right."""
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16)
    cases = [(x, None, k % 16 == 0), (x.astype(jnp.float32), None, False),
             (x, jnp.ones((k + 16,), jnp.bfloat16), False), (x, jnp.ones((k,), jnp.bfloat16), k % 16 == 0)]
    for xi, norm, ok in cases:
        case = f"{k=} x {xi.dtype} norm {None if norm is None else norm.shape}"
        reason = kq.supports(xi, norm)
        assert (reason is None) == ok, f"{case}: {reason}"
        if not ok:
            with pytest.raises(ValueError, match=re.escape(reason)):
                kq.quantize_nvfp4(xi, norm)
        elif norm is None:
            got = jax.jit(kq.quantize_nvfp4)(xi)
            codes, scales, gscale = nvfp4_oracle(np.asarray(xi, np.float32), per_row=True)
            assert_bitwise_equal(got.global_scale, gscale, f"global {case}")
            assert_bitwise_equal(got.scales, scales, f"scales {case}")
            assert_bitwise_equal(got.values, codes[:, 0::2] | (codes[:, 1::2] << 4), f"values {case}")
        else:
            got = jax.jit(kq.quantize_nvfp4)(xi, norm)
            normed = np.asarray(ref.rms_norm(xi, norm, 1e-6), np.float32)
            want = nvfp4_oracle(normed, per_row=True)[2]
            assert np.all(np.abs(np.asarray(got.global_scale) - want) <= want * 2.0**-7), case

"""Hand-derived cases for RoPE, the compressor and the attention visibility rules (spec §3)."""

import jax.numpy as jnp
import numpy as np

from nvfp4jax.config import preset
from nvfp4jax.ref.compressor import compress_full_sequence, pool_windows
from nvfp4jax.ref.rope import apply_rope, rope_frequencies

FLASH = preset("flash")


def test_frequencies_per_layer_type():
    swa = rope_frequencies(FLASH, 0)  # theta 1e4, no YaRN
    np.testing.assert_allclose(swa, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)
    csa = rope_frequencies(FLASH, 2)  # theta 1.6e5 with YaRN, ramp over pairs [15, 25]
    base = 160000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(csa[:15], base[:15], rtol=1e-6)  # ramp 0: unchanged
    np.testing.assert_allclose(csa[25:], base[25:] / 16, rtol=1e-6)  # ramp 1: divided by the factor
    i = 20
    ramp = (i - 15) / 10
    np.testing.assert_allclose(csa[i], base[i] / 16 * ramp + base[i] * (1 - ramp), rtol=1e-6)
    np.testing.assert_array_equal(rope_frequencies(FLASH, 3), csa)  # HCA: same as CSA
    np.testing.assert_array_equal(rope_frequencies(FLASH, 43), swa)  # MTP layer: SWA rope


def test_rope_rotates_interleaved_pairs_of_the_last_channels():
    x = np.zeros((1, 1, 1, 8), np.float32)
    x[..., 4], x[..., 5] = 1.0, 2.0  # pair 0 of the 4 rope channels (last 4 of 8)
    x[..., 0] = 7.0  # a non-rope channel
    freqs = np.array([0.5, 0.25], np.float32)
    y = np.asarray(apply_rope(jnp.asarray(x), jnp.array([[3]]), freqs))
    c, s = np.cos(1.5), np.sin(1.5)
    np.testing.assert_allclose(y[0, 0, 0], [7, 0, 0, 0, c - 2 * s, s + 2 * c, 0, 0], rtol=1e-6, atol=1e-6)
    back = apply_rope(jnp.asarray(y), jnp.array([[3]]), freqs, inverse=True)
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-6)
    same = apply_rope(jnp.asarray(x), jnp.array([[0]]), freqs)  # position 0: identity
    np.testing.assert_array_equal(np.asarray(same), x)


def test_hca_window_pools_with_per_channel_softmax(rng):
    r, d = 128, 3
    kv = rng.standard_normal((1, 2 * r + 5, d)).astype(np.float32)
    gate = rng.standard_normal((1, 2 * r + 5, d)).astype(np.float32)
    ape = rng.standard_normal((r, d)).astype(np.float32)
    out = np.asarray(compress_full_sequence(jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(ape), overlap=False))
    assert out.shape == (1, 2, d), "only complete windows emit entries"
    for j in range(2):
        for c in range(d):
            g = gate[0, r * j : r * j + r, c] + ape[:, c]
            w = np.exp(g - g.max()) / np.exp(g - g.max()).sum()
            np.testing.assert_allclose(out[0, j, c], (w * kv[0, r * j : r * j + r, c]).sum(), rtol=1e-5)


def test_csa_overlap_mixes_previous_a_half_and_current_b_half(rng):
    r, d = 4, 2
    s = 3 * r + 2
    kv = rng.standard_normal((1, s, 2 * d)).astype(np.float32)
    gate = rng.standard_normal((1, s, 2 * d)).astype(np.float32)
    ape = rng.standard_normal((r, 2 * d)).astype(np.float32)
    out = np.asarray(compress_full_sequence(jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(ape), overlap=True))
    assert out.shape == (1, 3, d)
    g = gate[0] + np.tile(ape, (s // r + 1, 1))[:s]
    for j in range(3):
        for c in range(d):
            slots_kv = list(kv[0, r * j : r * j + r, d + c])  # B half of window j
            slots_g = list(g[r * j : r * j + r, d + c])
            if j > 0:  # A half of window j-1
                slots_kv += list(kv[0, r * (j - 1) : r * j, c])
                slots_g += list(g[r * (j - 1) : r * j, c])
            slots_g = np.array(slots_g)
            w = np.exp(slots_g - slots_g.max())
            np.testing.assert_allclose(out[0, j, c], (w / w.sum() * np.array(slots_kv)).sum(), rtol=1e-5)


def test_csa_token_reaches_only_its_window_and_the_next(rng):
    r, d, s = 4, 2, 16
    kv = rng.standard_normal((1, s, 2 * d)).astype(np.float32)
    gate = rng.standard_normal((1, s, 2 * d)).astype(np.float32)
    ape = np.zeros((r, 2 * d), np.float32)
    base = np.asarray(compress_full_sequence(jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(ape), overlap=True))
    kv2 = kv.copy()
    kv2[0, 5] += 10.0  # token 5 lives in window 1
    moved = np.asarray(compress_full_sequence(jnp.asarray(kv2), jnp.asarray(gate), jnp.asarray(ape), overlap=True))
    changed = np.abs(moved - base).max(axis=-1)[0] > 1e-6
    assert changed.tolist() == [False, True, True, False]


def test_pool_windows_uses_a_carry_for_window_minus_one(rng):
    r, d = 4, 2
    kv = rng.standard_normal((1, 2, r, 2 * d)).astype(np.float32)
    gate = rng.standard_normal((1, 2, r, 2 * d)).astype(np.float32)
    ape = np.zeros((r, 2 * d), np.float32)
    full = np.asarray(pool_windows(jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(ape), overlap=True))
    tail = np.asarray(pool_windows(jnp.asarray(kv[:, 1:]), jnp.asarray(gate[:, 1:]), jnp.asarray(ape), overlap=True,
                                   prev_kv=jnp.asarray(kv[:, 0, :, :d]), prev_gate=jnp.asarray(gate[:, 0, :, :d])))
    np.testing.assert_allclose(tail[:, 0], full[:, 1], rtol=1e-6)

"""Hand-derived cases for attention with sink, indexer selection, mHC and routing (spec §2-§4)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nvfp4jax.ref import attention as attn
from nvfp4jax.ref.indexer import indexer_scores, select_topk
from nvfp4jax.ref.mhc import hc_head, hc_post, hc_pre, sinkhorn
from nvfp4jax.ref.moe import route, swiglu
from nvfp4jax.ref.quant_sim import fp4_simulate, fp8_simulate, hadamard, hadamard_matrix


def test_window_is_128_keys_including_the_query():
    p = jnp.arange(300)
    m = np.asarray(attn.window_mask(p, p, 128))
    assert m[200].sum() == 128 and m[200, 200] and m[200, 73] and not m[200, 72] and not m[200, 201]
    assert m[5].sum() == 6


def test_sink_only_in_the_denominator(rng):
    q = rng.standard_normal((1, 1, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 4)).astype(np.float32)
    mask = np.array([[[True, True, False]]])
    sink = np.array([0.7, -50.0], np.float32)
    out = np.asarray(attn.sink_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(mask), jnp.asarray(sink), 0.5))
    for h in range(2):
        s = q[0, 0, h] @ k[0, :2].T * 0.5
        e = np.exp(s)
        want = (e[:, None] * k[0, :2]).sum(0) / (e.sum() + np.exp(sink[h]))
        np.testing.assert_allclose(out[0, 0, h], want, rtol=1e-5)
    # identical keys: the output is the key scaled by sum(e) / (sum(e) + e^sink) < 1
    same = np.broadcast_to(k[:, :1], k.shape).copy()
    out = np.asarray(attn.sink_attention(jnp.asarray(q), jnp.asarray(same), jnp.asarray(mask), jnp.asarray(sink), 0.5))
    e = np.exp(q[0, 0, 0] @ same[0, 0] * 0.5) * 2
    np.testing.assert_allclose(out[0, 0, 0], same[0, 0] * e / (e + np.exp(sink[0])), rtol=1e-5)
    np.testing.assert_allclose(out[0, 0, 1], same[0, 0], rtol=1e-5)  # sink -50: no effect


def test_indexer_selects_top_visible_entries_ties_to_lower_index():
    scores = jnp.asarray(np.array([[[5.0, 1.0, 5.0, 9.0, 7.0]]] * 1, np.float32).repeat(3, axis=1))
    positions = jnp.array([[3, 11, 19]])  # visible entries: 1, 3, 5 (ratio 4)
    sel = np.asarray(select_topk(scores, positions, 4, 2))
    assert sel.tolist() == [[[0, -1], [0, 2], [3, 4]]]
    tie = np.asarray(select_topk(jnp.zeros((1, 1, 5)), jnp.array([[19]]), 4, 3))
    assert tie.tolist() == [[[0, 1, 2]]]


def test_indexer_scores_relu_then_head_weights(rng):
    q = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 2, 4)).astype(np.float32)
    w = rng.standard_normal((1, 1, 3)).astype(np.float32)
    got = np.asarray(indexer_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)))
    want = np.einsum("h,hj->j", w[0, 0], np.maximum(q[0, 0] @ k[0].T, 0))
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-5)


def test_sinkhorn_is_doubly_stochastic(rng):
    c = np.asarray(sinkhorn(jnp.asarray(rng.standard_normal((5, 4, 4)).astype(np.float32)), 20, 1e-6))
    np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)  # columns are normalised last
    np.testing.assert_allclose(c.sum(-1), 1.0, atol=1e-3)  # rows converge
    assert np.all(c > 0)


def test_hc_pre_post_head_by_hand(rng):
    n, d = 4, 8
    x = rng.standard_normal((2, n, d)).astype(np.float32)
    fn = rng.standard_normal((24, n * d)).astype(np.float32) * 0.1
    base = rng.standard_normal(24).astype(np.float32)
    scale = np.array([0.5, 0.7, 0.9], np.float32)
    u, post, comb = (np.asarray(a) for a in hc_pre(jnp.asarray(x), jnp.asarray(fn), jnp.asarray(scale), jnp.asarray(base),
                                                    norm_eps=1e-6, hc_eps=1e-6, iters=20))
    z = x.reshape(2, -1)
    m = (z @ fn.T) / np.sqrt((z**2).mean(-1, keepdims=True) + 1e-6)
    pre = 1 / (1 + np.exp(-(m[:, :4] * 0.5 + base[:4]))) + 1e-6
    np.testing.assert_allclose(post, 2 / (1 + np.exp(-(m[:, 4:8] * 0.7 + base[4:8]))), rtol=1e-5)
    np.testing.assert_allclose(u, np.einsum("bj,bjd->bd", pre, x), rtol=1e-5)
    a = rng.standard_normal((2, d)).astype(np.float32)
    out = np.asarray(hc_post(jnp.asarray(a), jnp.asarray(x), jnp.asarray(post), jnp.asarray(comb)))
    for k in range(n):  # residual mix uses comb transposed: sum over the FIRST index
        want = post[:, k, None] * a + np.einsum("bj,bjd->bd", comb[:, :, k], x)
        np.testing.assert_allclose(out[:, k], want, rtol=1e-5, atol=1e-6)
    hf, hb = fn[:4], base[:4]
    y = np.asarray(hc_head(jnp.asarray(x), jnp.asarray(hf), jnp.asarray(scale[:1]), jnp.asarray(hb), norm_eps=1e-6, hc_eps=1e-6))
    w = 1 / (1 + np.exp(-(m[:, :4] * 0.5 + hb))) + 1e-6
    np.testing.assert_allclose(y, np.einsum("bj,bjd->bd", w, x), rtol=1e-5)


def test_routing_weights_sum_to_the_routed_scale_and_bias_only_selects(rng):
    logits = rng.standard_normal((7, 16)).astype(np.float32)
    bias = np.zeros(16, np.float32)
    bias[3] = 100.0  # forces expert 3 into every selection, but must not change its weight
    w, idx = (np.asarray(a) for a in route(jnp.asarray(logits), 6, 1.5, bias=jnp.asarray(bias)))
    np.testing.assert_allclose(w.sum(-1), 1.5, rtol=1e-6)
    assert np.all((idx == 3).any(-1))
    s = np.sqrt(np.log1p(np.exp(logits)))
    np.testing.assert_allclose(w, np.take_along_axis(s, idx, -1) / np.take_along_axis(s, idx, -1).sum(-1, keepdims=True) * 1.5, rtol=1e-5)
    hashed = rng.integers(0, 16, (7, 6))
    w2, idx2 = route(jnp.asarray(logits), 6, 2.5, hash_experts=jnp.asarray(hashed))
    np.testing.assert_array_equal(np.asarray(idx2), hashed)
    np.testing.assert_allclose(np.asarray(w2).sum(-1), 2.5, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        route(jnp.asarray(logits), 6, 1.5)


def test_routing_ties_go_to_the_lower_expert():
    w, idx = route(jnp.zeros((1, 8)), 3, 1.0, bias=jnp.zeros(8))
    assert np.asarray(idx).tolist() == [[0, 1, 2]]


def test_swiglu_clamps_gate_above_and_up_both_sides():
    g = jnp.array([20.0, -20.0, 1.0])
    u = jnp.array([30.0, -30.0, -2.0])
    out = np.asarray(swiglu(g, u, 10.0))
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(out, [silu(10.0) * 10, silu(-20.0) * -10, silu(1.0) * -2], rtol=1e-6)


def test_fp8_simulation_matches_the_spec(rng):
    x = (rng.standard_normal((4, 128)) * 10.0 ** rng.integers(-3, 3, (4, 1))).astype(np.float32)
    got = np.asarray(fp8_simulate(jnp.asarray(x), 64))
    b = x.reshape(4, 2, 64)
    s = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(b).max(-1, keepdims=True), 1e-4) / 448))
    want = (np.clip(b / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s).reshape(4, 128)
    np.testing.assert_array_equal(got, want)


def test_fp4_simulation_matches_the_spec(rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    got = np.asarray(fp4_simulate(jnp.asarray(x), 32))
    b = x.reshape(4, 2, 32)
    s = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(b).max(-1, keepdims=True), 6 * 2.0**-126) / 6))
    want = (np.clip(b / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s).reshape(4, 64)
    np.testing.assert_array_equal(got, want)


def test_hadamard_is_orthonormal_sylvester(rng):
    h = hadamard_matrix(8)
    assert h[1].tolist() == [1, -1, 1, -1, 1, -1, 1, -1]
    np.testing.assert_allclose(h @ h.T, 8 * np.eye(8))
    x = rng.standard_normal((3, 128)).astype(np.float32)
    y = np.asarray(hadamard(jnp.asarray(x)))
    np.testing.assert_allclose((y**2).sum(-1), (x**2).sum(-1), rtol=1e-5)

"""Tests of the HF transformers parity harness (tests/hf_reference.py) on tiny configs.

Besides mapping completeness and determinism, the harness is checked against a float64 numpy
transcription of the spec (``deepseek-v4.md`` §2-§4 and Appendix A, without the QAT simulations that
transformers does not have): if HF, the mapping or the spec reading disagree, the logits do.
"""

import math

import numpy as np
import pytest
import torch

from nvfp4jax.checkpoint.random_weights import random_official_weights
from nvfp4jax.config import DeepSeekV4Config, preset
from tests.hf_reference import hf_generate, hf_greedy, hf_hidden_states, hf_logits, hf_model, hf_state_dict

torch.set_num_threads(2)

#: the parity configuration: tiny, but with 64 indexer heads so that indexer scores are never exactly
#: tied at 0 (with 4 heads, ReLU zeroes all heads of ~1/16 of the entries, and torch.topk breaks
#: those ties differently for different sequence lengths; see docs/hf_vs_spec.md)
PARITY = preset("tiny", index_num_heads=64)
#: V4-Pro's layer pattern (HCA first, no SWA layer in the backbone), 8 heads in 4 output groups
PRO_LIKE = PARITY.replace(num_layers=5, compress_ratios=(128, 128, 4, 128, 4, 0), num_heads=8, o_groups=4,
                          num_hash_layers=3, routed_scaling_factor=2.5)


@pytest.fixture(scope="module")
def tiny():
    cfg = PARITY
    weights = random_official_weights(cfg, seed=1)
    return cfg, weights, hf_model(cfg, weights)


def _ids(cfg: DeepSeekV4Config, rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, cfg.vocab_size, shape).astype(np.int64)


# ---------------------------------------------------------------------------------- the spec in numpy
def _rms(x, w=None, eps=1e-6):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def _inv_freq(cfg: DeepSeekV4Config, layer: int) -> np.ndarray:
    """§3.2: theta 1e4 plain (SWA) or compress theta with the DeepSeek YaRN ramp (CSA/HCA)."""
    rd = cfg.rope_head_dim
    ratio = cfg.compress_ratios[layer]
    theta = cfg.compress_rope_theta if ratio else cfg.rope_theta
    f = theta ** (-np.arange(0, rd, 2, dtype=np.float64) / rd)
    if not ratio:
        return f
    ys = cfg.rope_scaling_dict
    corr = lambda n: rd * math.log(ys["original_max_position_embeddings"] / (n * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = max(math.floor(corr(ys["beta_fast"])), 0), min(math.ceil(corr(ys["beta_slow"])), rd - 1)
    ramp = np.clip((np.arange(rd // 2) - lo) / (hi - lo), 0, 1)
    return f / ys["factor"] * ramp + f * (1 - ramp)


def _rope(x, pos, inv_freq, inverse=False):
    """Interleaved pairs (2i, 2i+1) of the last 2*len(inv_freq) dims; ``pos`` broadcasts over x[..., 0]."""
    ang = np.asarray(pos, dtype=np.float64)[..., None] * inv_freq
    cos, sin = np.cos(ang), (-1 if inverse else 1) * np.sin(ang)
    rd = 2 * inv_freq.shape[0]
    x = x.copy()
    x0, x1 = x[..., -rd::2].copy(), x[..., -rd + 1 :: 2].copy()
    x[..., -rd::2], x[..., -rd + 1 :: 2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return x


def _softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hc_pre(cfg, X, fn, scale, base):
    """§2.2: (u, post, C) from the streams X [S, n, d]."""
    n = cfg.hc_mult
    z = X.reshape(X.shape[0], -1)
    m = (z @ fn.T) / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    sig = lambda v: 1 / (1 + np.exp(-v))
    pre = sig(m[:, :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2 * sig(m[:, n : 2 * n] * scale[1] + base[n : 2 * n])
    C = (m[:, 2 * n :] * scale[2] + base[2 * n :]).reshape(-1, n, n)
    C = _softmax(C, axis=2) + cfg.hc_eps
    C = C / (C.sum(axis=1, keepdims=True) + cfg.hc_eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        C = C / (C.sum(axis=2, keepdims=True) + cfg.hc_eps)
        C = C / (C.sum(axis=1, keepdims=True) + cfg.hc_eps)
    return np.einsum("sj,sjd->sd", pre, X), post, C


def _hc_post(a, R, post, C):
    """§2.3: X_new[k] = post_k a + sum_j C[j, k] R[j]."""
    return post[:, :, None] * a[:, None, :] + np.einsum("sjk,sjd->skd", C, R)


def _compress(w, p, u, ratio, dim, inv_freq):
    """§3.4: entries c_j (normed, roped at position ratio*j) of every complete window."""
    a, g = u @ w[f"{p}.wkv.weight"].T, u @ w[f"{p}.wgate.weight"].T
    M = u.shape[0] // ratio
    if M == 0:
        return np.zeros((0, dim))
    a, g = a[: M * ratio].reshape(M, ratio, -1), g[: M * ratio].reshape(M, ratio, -1) + w[f"{p}.ape"]
    if ratio == 4:  # overlap: window j-1 through its first half, window j through its second half
        pad_a, pad_g = np.zeros((1, ratio, dim)), np.full((1, ratio, dim), -np.inf)
        a = np.concatenate([np.concatenate([pad_a, a[:-1, :, :dim]]), a[:, :, dim:]], axis=1)
        g = np.concatenate([np.concatenate([pad_g, g[:-1, :, :dim]]), g[:, :, dim:]], axis=1)
    c = np.sum(_softmax(g, axis=1) * a, axis=1)
    return _rope(_rms(c, w[f"{p}.norm.weight"]), ratio * np.arange(M), inv_freq)


def _attention(cfg, w, p, layer, u, pos):
    S, H, D = u.shape[0], cfg.num_heads, cfg.head_dim
    f, ratio = _inv_freq(cfg, layer), cfg.compress_ratios[layer]
    q_lat = _rms(u @ w[f"{p}.wq_a.weight"].T, w[f"{p}.q_norm.weight"])
    q = _rope(_rms((q_lat @ w[f"{p}.wq_b.weight"].T).reshape(S, H, D)), pos[:, None], f)
    kv = _rope(_rms(u @ w[f"{p}.wkv.weight"].T, w[f"{p}.kv_norm.weight"]), pos, f)
    t = np.arange(S)
    mask = (t[None, :] <= pos[:, None]) & (t[None, :] > pos[:, None] - cfg.sliding_window)
    if ratio:
        c = _compress(w, f"{p}.compressor", u, ratio, D, f)
        visible = np.arange(c.shape[0])[None, :] < ((pos + 1) // ratio)[:, None]
        if ratio == 4:  # lightning indexer top-k (§3.5, without Hadamard / FP4 simulation)
            nI, dI = cfg.index_num_heads, cfg.index_head_dim
            k_idx = _compress(w, f"{p}.indexer.compressor", u, ratio, dI, f)
            qI = _rope((q_lat @ w[f"{p}.indexer.wq_b.weight"].T).reshape(S, nI, dI), pos[:, None], f)
            wI = (u @ w[f"{p}.indexer.weights_proj.weight"].T) * (dI**-0.5 * nI**-0.5)
            score = np.einsum("sh,shj->sj", wI, np.maximum(np.einsum("shd,jd->shj", qI, k_idx), 0))
            score = np.where(visible, score, -np.inf)
            rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1, kind="stable")
            visible &= rank < cfg.index_topk
        kv, mask = np.concatenate([kv, c]), np.concatenate([mask, visible], axis=1)
    s = np.where(mask[:, None, :], np.einsum("shd,td->sht", q, kv) * D**-0.5, -np.inf)
    s = np.concatenate([s, np.broadcast_to(w[f"{p}.attn_sink"][None, :, None], (S, H, 1))], axis=2)
    o = _rope(np.einsum("sht,td->shd", _softmax(s, axis=2)[..., :-1], kv), pos[:, None], f, inverse=True)
    G = cfg.o_groups
    wo_a = w[f"{p}.wo_a.weight"].reshape(G, cfg.o_lora_rank, -1)
    z = np.einsum("sgi,goi->sgo", o.reshape(S, G, -1), wo_a).reshape(S, -1)
    return z @ w[f"{p}.wo_b.weight"].T


def _moe(cfg, w, p, layer, u, ids, clamp_shared=True):
    s = np.sqrt(np.logaddexp(u @ w[f"{p}.gate.weight"].T, 0))
    if cfg.is_hash_layer(layer):
        idx = w[f"{p}.gate.tid2eid"][ids]
    else:
        idx = np.argsort(-(s + w[f"{p}.gate.bias"]), axis=1, kind="stable")[:, : cfg.num_experts_per_token]
    gw = np.take_along_axis(s, idx, axis=1)
    gw = gw / gw.sum(axis=1, keepdims=True) * cfg.routed_scaling_factor

    def expert(x, e, weight, lim=cfg.swiglu_limit):
        g = np.minimum(x @ w[f"{e}.w1.weight"].T, lim)
        v = np.clip(x @ w[f"{e}.w3.weight"].T, -lim, lim)
        return (weight[:, None] * g / (1 + np.exp(-g)) * v) @ w[f"{e}.w2.weight"].T

    out = expert(u, f"{p}.shared_experts", np.ones(u.shape[0]), cfg.swiglu_limit if clamp_shared else np.inf)
    for k in range(idx.shape[1]):
        for e in np.unique(idx[:, k]):
            rows = idx[:, k] == e
            out[rows] += expert(u[rows], f"{p}.experts.{e}", gw[rows, k])
    return out


def spec_logits(cfg: DeepSeekV4Config, weights, ids: np.ndarray, clamp_shared=True) -> tuple[np.ndarray, list[np.ndarray]]:
    """float64 logits [S, V] of one sequence and the streams entering each layer (+ the last output).

    ``clamp_shared=False`` gives the initial official revision (shared expert without SwiGLU clamp).
    """
    w = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in weights.items()}
    pos = np.arange(ids.shape[0])
    X = np.repeat(w["embed.weight"][ids][:, None, :], cfg.hc_mult, axis=1)
    streams = [X]
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}"
        moe = lambda *args: _moe(*args, clamp_shared=clamp_shared)
        for site, block in (("attn", _attention), ("ffn", moe)):
            u, post, C = _hc_pre(cfg, X, w[f"{p}.hc_{site}_fn"], w[f"{p}.hc_{site}_scale"], w[f"{p}.hc_{site}_base"])
            u = _rms(u, w[f"{p}.{site}_norm.weight"])
            a = block(cfg, w, f"{p}.{site}", layer, u, pos if site == "attn" else ids)
            X = _hc_post(a, X, post, C)
        streams.append(X)
    z = X.reshape(X.shape[0], -1)
    m = (z @ w["hc_head_fn"].T) / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    pre = 1 / (1 + np.exp(-(m * w["hc_head_scale"] + w["hc_head_base"]))) + cfg.hc_eps
    y = _rms(np.einsum("sj,sjd->sd", pre, X), w["norm.weight"])
    return y @ w["head.weight"].T, streams


# ---------------------------------------------------------------------------------- tests
def test_mapping_is_complete_and_exact(tiny):
    """Every HF tensor is filled, every official non-MTP tensor lands in HF unchanged (experts stacked)."""
    cfg, weights, model = tiny
    state = model.state_dict()
    assert set(hf_state_dict(cfg, weights)) == set(state)
    I = cfg.moe_intermediate_size
    used = set()
    for name, value in weights.items():
        if name.startswith("mtp."):
            continue
        parts = name.split(".")
        if parts[2:3] == ["ffn"] and parts[3] == "experts":
            layer, e, wn = int(parts[1]), int(parts[4]), parts[5]
            prefix = f"model.layers.{layer}.mlp.experts"
            got = {"w1": state[f"{prefix}.gate_up_proj"][e, :I], "w3": state[f"{prefix}.gate_up_proj"][e, I:],
                   "w2": state[f"{prefix}.down_proj"][e]}[wn]
            np.testing.assert_array_equal(got.numpy(), value, err_msg=name)
            used.add(f"{prefix}.{'down_proj' if wn == 'w2' else 'gate_up_proj'}")
            continue
        same = [k for k, v in state.items() if v.shape == value.shape and np.array_equal(v.numpy(), value)]
        assert len(same) == 1, f"{name}: found in HF as {same}"
        used.add(same[0])
    assert used == set(state), f"HF tensors not filled from an official name: {sorted(set(state) - used)}"
    assert not any(k.startswith("mtp.") for k in hf_state_dict(cfg, weights))


def test_mapping_errors_are_loud(tiny):
    cfg, weights, _ = tiny
    missing = dict(weights)
    del missing["layers.1.attn.indexer.compressor.ape"]
    with pytest.raises(KeyError, match="unmapped"):
        hf_model(cfg, missing)
    no_expert = {k: v for k, v in weights.items() if k != "layers.2.ffn.experts.5.w3.weight"}
    with pytest.raises(KeyError, match="experts missing"):
        hf_model(cfg, no_expert)
    with pytest.raises(KeyError, match="no HF counterpart"):
        hf_model(cfg, {**weights, "layers.0.attn.wq_c.weight": weights["layers.0.attn.wq_a.weight"]})
    with pytest.raises(KeyError, match="does not have"):
        hf_model(cfg, {**weights, "layers.0.attn.compressor.ape": weights["layers.1.attn.compressor.ape"]})
    bad = dict(weights)
    bad["layers.0.attn.wq_b.weight"] = bad["layers.0.attn.wq_b.weight"].T.copy()
    with pytest.raises(ValueError, match="shape"):
        hf_model(cfg, bad)


def test_deterministic_and_batch_independent(tiny, rng):
    cfg, weights, model = tiny
    ids = _ids(cfg, rng, 2, 100)
    a = hf_logits(cfg, weights, ids)
    b = hf_logits(cfg, weights, ids, model=model)
    assert a.shape == (2, 100, cfg.vocab_size) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    for i in range(2):
        np.testing.assert_allclose(hf_logits(cfg, weights, ids[i : i + 1], model=model)[0], a[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("seq", [1, 3, 9, 300])
def test_matches_numpy_spec(tiny, rng, seq):
    """HF (float32) == the float64 transcription of the spec: logits and the stream after every layer.

    seq=300 covers the 128-token window edge, two HCA entries (tokens 0-127, 128-255) and CSA top-8
    selection among up to 75 entries; seq=9 the CSA overlap of windows 0 and 1; seq=1, 3 no entries.
    """
    cfg, weights, model = tiny
    ids = _ids(cfg, rng, 1, seq)
    trace = hf_hidden_states(cfg, weights, ids, model=model)
    want, streams = spec_logits(cfg, weights, ids[0])
    for layer, (got, ref) in enumerate(zip(trace.streams, streams)):
        err = np.abs(got[0] - ref).max() / np.abs(ref).max()
        assert err < 2e-5, f"{seq=} stream entering layer {layer}: relative error {err:.2e}"
    err = np.abs(trace.logits[0] - want).max() / np.abs(want).max()
    assert err < 2e-5, f"{seq=} logits: relative error {err:.2e}"
    np.testing.assert_array_equal(trace.logits, hf_logits(cfg, weights, ids, model=model))


def test_matches_numpy_spec_pro_schedule(rng):
    cfg = PRO_LIKE
    weights = random_official_weights(cfg, seed=4)
    ids = _ids(cfg, rng, 1, 260)
    got = hf_logits(cfg, weights, ids)[0]
    want, _ = spec_logits(cfg, weights, ids[0])
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-5, f"pro-like schedule: relative error {err:.2e}"


def test_matches_numpy_spec_with_active_clamp(rng):
    """swiglu_limit 0.25 makes the clamps bite (at 10 they never do with these weights); HF clamps the
    shared expert too, i.e. follows the current official revision, not the initial one."""
    cfg = PARITY.replace(swiglu_limit=0.25)
    weights = random_official_weights(cfg, seed=3)
    ids = _ids(cfg, rng, 1, 40)
    got = hf_logits(cfg, weights, ids)[0]
    want, _ = spec_logits(cfg, weights, ids[0])
    initial, _ = spec_logits(cfg, weights, ids[0], clamp_shared=False)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2e-5
    assert np.abs(got - initial).max() / scale > 1e-3


def test_numpy_spec_would_see_a_wrong_convention(tiny, rng):
    """The comparison above can fail: a transposed mHC residual mix (C instead of C^T) is caught."""
    global _hc_post
    cfg, weights, model = tiny
    ids = _ids(cfg, rng, 1, 12)
    good = _hc_post
    try:
        _hc_post = lambda a, R, post, C: good(a, R, post, np.swapaxes(C, 1, 2))
        wrong, _ = spec_logits(cfg, weights, ids[0])
    finally:
        _hc_post = good
    got = hf_logits(cfg, weights, ids, model=model)[0]
    assert np.abs(got - wrong).max() / np.abs(wrong).max() > 1e-3


def test_prefill_is_causal(tiny, rng):
    cfg, weights, model = tiny
    ids = _ids(cfg, rng, 1, 300)
    changed = ids.copy()
    changed[0, 200] = (changed[0, 200] + 1) % cfg.vocab_size
    diff = np.abs(hf_logits(cfg, weights, ids, model=model) - hf_logits(cfg, weights, changed, model=model)).max(-1)[0]
    assert diff[:200].max() == 0.0
    assert diff[200] > 1e-3


def _expert_perturbed(weights, layer, expert):
    out = dict(weights)
    name = f"layers.{layer}.ffn.experts.{expert}.w2.weight"
    out[name] = out[name] * 3.0
    return out


def test_hash_expert_change_is_local(rng):
    """All layers hash-routed: changing one expert of the last layer moves exactly the logits of the
    positions whose token lists that expert in the last layer's tid2eid row (computed from the weights)."""
    cfg = PARITY.replace(num_hash_layers=PARITY.num_layers)
    weights = random_official_weights(cfg, seed=2)
    ids = _ids(cfg, rng, 1, 64)
    last, expert = cfg.num_layers - 1, 3
    diff = np.abs(hf_logits(cfg, weights, ids) - hf_logits(cfg, _expert_perturbed(weights, last, expert), ids)).max(-1)[0]
    routed = (weights[f"layers.{last}.ffn.gate.tid2eid"][ids[0]] == expert).any(axis=1)
    assert 0 < routed.sum() < ids.shape[1]
    np.testing.assert_array_equal(diff > 0, routed)


def test_scored_expert_change_is_local(tiny, rng):
    """Score-routed last layer: the moved positions are those HF's router sent to that expert."""
    cfg, weights, model = tiny
    ids = _ids(cfg, rng, 1, 64)
    last, expert = cfg.num_layers - 1, 5
    routed = []
    hook = model.model.layers[last].mlp.gate.register_forward_hook(lambda m, a, o: routed.append(o[2]))
    try:
        base = hf_logits(cfg, weights, ids, model=model)
    finally:
        hook.remove()
    hit = (routed[0] == expert).any(dim=1).numpy()
    assert 0 < hit.sum() < ids.shape[1]
    diff = np.abs(base - hf_logits(cfg, _expert_perturbed(weights, last, expert), ids)).max(-1)[0]
    np.testing.assert_array_equal(diff > 0, hit)


@pytest.mark.parametrize("prompt,steps", [(1, 8), (122, 10), (252, 6)])
def test_greedy_decode_matches_prefill(tiny, rng, prompt, steps):
    """HF's cached decode (window ring, compressor buffers, CSA overlap) reproduces its own prefill:
    each step's logits equal the full-sequence logits, across the 128-token window and HCA boundary."""
    cfg, weights, model = tiny
    ids = _ids(cfg, rng, 1, prompt)
    tokens, step_logits = hf_generate(cfg, weights, ids, steps, model=model)
    assert tokens == hf_greedy(cfg, weights, ids, steps, model=model)
    full = hf_logits(cfg, weights, np.concatenate([ids, np.array([tokens])], axis=1), model=model)[0]
    want = full[prompt - 1 : prompt - 1 + steps]
    np.testing.assert_allclose(step_logits, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert tokens == want.argmax(-1).tolist()

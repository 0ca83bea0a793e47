"""Routing cases named by issue 7 (spec §4.1): ties at the 6th place, and hash routing through ``tid2eid``.

Tie rule of the reference (``nvfp4jax/ref/moe.py``): experts are chosen by top-6 of the *biased*
score ``s + bias`` in float32; among equal biased scores the **lower expert index wins**
(``jax.lax.top_k`` is stable); the weights are always the *unbiased* ``s`` of the chosen experts.
The official model uses ``torch.topk``, whose order among ties is unspecified, so this is our rule;
the MoE kernels take the ids as input and the GPU routing must reproduce them bitwise.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4jax.model.layers import Linear
from nvfp4jax.model.moe import MoE, SharedExpert
from nvfp4jax.ref.moe import route
from tests.conftest import assert_bitwise_equal


def _scores(logits: np.ndarray) -> np.ndarray:
    """``s = sqrt(softplus(logits))`` as the reference computes it (float32)."""
    return np.asarray(jnp.sqrt(jax.nn.softplus(jnp.asarray(logits, jnp.float32))))


def _weights_of(s: np.ndarray, idx: np.ndarray, scale: float) -> np.ndarray:
    """Unbiased scores of ``idx`` renormalised, by the reference's own float32 ops (for a bitwise check)."""
    w = jnp.take_along_axis(jnp.asarray(s), jnp.asarray(idx, jnp.int32), axis=-1)
    return np.asarray(w / jnp.sum(w, axis=-1, keepdims=True) * jnp.float32(scale))


def test_tie_at_the_sixth_place_by_hand():
    # experts 1, 3, 5 lead; four experts tie at logit 1 for the last three places: 0, 2, 4 win, 6 loses
    logits = np.array([[1.0, 3.0, 1.0, 2.0, 1.0, 4.0, 1.0, 0.0]], np.float32)
    w, idx = route(jnp.asarray(logits), 6, 1.5, bias=jnp.zeros(8, jnp.float32))
    assert_bitwise_equal(idx, np.array([[5, 1, 3, 0, 2, 4]], np.int32), "ids")
    assert_bitwise_equal(w, _weights_of(_scores(logits), np.asarray(idx), 1.5), "weights")


def test_biased_tie_goes_to_the_lower_index_with_its_unbiased_weight():
    """Experts 0 and 7 tie exactly in ``s + bias`` for the 6th place though expert 0's unbiased score
    is lower: expert 0 is chosen (lower index), and its weight is its own unbiased score."""
    logits = np.array([[-1.0, 0.0, 3.0, 2.5, 2.2, 2.0, 1.8, 0.5]], np.float32)
    s = _scores(logits)[0]
    bias = np.zeros(8, np.float32)
    bias[0] = s[7] - s[0]  # exact (Sterbenz: s[0], s[7] within a factor 2), so the biased scores tie exactly
    assert np.float32(s[0] + bias[0]) == s[7] and s[0] < s[1] < s[7]
    w, idx = route(jnp.asarray(logits), 6, 2.5, bias=jnp.asarray(bias))
    assert_bitwise_equal(idx, np.array([[2, 3, 4, 5, 6, 0]], np.int32), "ids")
    assert_bitwise_equal(w, _weights_of(s[None], np.asarray(idx), 2.5), "weights")
    assert float(w[0, 5]) < float(_weights_of(s[None], np.array([[2, 3, 4, 5, 6, 7]]), 2.5)[0, 5])


def test_many_ties_match_a_stable_sort_bitwise(rng):
    """Coarse logits and biases make ties at the 6th place common; the ids equal a stable NumPy sort
    of the same float32 biased scores, bitwise, and the weights are the chosen unbiased scores."""
    logits = rng.integers(-2, 3, (128, 16)).astype(np.float32)
    bias = (rng.integers(-1, 2, 16) * 0.5).astype(np.float32)
    s = _scores(logits)
    biased = s + bias[None, :]
    ranked = np.sort(biased, axis=1)[:, ::-1]
    assert (ranked[:, 5] == ranked[:, 6]).sum() >= 32, "the case must exercise ties at the 6th place"
    want = np.argsort(-biased, axis=1, kind="stable")[:, :6].astype(np.int32)
    w, idx = route(jnp.asarray(logits), 6, 1.5, bias=jnp.asarray(bias))
    assert_bitwise_equal(idx, want, "ids")
    assert_bitwise_equal(w, _weights_of(s, want, 1.5), "weights")


def _hash_moe(rng, experts: int, dim: int, vocab: int, scale: float) -> MoE:
    """A hash-layer MoE (``tid2eid``, no bias) with zero expert weights: only its routing is used."""
    inter = 16
    gate = rng.standard_normal((experts, dim)).astype(np.float32)
    gate[:6] += 10.0  # score routing would pick experts 0..5 for every token; the table never does
    tid2eid = np.stack([6 + rng.permutation(experts - 6)[:6] for _ in range(vocab)]).astype(np.int32)
    zeros = jnp.zeros((experts, inter, dim), jnp.float32)
    shared = SharedExpert(Linear(jnp.zeros((inter, dim), jnp.float32), "bf16"),
                          Linear(jnp.zeros((inter, dim), jnp.float32), "bf16"),
                          Linear(jnp.zeros((dim, inter), jnp.float32), "bf16"), 10.0)
    return MoE(jnp.asarray(gate), None, jnp.asarray(tid2eid), zeros, zeros, jnp.swapaxes(zeros, 1, 2), shared,
               6, scale, 10.0, "bf16")


def test_hash_routing_reads_tid2eid_at_each_token_id(rng):
    """Hash layers: ids = ``tid2eid[token id at the same position]`` (repeated tokens route alike,
    the scores do not select), weights = the unbiased scores of those experts renormalised x 2.5."""
    moe = _hash_moe(rng, experts=16, dim=32, vocab=50, scale=2.5)
    token_ids = np.array([7, 3, 7, 49, 0, 3, 12], np.int32)
    x = rng.standard_normal((7, 32)).astype(np.float32)
    w, idx = moe.routing(jnp.asarray(x, jnp.bfloat16), jnp.asarray(token_ids))
    assert_bitwise_equal(idx, np.asarray(moe.tid2eid)[token_ids], "ids")
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    s = np.sqrt(np.logaddexp(xb @ np.asarray(moe.gate, np.float64).T, 0.0))
    chosen = np.take_along_axis(s, np.asarray(idx), axis=1)
    np.testing.assert_allclose(np.asarray(w), chosen / chosen.sum(axis=1, keepdims=True) * 2.5, rtol=2e-6)
    assert_bitwise_equal(idx[0], idx[2], "same token, same experts")

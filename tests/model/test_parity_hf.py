"""Our reference model vs the independent HF ``transformers`` DeepSeek-V4, full-sequence prefill.

HF computes in plain floating point, so our model runs with ``quant_simulation=False`` (no FP8
KV / FP4 indexer simulations), recipe ``bf16`` with float32 weights and activations
(``compute_dtype="float32"``). Both sides are built from the same official-named source weights.

Tolerance: max |ours - HF| / max |HF| < 1e-4. Both compute the same function in float32, with
different summation orders and transcendental implementations; the observed error is ~1e-6
(float32 epsilon 1.2e-7, amplified through 4 layers and the head). A single wrong formula (RoPE
on the wrong channels, comb not transposed, a missing clamp, a window off by one) moves logits by
1e-2 or more, so 1e-4 separates "same function" from "different function" by two orders.

The tiny config covers SWA (layer 0), CSA (1, 3) and HCA (2), hash (0, 1) and score (2, 3)
routing; the sequence lengths cross the CSA (4), window (128) and HCA (128, 256) boundaries.
HF has no MTP block, so MTP is not covered here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.checkpoint.random_weights import random_official_weights
from nvfp4jax.config import preset
from nvfp4jax.model import model_from_tensors, source_getter
from nvfp4jax.model import attention as attention_module
from tests.hf_reference import hf_logits, hf_model

TOL = 1e-4
CFG = preset("tiny", recipe="bf16", compute_dtype="float32", quant_simulation=False)
LENGTHS = (1, 3, 4, 5, 127, 128, 129, 300)


@pytest.fixture(scope="module", params=[0, 1], ids=lambda s: f"weights{s}")
def pair(request):
    weights = random_official_weights(CFG, request.param)
    ours = model_from_tensors(CFG, source_getter(CFG, lambda n: weights[n]))
    return ours, hf_model(CFG, weights)


_forward = jax.jit(lambda m, ids: m(ids))


def _kth_place_ties(model, ids) -> int:
    """Number of queries whose k-th and (k+1)-th indexer scores are exactly equal (tie rules differ)."""
    found = []
    original = attention_module.select_topk

    def spy(scores, positions, ratio, k):
        def check(s, p):
            visible = np.arange(s.shape[-1])[None, None] < ((p + 1) // ratio)[..., None]
            srt = -np.sort(-np.where(visible, s, -np.inf), axis=-1)
            if srt.shape[-1] > k:
                found.append(int(np.sum((srt[..., k - 1] == srt[..., k]) & np.isfinite(srt[..., k]))))
        jax.debug.callback(check, scores, positions)
        return original(scores, positions, ratio, k)

    attention_module.select_topk = spy
    try:
        jax.block_until_ready(model.hidden(ids))
    finally:
        attention_module.select_topk = original
    return sum(found)


@pytest.mark.parametrize("seq", LENGTHS)
def test_prefill_logits_match_transformers(pair, seq, rng):
    ours, theirs = pair
    ids = rng.integers(0, CFG.vocab_size, (2, seq))
    got = np.asarray(_forward(ours, jnp.asarray(ids)))
    want = hf_logits(CFG, {}, ids, model=theirs)
    err = np.abs(got - want).max() / np.abs(want).max()
    if err >= TOL and seq > 4 * CFG.index_topk:
        assert _kth_place_ties(ours, jnp.asarray(ids)) == 0, "exact top-k ties: tie rules differ (see docs)"
    assert err < TOL, f"{seq=} relative error {err:.3e}"


def test_parity_is_sensitive_to_a_one_layer_change(pair, rng):
    """The comparison can fail: perturbing one routed expert of the last layer is detected."""
    ours, theirs = pair
    ids = rng.integers(0, CFG.vocab_size, (1, 64))
    want = hf_logits(CFG, {}, ids, model=theirs)
    seg = ours.segments[-1]
    w1 = seg.blocks[-1].ffn.w1
    bumped = jax.tree.map(lambda a: a * 1.01, w1)
    changed = jax.tree_util.tree_map(lambda x: x, ours)
    import equinox as eqx

    changed = eqx.tree_at(lambda m: m.segments[-1].blocks[-1].ffn.w1, changed, bumped)
    got = np.asarray(_forward(changed, jnp.asarray(ids)))
    assert np.abs(got - want).max() / np.abs(want).max() > 10 * TOL

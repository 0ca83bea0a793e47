"""Generation: sampling, the host loop (batching, stop tokens, streaming), one trace and in-place
state, MTP speculative decoding, parity with transformers' greedy generation, the CLI, and errors.

Model tests share one tiny model and keep batch 2, prefill chunk 4 and page size 16, so the
jitted steps compile once for the whole module.
"""

import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax import generate as gen
from nvfp4jax.config import preset
from nvfp4jax.generate import Sampling, SamplingArrays, filter_logits, generate, sample_tokens
from nvfp4jax.model import random_model
from nvfp4jax.state import init_state

P0, P1 = [5, 6, 7, 8, 9], [20, 21, 22]  # different lengths; P0 crosses a 4-token chunk
OPTS = dict(prefill_chunk=4, page_size=16)


# ---------------------------------------------------------------------------------------------- sampling
def _arrays(b, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    return SamplingArrays.of(Sampling(temperature, top_k, top_p, seed), b)


def test_greedy_is_argmax(rng):
    logits = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
    expect = np.argmax(np.asarray(logits), axis=-1)
    pos = jnp.zeros((3,), jnp.int32)
    np.testing.assert_array_equal(sample_tokens(logits, _arrays(3, 0.0), pos, greedy=True), expect)
    # temperature-0 rows are greedy also inside a sampling batch
    np.testing.assert_array_equal(sample_tokens(logits, _arrays(3, 0.0), pos, greedy=False), expect)
    tied = jnp.asarray([[1.0, 3.0, 3.0, 0.0]], jnp.float32)
    assert int(sample_tokens(tied, _arrays(1, 0.0), pos[:1], greedy=True)[0]) == 1  # lowest id on ties


def test_filter_logits_top_k_top_p_temperature_by_hand():
    logits = jnp.asarray([[1.0, 4.0, 2.0, 3.0, 0.0]], jnp.float32)
    ninf = -np.inf

    def f(t, k, p):
        return np.asarray(filter_logits(logits, jnp.asarray([t], jnp.float32), jnp.asarray([k], jnp.int32),
                                        jnp.asarray([p], jnp.float32)))[0]

    np.testing.assert_array_equal(f(1.0, 0, 1.0), [1, 4, 2, 3, 0])
    np.testing.assert_array_equal(f(2.0, 0, 1.0), [0.5, 2, 1, 1.5, 0])
    np.testing.assert_array_equal(f(1.0, 2, 1.0), [ninf, 4, ninf, 3, ninf])
    # probabilities sorted: e^4, e^3, e^2, e^1, e^0 over their sum -> 0.636, 0.234, 0.086, 0.032, 0.012
    np.testing.assert_array_equal(f(1.0, 0, 0.5), [ninf, 4, ninf, ninf, ninf])  # first token alone reaches 0.5
    np.testing.assert_array_equal(f(1.0, 0, 0.8), [ninf, 4, ninf, 3, ninf])  # 0.636 < 0.8 <= 0.870
    np.testing.assert_array_equal(f(1.0, 0, 0.9), [ninf, 4, 2, 3, ninf])  # 0.870 < 0.9 <= 0.956
    np.testing.assert_array_equal(f(1.0, 0, 1e-6), [ninf, 4, ninf, ninf, ninf])  # the top token always stays
    # top-p acts on the renormalised top-k distribution: top-2 gives 0.731, 0.269
    np.testing.assert_array_equal(f(1.0, 2, 0.7), [ninf, 4, ninf, ninf, ninf])
    np.testing.assert_array_equal(f(1.0, 2, 0.75), [ninf, 4, ninf, 3, ninf])


def test_sampling_frequencies_and_seeds(rng):
    v = 8
    logits = jnp.asarray(np.tile(rng.normal(size=(1, v)), (4000, 1)), jnp.float32)
    pos = jnp.arange(4000, dtype=jnp.int32)  # 4000 draws: one key per position
    draws = np.asarray(sample_tokens(logits, _arrays(4000, 1.0, 3), pos, greedy=False))
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    assert set(draws.tolist()) == top3
    p = np.exp(np.sort(np.asarray(logits[0]))[::-1][:3])
    p /= p.sum()
    freq = np.array([np.mean(draws == t) for t in np.argsort(-np.asarray(logits[0]))[:3]])
    assert np.abs(freq - p).max() < 0.04, (freq, p)
    again = np.asarray(sample_tokens(logits, _arrays(4000, 1.0, 3), pos, greedy=False))
    other = np.asarray(sample_tokens(logits, _arrays(4000, 1.0, 3, seed=1), pos, greedy=False))
    np.testing.assert_array_equal(draws, again)
    assert np.mean(draws != other) > 0.2


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"), (dict(seed=2**32), "seed"),
])
def test_bad_sampling_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(top_k=2.5), dict(seed=1.0), dict(temperature="1"), dict(top_k=True)])
def test_mistyped_sampling_parameters(kwargs):
    with pytest.raises(TypeError):  # ours, or the jaxtyping/beartype check when tests turn it on
        Sampling(**kwargs)


# ---------------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def model():
    return random_model(preset("tiny"), 0)


def _state(model, max_len=32, **kw):
    return init_state(model, batch=2, max_len=max_len, page_size=16, **kw)


def _full_forward_argmax(model, prompt, tokens):
    """Argmax of the full-sequence forward pass (no cache) after each prefix ``prompt + tokens[:i]``."""
    logits = model(jnp.asarray([list(prompt) + list(tokens[:-1])], jnp.int32))[0, len(prompt) - 1:]
    return np.argmax(np.asarray(logits), axis=-1).tolist()


@pytest.fixture(scope="module")
def greedy_pair(model):
    return generate(model, [P0, P1], max_new_tokens=10, state=_state(model), **OPTS)


def test_batched_equals_one_at_a_time_equals_full_forward(model, greedy_pair):
    assert greedy_pair.finish == ["length", "length"]
    for i, p in enumerate((P0, P1)):
        alone = generate(model, [p], max_new_tokens=10, state=_state(model), **OPTS)
        assert alone.tokens[0] == greedy_pair.tokens[i], f"prompt {i}"
        assert alone.tokens[0] == _full_forward_argmax(model, p, alone.tokens[0]), f"prompt {i}: cached != full forward"
    assert greedy_pair.tokens[0] != greedy_pair.tokens[1]


def test_reused_state_gives_the_same_tokens(model, greedy_pair):
    first = generate(model, [P1, P0], max_new_tokens=7, state=_state(model), **OPTS)  # slots swapped
    np.testing.assert_array_equal(first.state.lengths, [len(P1) + 6, len(P0) + 6])
    again = generate(model, [P0, P1], max_new_tokens=10, state=first.state, **OPTS)  # frees both slots first
    assert again.tokens == greedy_pair.tokens


def test_stop_tokens_and_streaming_order(model, greedy_pair):
    ref = greedy_pair.tokens
    stop = ref[0][3]
    cut0 = ref[0].index(stop) + 1
    cut1 = ref[1].index(stop) + 1 if stop in ref[1] else len(ref[1])
    seen = []
    r = generate(model, [P0, P1], max_new_tokens=10, stop_tokens=[stop], on_token=lambda i, t: seen.append((i, t)),
                 state=_state(model), **OPTS)
    assert r.tokens == [ref[0][:cut0], ref[1][:cut1]]
    assert r.finish == ["stop", "stop" if stop in ref[1] else "length"]
    # tokens stream step by step: the k-th token of every live request before any (k+1)-th
    expect = [(i, r.tokens[i][k]) for k in range(10) for i in (0, 1) if k < len(r.tokens[i])]
    assert seen == expect


def test_sampled_generation_is_seeded(model):
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = generate(model, [P0, P1], max_new_tokens=8, sampling=s, state=_state(model), **OPTS)
    b = generate(model, [P0, P1], max_new_tokens=8, sampling=s, state=_state(model), **OPTS)
    alone = generate(model, [P0], max_new_tokens=8, sampling=s, state=_state(model), **OPTS)
    c = generate(model, [P0, P1], max_new_tokens=8, sampling=Sampling(1.0, 50, 0.9, 8), state=_state(model), **OPTS)
    assert a.tokens == b.tokens
    assert alone.tokens[0] == a.tokens[0]  # request 0's keys do not depend on request 1
    assert c.tokens != a.tokens


def test_decode_traces_once_over_a_generation(model, monkeypatch):
    traced = eqx.debug.assert_max_traces(gen._step, max_traces=1)
    monkeypatch.setattr(gen, "decode_step", eqx.filter_jit(traced, donate="all-except-first"))
    r = generate(model, [P0, P1], max_new_tokens=6, stop_tokens=[], state=_state(model), **OPTS)
    assert eqx.debug.get_num_traces(traced) == 1
    assert len(r.step_seconds) == 5  # five decode steps, one trace (slots at different positions)


def test_decode_step_donates_the_state(model):
    state = _state(model)
    fixed = (model, SamplingArrays.of(Sampling(), 2))
    ones = lambda: jnp.ones((2,), jnp.int32)  # noqa: E731 (donated too: a fresh one per step)
    _, _, _, _, state = gen.decode_step(fixed, state, jnp.asarray([[3], [4]], jnp.int32), ones(), True)
    pool = state.layers[1][0].pool.nope  # the CSA layer's entry pool
    leaves = jax.tree.leaves(state)
    before = pool.unsafe_buffer_pointer()
    _, _, _, _, new = gen.decode_step(fixed, state, jnp.asarray([[5], [6]], jnp.int32), ones(), True)
    assert all(leaf.is_deleted() for leaf in leaves), "the old state should be donated"
    assert new.layers[1][0].pool.nope.unsafe_buffer_pointer() == before, "the pool should be updated in place"
    np.testing.assert_array_equal(new.lengths, [2, 2])


# ---------------------------------------------------------------------------------------------- MTP
def _two_token_head(model, rng):
    """Head rows 0 and 1 = +w and -w, the rest 0: every step picks token 0 or 1 by the sign of
    w . hidden, so the main model and the MTP block (which shares the head) often agree."""
    w = rng.normal(size=(model.cfg.hidden_size,))
    head = np.zeros(model.head.shape, np.float32)
    head[0], head[1] = w, -w
    return eqx.tree_at(lambda m: m.head, model, jnp.asarray(head, model.head.dtype))


@pytest.mark.parametrize("agreeing", [False, True])
def test_speculative_decoding_gives_the_same_tokens(model, greedy_pair, rng, agreeing):
    m = _two_token_head(model, rng) if agreeing else model
    plain = greedy_pair if not agreeing else generate(m, [P0, P1], max_new_tokens=10, state=_state(m), **OPTS)
    spec = generate(m, [P0, P1], max_new_tokens=10, state=_state(m), speculative=True, **OPTS)
    assert spec.tokens == plain.tokens
    assert spec.drafted > 0
    if agreeing:  # the accept path (measured: every draft accepted, 2 tokens per step)
        assert spec.acceptance_rate > 0.5, spec.acceptance_rate
        assert len(spec.step_seconds) < 9
    else:  # the reject path (random MTP weights: measured acceptance 0)
        assert spec.acceptance_rate < 0.5, spec.acceptance_rate
    s = Sampling(temperature=1.0, seed=3)
    assert (generate(m, [P0, P1], max_new_tokens=6, sampling=s, state=_state(m), speculative=True, **OPTS).tokens
            == generate(m, [P0, P1], max_new_tokens=6, sampling=s, state=_state(m), **OPTS).tokens)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, exc, match", [
    (lambda m: generate(m, [list(range(30))], max_new_tokens=1, max_len=16), ValueError, "holds at most 16"),
    (lambda m: generate(m, [P0], max_new_tokens=20, max_len=16), ValueError, "max_new_tokens 20"),
    (lambda m: generate(m, [P0, P1, P0], state=_state(m)), ValueError, "larger than the state's 2 slots"),
    (lambda m: generate(m, [P0, P1], max_new_tokens=4, state=_state(m, max_len=64, num_pages={4: 1})),
     ValueError, "exhausted"),
    (lambda m: generate(m, [P0], sampling=Sampling(temperature=1.0, top_p=1.0), max_new_tokens=0), ValueError,
     "max_new_tokens"),
    (lambda m: generate(m, [[1, 512]]), ValueError, "outside the vocabulary"),
    (lambda m: generate(m, [P0, []]), ValueError, "prompt 1 is empty"),
    (lambda m: generate(m, []), ValueError, "non-empty"),
    (lambda m: generate(m, [P0], stop_tokens=[-1]), ValueError, "stop_tokens"),
    (lambda m: generate(m, [[1.5]]), TypeError, "int"),
    (lambda m: generate(m, [P0], sampling={"temperature": 1}), TypeError, "Sampling"),
    (lambda m: generate(eqx.tree_at(lambda x: x.mtp, m, None), [P0], speculative=True),
     ValueError, "MTP"),
])
def test_errors_before_launch(model, monkeypatch, call, exc, match):
    def no_launch(*a, **k):
        raise AssertionError("launched before the error")

    monkeypatch.setattr(gen, "prefill_step", no_launch)
    monkeypatch.setattr(gen, "decode_step", no_launch)
    with pytest.raises(exc, match=match):
        call(model)


# ---------------------------------------------------------------------------------------------- parity, CLI
def test_greedy_equals_transformers_greedy(rng):
    pytest.importorskip("transformers")
    from nvfp4jax.checkpoint.random_weights import random_official_weights
    from nvfp4jax.model import model_from_tensors, source_getter
    from tests.hf_reference import hf_greedy

    cfg = preset("tiny", recipe="bf16", compute_dtype="float32", quant_simulation=False)
    w = random_official_weights(cfg, 1)
    m = model_from_tensors(cfg, source_getter(cfg, lambda n: w[n]), include_mtp=False)
    prompt = rng.integers(2, cfg.vocab_size, size=7).tolist()
    ours = generate(m, [prompt], max_new_tokens=8, prefill_chunk=4).tokens[0]
    assert ours == hf_greedy(cfg, w, np.asarray([prompt]), 8)


def test_cli_default_run(model, greedy_pair):
    from nvfp4jax.tokenizer import ByteTokenizer, chat_prompt

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nvfp4jax.cli", "generate", "--prompt", "hello", "--max-new-tokens",
                           "6"], capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    ids = ByteTokenizer().encode(chat_prompt("hello"))
    expect = generate(model, [ids], max_new_tokens=6, stop_tokens=[1], prefill_chunk=1).tokens[0]
    assert f"tokens: {expect}" in proc.stdout, proc.stdout
    assert "tokens/s" in proc.stdout
    assert seconds < 90, f"the embedded default took {seconds:.0f} s"  # ~40 s on an idle 2-core CPU


def test_cli_rejects_bad_sampling_quickly():
    proc = subprocess.run([sys.executable, "-m", "nvfp4jax.cli", "generate", "--top-p", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "top_p must be in (0, 1]" in proc.stderr, proc.stderr

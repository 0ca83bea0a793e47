"""A model loaded from a synthetic checkpoint gives the logits of the same weights built directly."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.checkpoint.decode import decode
from nvfp4jax.checkpoint.layouts import logical_tensors
from nvfp4jax.checkpoint.reader import load_model
from nvfp4jax.checkpoint.synthetic import encode_source

weights_module = pytest.importorskip("nvfp4jax.model.weights")
#: one compiled forward for every model of the same structure (eager prefill is slow on CPU)
forward = eqx.filter_jit(lambda model, tokens: model(tokens))


def direct_getter(cfg, weights, layout):
    """The same source weights encoded and decoded in memory: no files, shards, index or validation."""
    tensors = {t.name: t for t in logical_tensors(cfg, layout)}

    def get(name):
        t = tensors[name]
        value, _ = decode(t, encode_source(t, weights[name]), cfg, cfg.recipe, lambda n: "<memory>")
        return value

    return get


@pytest.mark.parametrize("layout", ["official", "nvidia"])
def test_loaded_model_matches_directly_built(layout, tiny_source, official_dir, nvidia_dir, seed):
    cfg, weights = tiny_source
    with pytest.warns(UserWarning, match="mxfp4 -> nvfp4, INEXACT") as record:  # the planted wide experts
        model, ckpt = load_model(official_dir if layout == "official" else nvidia_dir, progress=False)
    assert {w.message.args[0].split(": ")[1] for w in record} == ({"layers.1.ffn.experts.2.w1.weight"} if layout == "official"
                                                                 else set()) | {"mtp.0.ffn.experts.5.w3.weight"}
    assert ckpt.config == cfg and model.mtp is not None
    direct = weights_module.model_from_tensors(cfg, direct_getter(cfg, weights, layout))
    leaves_a, tree_a = jax.tree.flatten(model)
    leaves_b, tree_b = jax.tree.flatten(direct)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and bool(jnp.array_equal(a, b, equal_nan=True))
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    logits = forward(model, tokens)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert bool(jnp.array_equal(logits, forward(direct, tokens)))


def test_checkpoint_model_is_close_to_the_float_source(tiny_source, official_dir, seed):
    """Recipe bf16: only the checkpoint's own FP8 / MXFP4 rounding separates it from the float source."""
    cfg, weights = tiny_source
    model, _ = load_model(official_dir, recipe="bf16", progress=False)
    source = weights_module.model_from_tensors(cfg.replace(recipe="bf16"), lambda n: weights[n])
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    a, b = forward(model, tokens).reshape(-1), forward(source, tokens).reshape(-1)
    cos = float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert 0.98 < cos < 1.0, f"{cos=:.5f}"  # measured 0.990 (4-bit MXFP4 experts)


def test_cli_generate_from_checkpoint(tiny_source, official_dir, capsys):
    """``nvfp4jax generate --checkpoint DIR`` runs the loaded model: its greedy tokens are those of the
    directly built model."""
    from nvfp4jax import cli
    from nvfp4jax.generate import generate
    from nvfp4jax.tokenizer import ByteTokenizer, chat_prompt

    cfg, weights = tiny_source
    with pytest.warns(UserWarning, match="INEXACT"):  # the planted wide experts
        rc = cli.main(["generate", "--checkpoint", str(official_dir), "--prompt", "hi", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    tok = ByteTokenizer()
    direct = weights_module.model_from_tensors(cfg, direct_getter(cfg, weights, "official"))
    expect = generate(direct, [tok.encode(chat_prompt("hi"))], max_new_tokens=5, stop_tokens=[tok.eos_id]).tokens[0]
    assert f"[0] tokens: {expect}" in out, out

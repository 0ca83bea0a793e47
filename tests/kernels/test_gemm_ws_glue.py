"""CPU: the JAX side of the warp-specialized prefill path (``gemm_ws.nvfp4_gemm_ws``, ``moe.grouped_gemm_ws``)
against the reference, with the two kernels replaced by emulators of their documented contracts.

The kernels themselves run only on a GPU (``test_gemm_ws.py``); what this checks on every CI run is the
wiring around them: the argument order of each ``cutlass_call``, the ``2**-DECODE_SHIFT`` convention
of the decoded operands and its undoing in the epilogue, the per-row global scales of NVFP4 X, the L1
gather into expert order, the tile table (``(expert, first row, rows)`` per CTA column: partial last
tiles, experts without rows) and the SwiGLU epilogue's order of roundings. A wrong wiring moves the
result by orders of magnitude more than the emulator's float32 summation order does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.formats.nvfp4 import NVFP4Tensor, quantize, tile_weight
from nvfp4jax.ref import gemm as ref_gemm, moe as ref_moe
from tests.kernels._gpu import activations

cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import gemm as kg, gemm_ws as kw, moe as km, quantize as kq  # noqa: E402

SHIFT = 2.0**-kw.DECODE_SHIFT


def _decoded_w(v, s):
    """A tiled weight's codes and scale bytes -> ``e2m1 * e4m3 * 2**-8`` (what the producer stages)."""
    scales = jax.lax.bitcast_convert_type(s, jnp.float8_e4m3fn)
    lead = v.shape[:-4]
    t = NVFP4Tensor(v, scales, jnp.ones(lead, jnp.float32), layout="tiled")
    return ref_gemm._dequant_unscaled(t) * SHIFT


def _emulate_gemm(cfg, x, gx, wv, ws, wg, w3v, w3s, w3g, tiles, route_w, out):
    """GemmPrefillSm90's contract: float32 accumulation of BF16 X times the decoded W, epilogue scale
    ``gw * 2**shift (* gx)``, BF16 out; grouped: per tile-table row; gate_up: BF16 gate/up, SwiGLU."""
    unscale = 2.0 ** (kw.DECODE_SHIFT * (2 if cfg.x_scaled else 1))
    x = np.asarray(x, np.float32)
    gx = np.ones(x.shape[0], np.float32) if gx is None else np.asarray(gx)
    if not cfg.grouped:
        acc = x @ np.asarray(_decoded_w(wv, ws)).T
        return jnp.asarray(acc * (gx[:, None] * (np.asarray(wg)[0] * unscale))).astype(out.dtype)
    w, w3 = np.asarray(_decoded_w(wv, ws)), np.asarray(_decoded_w(w3v, w3s)) if cfg.gate_up else None
    y = np.full(out.shape, np.nan, np.float32)
    for e, start, count in np.asarray(tiles):
        assert count <= kw.rows_per_tile(cfg), (count, cfg)  # the kernel's capacity per table entry
        if count == 0:
            continue
        rows = slice(start, start + count)
        g = x[rows] @ w[e].T * (gx[rows, None] * (np.asarray(wg)[e] * unscale))
        if not cfg.gate_up:
            y[rows] = g
            continue
        u = x[rows] @ w3[e].T * (gx[rows, None] * (np.asarray(w3g)[e] * unscale))
        g, u = (np.asarray(jnp.asarray(v).astype(jnp.bfloat16), np.float32) for v in (g, u))
        h = ref_moe.swiglu(jnp.asarray(g), jnp.asarray(u), cfg.swiglu_limit)
        y[rows] = np.asarray(h) * np.asarray(route_w)[rows, None]
    return jnp.asarray(y).astype(out.dtype)


def _emulate_dequant(xv, xs, rows, out):
    if rows is not None:
        xv, xs = xv[rows], xs[rows]
    t = NVFP4Tensor(xv, jax.lax.bitcast_convert_type(xs, jnp.float8_e4m3fn), jnp.ones(xv.shape[0], jnp.float32))
    return (ref_gemm._dequant_unscaled(t) * SHIFT).astype(out.dtype)


def _emulate_quantize_decoded(x, norm_weight, eps, outs):
    """QuantizeNvfp4Sm90(decoded=True)'s contract: the reference quantize, values written as
    ``e2m1 * e4m3 * 2**-8`` BF16, scale bytes, global scales."""
    assert norm_weight is None and eps is None
    q = ref_gemm.quantize_nvfp4(x)
    xd = (ref_gemm._dequant_unscaled(q) * SHIFT).astype(outs[0].dtype)
    return xd, jax.lax.bitcast_convert_type(q.scales, jnp.uint8), q.global_scale


def _fake_cutlass_call(kernel, output_shape_dtype, **_):
    def run(*args):
        if isinstance(kernel, kq.QuantizeNvfp4Sm90):
            assert kernel.decoded, "only the decoded quantize is emulated"
            return _emulate_quantize_decoded(*args, output_shape_dtype)
        if isinstance(kernel, kw.DequantRowsSm90):
            return _emulate_dequant(*args, output_shape_dtype)
        assert isinstance(kernel, kw.GemmPrefillSm90), kernel
        return _emulate_gemm(kernel.cfg, *args, output_shape_dtype)
    return run


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(kw, "cutlass_call", _fake_cutlass_call)
    monkeypatch.setattr(km, "cutlass_call", _fake_cutlass_call)
    monkeypatch.setattr(kq, "cutlass_call", _fake_cutlass_call)
    monkeypatch.setattr(km, "quantize_nvfp4", lambda x: ref_gemm.quantize_nvfp4(x))
    monkeypatch.setenv(kg.PREFILL_ENV, "ws")


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), "non-finite output (a row no tile wrote?)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("act_nvfp4", [True, False])
def test_dense_wiring(rng, emulated, act_nvfp4):
    w = quantize(jnp.asarray(rng.standard_normal((256, 512)) * 0.02, jnp.float32))
    x = activations(rng, 70, 512)
    x = ref_gemm.quantize_nvfp4(x) if act_nvfp4 else x
    got = kg.nvfp4_gemm(x, tile_weight(w))  # routed to gemm_ws by the variable
    assert _rel_err(got, ref_gemm.nvfp4_gemm(x, w)) < 1e-2


@pytest.mark.parametrize("m", [70, 300])
def test_linear_wiring(rng, emulated, monkeypatch, m):
    """Recipe nvfp4's linear on the ws path: X quantized straight to its decoded form (no codes, no
    ``dequant_rows``), its per-row global scales to the epilogue; equal to the composition it replaces."""
    w = quantize(jnp.asarray(rng.standard_normal((256, 512)) * 0.02, jnp.float32))
    x = activations(rng, m, 512)
    calls = []
    monkeypatch.setattr(kw, "dequant_rows", lambda *a: calls.append("dequant_rows"))
    got = kg.nvfp4_linear(x, tile_weight(w))
    assert calls == []
    assert _rel_err(got, ref_gemm.nvfp4_linear(x, w)) < 1e-2


@pytest.mark.parametrize("t,experts,skew,quantize_activations,tail", [
    (100, 4, False, True, False), (150, 6, True, False, False), (150, 6, True, True, False),
    (600, 4, False, True, True), (500, 6, True, False, True), (600, 4, False, True, "split"),
    (500, 6, True, False, "split")])
def test_moe_wiring(rng, emulated, monkeypatch, t, experts, skew, quantize_activations, tail):
    """Both grouped GEMMs through ``grouped_gemm_ws`` (> 64 rows per expert). ``skew``: expert 5 gets no
    rows and expert 0 most of them, so tiles are partial and some table entries empty. Recipe nvfp4: L2's
    input quantized straight to its decoded form. ``tail``: ``NVFP4JAX_MOE_WS_TAIL=64`` with > 256 rows per
    expert (256-row tiles taking up to 320 rows: the tile table's capacity, which the emulator checks);
    ``split``: ``NVFP4JAX_GEMM_WS_PRODUCERS=2``, whose 256-row tiles are two halves of 128 (capacity 256)."""
    if tail is True:
        monkeypatch.setenv(km.WS_TAIL_ENV, "64")
    if tail == "split":
        monkeypatch.setenv(kw.PRODUCERS_ENV, "2")
        cfg = km.choose_grouped_prefill_config(t * 3, experts, quantize_activations, gate_up=True, swiglu_limit=10.0)
        assert (cfg.tile_t, cfg.tail, cfg.producers) == (kw.SPLIT, kw.SPLIT, 2), cfg
    tables = []
    table_fn = km.tile_table
    monkeypatch.setattr(km, "tile_table", lambda *a: tables.append(table_fn(*a)) or tables[-1])
    decoded = []
    monkeypatch.setattr(km, "quantize_nvfp4_decoded", lambda h: decoded.append(h.shape) or kq.quantize_nvfp4_decoded(h))
    dim, inter = 256, 256
    keys = jax.random.split(jax.random.key(1), 3)
    mk = lambda k, s: jax.vmap(quantize)(0.02 * jax.random.normal(k, s, jnp.float32))  # noqa: E731
    w1, w3 = mk(keys[0], (experts, inter, dim)), mk(keys[1], (experts, inter, dim))
    w2 = mk(keys[2], (experts, dim, inter))
    x = activations(rng, t, dim) * jnp.bfloat16(0.25)
    logits = jnp.asarray(rng.standard_normal((t, experts)), jnp.float32)
    bias = jnp.zeros(experts, jnp.float32)
    if skew:
        bias = bias.at[0].set(1e4).at[experts - 1].set(-1e4)
    topk = 3
    weights, ids = ref_moe.route(logits, topk, 1.5, bias=bias)
    assert -(-(t * topk) // experts) > 64  # the prefill regime that takes the ws path
    kw_ = {"swiglu_limit": 10.0, "quantize_activations": quantize_activations}
    got = km.moe_experts(x, weights, ids, *(tile_weight(w) for w in (w1, w3, w2)), **kw_)
    want = ref_moe.moe_experts(x, weights, ids, w1, w3, w2, **kw_)
    assert _rel_err(got, want) < 1e-2
    assert decoded == ([(t * topk, inter)] if quantize_activations else [])
    # with the tail, some CTAs take more than 256 rows (both GEMMs); without it none does
    assert len(tables) == 2 and all((int(jnp.max(tb[:, 2])) > 256) == (tail is True) for tb in tables), tables
    if tail == "split":  # 256-row entries: both halves ran
        assert all(int(jnp.max(tb[:, 2])) > kw.SPLIT for tb in tables), tables

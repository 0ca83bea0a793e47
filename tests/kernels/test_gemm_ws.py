"""Warp-specialized prefill GEMM (``nvfp4jax.kernels.gemm_ws``) vs nvfp4jax.ref, and its X decoder.

Same gates as ``test_gemm.py`` (cosine difference < 1e-5, the two-reference rule against a float32
oracle of the same quantized math, outputs poisoned first); m values that leave partial token tiles, both recipes,
token tiles of 64, 128 and 256 (``choose_prefill_config``), one CTA per tile and persistent, W loaded to
registers (``regs``) and by TMA into shared slots (``tma``, ``NVFP4JAX_GEMM_WS_W``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4jax.ref import gemm as ref
from tests.conftest import assert_bitwise_equal
from tests.kernels._gpu import activations, fresh_jit, poison_device_memory

pytestmark = pytest.mark.gpu
cutlass = pytest.importorskip("cutlass")
from nvfp4jax.kernels import gemm as kg, gemm_ws as kw  # noqa: E402
from tests.kernels.test_gemm import _check, _weights  # noqa: E402


CASES = [  # (n, k, m); token tiles (choose_prefill_config): 64, 64, 64, 128, 256, 256, 256, 256, 256
    (128, 1024, 65), (512, 4096, 200), (1024, 4096, 257), (4096, 1024, 512), (4096, 2048, 1000), (1536, 7168, 4096),
    (4096, 4096, 4096), (32768, 1024, 4096), (7168, 16384, 300),
]


#: persistent: 2 tiles (2 CTAs), 512 and 4096 tiles over 132 CTAs (several per CTA), 168 tiles (1-2 per CTA)
PERSISTENT_CASES = [(128, 1024, 65), (4096, 4096, 4096), (32768, 1024, 4096), (7168, 16384, 300)]


#: W by TMA (session 8): token tiles 64 / 128 / 256, k = 1024 (one raw slot refill) to 16384, a persistent pair
TMA_CASES = [(128, 1024, 65, "ws"), (4096, 1024, 512, "ws"), (4096, 4096, 4096, "ws"), (7168, 16384, 300, "ws"),
             (32768, 1024, 4096, "ws"), (4096, 4096, 4096, "ws-persistent"), (7168, 16384, 300, "ws-persistent")]


@pytest.mark.parametrize("n,k,m,mode,w_mode", [(*c, "ws", "regs") for c in CASES]
                         + [(*c, "ws-persistent", "regs") for c in PERSISTENT_CASES] + [(*c, "tma") for c in TMA_CASES])
@pytest.mark.parametrize("act_nvfp4", [True, False])
def test_gemm_ws(rng, monkeypatch, n, k, m, mode, w_mode, act_nvfp4):
    monkeypatch.setenv(kg.PREFILL_ENV, mode)
    monkeypatch.setenv(kw.W_ENV, w_mode)
    cfg = kw.choose_prefill_config(m, n, act_nvfp4)
    assert cfg.persistent == (mode == "ws-persistent") and cfg.w_tma == (w_mode == "tma")
    w = _weights(rng, n, k)
    x = activations(rng, m, k)
    x = ref.quantize_nvfp4(x) if act_nvfp4 else x
    _check(x, w, f"{cfg} {m=} {n=} {k=}", fresh_jit(kw.nvfp4_gemm_ws))  # traced afresh: reads the variable


@pytest.mark.parametrize("m,k", [(1, 1024), (70, 4096), (4096, 7168)])
def test_dequant_rows_bitwise(rng, m, k):
    """NVFP4 X -> BF16 ``e2m1 * e4m3 * 2**-8``, exact: equal bit for bit to the reference decode; with a
    row map (the MoE's L1 gather: every row several times, in shuffled order), equal to that decode's rows."""
    x = ref.quantize_nvfp4(activations(rng, m, k))
    want = (ref._dequant_unscaled(x) * 2.0**-kw.DECODE_SHIFT).astype(jnp.bfloat16)
    poison_device_memory()
    assert_bitwise_equal(jax.jit(kw.dequant_rows)(x), want, f"dequant_rows {m=} {k=}")
    rows = jnp.asarray(rng.permutation(np.repeat(np.arange(m), 6)), jnp.int32)
    poison_device_memory()
    assert_bitwise_equal(jax.jit(kw.dequant_rows)(x, rows), want[rows], f"dequant_rows gather {m=} {k=}")


def test_nvfp4_gemm_routes_prefill_to_ws(rng, monkeypatch):
    """With ``NVFP4JAX_GEMM_PREFILL=ws`` the GEMM entry point runs this kernel for m > 64 (same bits)."""
    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    w = _weights(rng, 1024, 4096)
    x = ref.quantize_nvfp4(activations(rng, 300, 4096))
    assert_bitwise_equal(fresh_jit(kg.nvfp4_gemm)(x, w), fresh_jit(kw.nvfp4_gemm_ws)(x, w), "routed vs direct")


@pytest.mark.parametrize("m,n,k", [(65, 128, 1024), (300, 1024, 4096), (4096, 2048, 4096)])
def test_nvfp4_linear_on_ws(rng, monkeypatch, m, n, k):
    """Recipe nvfp4's linear on gemm_ws quantizes X straight to its decoded form: bit for bit the result of
    the NVFP4 quantize, ``dequant_rows`` and the same kernel; and within the GEMM gates of the reference."""
    from nvfp4jax.kernels import quantize as kq

    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    w = _weights(rng, n, k)
    x = activations(rng, m, k)
    assert kg.uses_ws_prefill(m, n, jnp.bfloat16)
    want = fresh_jit(lambda x, w: kw.nvfp4_gemm_ws(kq.quantize_nvfp4(x), w))(x, w)
    poison_device_memory()
    assert_bitwise_equal(fresh_jit(kg.nvfp4_linear)(x, w), want, f"linear vs quantize + gemm_ws {m=} {n=} {k=}")
    # the gates against the reference GEMM of the kernel quantize's NVFP4 X (bitwise the oracle's)
    _check(kq.quantize_nvfp4(x), w, f"linear {m=} {n=} {k=}", lambda _, wt: fresh_jit(kg.nvfp4_linear)(x, wt))


@pytest.mark.parametrize("model,recipe,t,mode,w_mode", [
    ("flash", "nvfp4", 200, "ws", "regs"), ("flash", "w4a16", 1000, "ws", "regs"), ("pro", "nvfp4", 1000, "ws", "regs"),
    ("flash", "nvfp4", 1000, "ws-persistent", "regs"), ("flash", "nvfp4", 200, "ws", "tma"),
    ("flash", "w4a16", 1000, "ws", "tma"), ("pro", "nvfp4", 1000, "ws", "tma")])
def test_moe_on_ws_prefill(rng, monkeypatch, model, recipe, t, mode, w_mode):
    """The MoE layer with both grouped GEMMs on this kernel (``NVFP4JAX_GEMM_PREFILL=ws``, more than 64
    rows per expert): the gate_up SwiGLU epilogue across the two consumer warpgroups, expert tiles from
    the tile table with partial last tiles, rows gathered before the TMA loads; the MoE test gates."""
    from tests.kernels import test_moe as tm

    monkeypatch.setenv(kg.PREFILL_ENV, mode)
    monkeypatch.setenv(kw.W_ENV, w_mode)
    x, weights, expert_ids = tm._inputs(rng, model, t)
    tm._check(f"{mode} W {w_mode} {model} {recipe} {t=}", model, x, weights, expert_ids, tm.RECIPES[recipe],
              fresh_jit(tm.km.moe_experts, static_argnames=tm._STATIC))  # traced afresh: reads the variable


@pytest.mark.parametrize("w_mode", kw.W_MODES)
def test_moe_on_ws_whole_pro_bank(rng, monkeypatch, w_mode):
    """V4-Pro's MoE with all 384 experts: W1 and W3 hold 4.2e9 code bytes each, past 2**31 (session 10:
    W by TMA flattened the bank with an Int32 size that wrapped there, CUDA_ERROR_ILLEGAL_INSTRUCTION at
    T = 16384; the other tests hold 8 Pro experts). The bank is this file's 8 Pro experts repeated 48 times
    (14 GB on the device), so expert ``e`` computes as expert ``e % 8``: the reference runs on the 8 with
    the ids taken mod 8. 4400 tokens routed over all 384 (~69 rows per expert: this kernel takes more than
    64; most rows on experts past 195, whose W1 bytes start past 2**31)."""
    from tests.kernels import test_moe as tm

    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    monkeypatch.setenv(kw.W_ENV, w_mode)
    experts, reps = 384, 48
    x, _, _ = tm._inputs(rng, "pro", 4400)
    logits = jnp.asarray(rng.standard_normal((4400, experts)), jnp.float32)
    weights, expert_ids = tm.ref.route(logits, tm.TOPK, tm.MODELS["pro"][3], bias=jnp.zeros(experts, jnp.float32))
    assert int(jnp.sum(expert_ids > 195)) > expert_ids.size // 3
    bank = tuple(jax.tree.map(lambda a: jnp.concatenate([a] * reps), w) for w in tm._tiled_experts("pro"))
    assert bank[0].values.shape[0] == experts and bank[0].values.nbytes > 2**31
    tm._check(f"whole Pro bank, W {w_mode}", "pro", x, weights, expert_ids, True,
              fresh_jit(tm.km.moe_experts, static_argnames=tm._STATIC), tiled=bank, ref_ids=expert_ids % 8)


@pytest.mark.parametrize("model,recipe,w_mode", [("pro", "nvfp4", "tma"), ("flash", "w4a16", "tma"),
                                                  ("pro", "nvfp4", "regs")])
def test_moe_on_ws_tail(rng, monkeypatch, model, recipe, w_mode):
    """``NVFP4JAX_MOE_WS_TAIL=64`` (forced on; ``moe.ws_tail_auto`` would not pick it here): 256-row tiles take up to 320 rows, the last 64 in a
    second wgmma (N = 64) on their own B stages; T = 1000 gives Pro's 8 test experts ~750 rows (tiles of
    320, 320 and the rest) and Flash's 16 ~375 (320 and the rest), so some CTAs run the tail and some not.
    The MoE test gates."""
    from tests.kernels import test_moe as tm

    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    monkeypatch.setenv(kw.W_ENV, w_mode)
    monkeypatch.setenv(tm.km.WS_TAIL_ENV, "64")
    experts = tm.MODELS[model][0]
    cfg = tm.km.choose_grouped_prefill_config(6000, experts, recipe == "nvfp4", gate_up=True, swiglu_limit=10.0)
    assert (cfg.tile_t, cfg.tail) == (256, 64), cfg
    x, weights, expert_ids = tm._inputs(rng, model, 1000)
    tm._check(f"tail W {w_mode} {model} {recipe}", model, x, weights, expert_ids, tm.RECIPES[recipe],
              fresh_jit(tm.km.moe_experts, static_argnames=tm._STATIC))


#: two decode warpgroups (session 11): tiles of 64 / 128 (no split) and 256 (two wgmma of N = 128, the second
#: only in CTAs with more than 128 rows: m = 300 has one such CTA row and one of 44 rows), k = 1024 to 16384
TWO_PRODUCER_CASES = [(128, 1024, 65), (4096, 1024, 512), (4096, 4096, 4096), (32768, 1024, 4096), (7168, 16384, 300)]


@pytest.mark.parametrize("n,k,m", TWO_PRODUCER_CASES)
@pytest.mark.parametrize("act_nvfp4", [True, False])
def test_gemm_ws_two_producers(rng, monkeypatch, n, k, m, act_nvfp4):
    """``NVFP4JAX_GEMM_WS_PRODUCERS=2`` (opt-in): each of two producer warpgroups decodes one 64-row pass of
    the CTA's W; 256-row tiles as ``tile_t = tail = 128``. The GEMM test gates."""
    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    monkeypatch.setenv(kw.W_ENV, "tma")
    monkeypatch.setenv(kw.PRODUCERS_ENV, "2")
    cfg = kw.choose_prefill_config(m, n, act_nvfp4)
    assert cfg.producers == 2 and (cfg.tail == kw.SPLIT) == (kw.rows_per_tile(cfg) == 256), cfg
    w = _weights(rng, n, k)
    x = activations(rng, m, k)
    x = ref.quantize_nvfp4(x) if act_nvfp4 else x
    _check(x, w, f"{cfg} {m=} {n=} {k=}", fresh_jit(kw.nvfp4_gemm_ws))


@pytest.mark.parametrize("model,recipe,t", [("flash", "nvfp4", 1000), ("pro", "w4a16", 1000), ("flash", "w4a16", 200)])
def test_moe_on_ws_two_producers(rng, monkeypatch, model, recipe, t):
    """The MoE layer on gemm_ws with two producer warpgroups (split 256-row tiles: Flash's 16 test experts get
    ~375 rows at T = 1000, Pro's 8 ~750; T = 200: 75 rows, 128-row tiles); the MoE test gates."""
    from tests.kernels import test_moe as tm

    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    monkeypatch.setenv(kw.W_ENV, "tma")
    monkeypatch.setenv(kw.PRODUCERS_ENV, "2")
    x, weights, expert_ids = tm._inputs(rng, model, t)
    tm._check(f"two producers {model} {recipe} {t=}", model, x, weights, expert_ids, tm.RECIPES[recipe],
              fresh_jit(tm.km.moe_experts, static_argnames=tm._STATIC))


@pytest.mark.parametrize("producers", ["1", "2"])
@pytest.mark.parametrize("recipe", ["nvfp4", "w4a16"])
def test_moe_on_ws_few_rows(rng, monkeypatch, recipe, producers):
    """``NVFP4JAX_MOE_WS_MIN_ROWS=17`` (opt-in, session 12): the MoE on this kernel at ~48 rows per expert
    (T = 128 on the 16 test experts, under the default ``auto``), 128-row tiles mostly half empty, with one
    and two decode warpgroups; the MoE test gates."""
    from tests.kernels import test_moe as tm

    monkeypatch.delenv(kg.PREFILL_ENV, raising=False)
    monkeypatch.setenv(tm.km.WS_MIN_ROWS_ENV, "17")
    monkeypatch.setenv(kw.W_ENV, "tma")
    monkeypatch.setenv(kw.PRODUCERS_ENV, producers)
    e, d, inter, _ = tm.MODELS["flash"]
    assert tm.km.uses_ws(128 * tm.TOPK, e, 2 * inter) and tm.km.uses_ws(128 * tm.TOPK, e, d)
    x, weights, expert_ids = tm._inputs(rng, "flash", 128)
    tm._check(f"ws few rows {recipe} producers={producers}", "flash", x, weights, expert_ids, tm.RECIPES[recipe],
              fresh_jit(tm.km.moe_experts, static_argnames=tm._STATIC))


def test_moe_on_ws_prefill_one_expert_gets_every_row(rng, monkeypatch):
    """All 1200 rows on expert 0 (the others empty): 10 tiles of 128 on one expert (the last partial), the
    other tile-table entries empty (their CTAs exit at once)."""
    from tests.kernels import test_moe as tm

    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    x, weights, expert_ids = tm._inputs(rng, "flash", 200)
    tm._check("ws all rows on expert 0", "flash", x, weights, jnp.zeros_like(expert_ids), True,
              fresh_jit(tm.km.moe_experts, static_argnames=tm._STATIC))

"""CPU (CI) check: the kernels compile for sm_90a without a GPU and use the intended instructions.

Each kernel is compiled through the same path ``cutlass_call`` uses (``jit_wrapper`` over the
FFI buffer specs), with ``--gpu-arch sm_90a``; the PTX must contain wgmma (GEMM) and correctly
rounded division (quantize), so kernel code cannot rot between GPU runs.
"""

import collections
import dataclasses
import functools
import operator
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

cutlass = pytest.importorskip("cutlass")
import cuda.bindings.driver as cuda  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass.jax import TensorSpec  # noqa: E402
from cutlass.jax.compile import Arg, FunctionSpec, jit_wrapper  # noqa: E402
from cutlass.jax.types import default_tensor_spec  # noqa: E402

from nvfp4jax.kernels import gemm as kg, gemm_ws as kw, quantize as kq  # noqa: E402

S = jax.ShapeDtypeStruct


def compile_ptx(launcher, inputs, outputs, out_spec, dump_dir) -> str:
    present = [t for t in inputs if t is not None]
    in_args = tuple(Arg(i, t.shape, t.dtype, default_tensor_spec(t)) for i, t in enumerate(present))
    out_args = tuple(Arg(i, t.shape, t.dtype, out_spec or default_tensor_spec(t)) for i, t in enumerate(outputs))
    pathlib.Path(dump_dir).mkdir(parents=True, exist_ok=True)  # else __ptx__ is the would-be file's path
    opts = f"--gpu-arch sm_90a --keep-ptx --dump-dir {dump_dir}"
    spec = FunctionSpec(
        in_args, jax.tree.structure(tuple(inputs)), out_args, jax.tree.structure(tuple(outputs)), (),
        tuple(a.spec for a in in_args), tuple(a.spec for a in out_args), opts, False, (),
    )
    compiled = cute.compile(jit_wrapper, cuda.CUstream(0), *spec.get_compile_args(), wrapped_fn=launcher, spec=spec, options=opts)
    ptx = compiled.__ptx__
    assert ".target sm_90a" in ptx, f"not PTX text: {ptx[:200]!r}"
    assert not nested_elects(ptx), f"elect.sync inside an elected region at PTX lines {nested_elects(ptx)}"
    return ptx


def nested_elects(ptx: str) -> list[int]:
    """PTX lines of ``elect.sync`` instructions inside a region that one elected lane runs alone.

    CuTeDSL compiles ``with cute.arch.elect_one():`` and each TMA ``cute.copy`` to ``elect.sync %r|%p, -1;
    not.pred %q, %p; @%q bra END;``: the lanes not elected jump to ``END``. An ``elect.sync`` over the full
    warp reached by that lone lane waits for the other 31: session 8's W-by-TMA producer issued its copies
    inside ``elect_one`` and hung on the H200 (session 9). The kernels' code is structured, so a linear
    scan from such a branch to its label covers the region."""
    lines = ptx.splitlines()
    region_end, nested = None, []
    for i, line in enumerate(lines):
        text = line.strip()
        if region_end is not None and text == region_end + ":":
            region_end = None
        elect = re.match(r"elect\.sync\s+%r\d+\|(%p\d+),", text)
        if elect is None:
            continue
        if region_end is not None:
            nested.append(i + 1)
            continue
        neg = re.match(rf"not\.pred\s+(%p\d+), {re.escape(elect.group(1))};", lines[i + 1].strip())
        branch = neg and re.match(rf"@{re.escape(neg.group(1))} bra(?:\.uni)?\s+(\S+);", lines[i + 2].strip())
        if branch:
            region_end = branch.group(1)
    return nested


def test_nested_elects_finds_a_copy_inside_elect_one():
    """The checker every compile test applies (``compile_ptx``) flags session 8's hang and passes the fix."""
    region = ["elect.sync %r1|%p1, -1;", "not.pred %p2, %p1;", "@%p2 bra $L__BB0_9;"]
    copy = ["elect.sync %r2|%p3, -1;", "not.pred %p4, %p3;", "@%p4 bra $L__BB0_8;", "cp.async.bulk.tensor.2d;",
            "$L__BB0_8:"]
    arm = ["mbarrier.arrive.expect_tx.shared.b64 %rd1, [%r3], 9216;", "$L__BB0_9:"]
    assert nested_elects("\n".join(region + copy + arm)) == [4]
    assert nested_elects("\n".join(region + arm + copy)) == []


def ptxas_path() -> str | None:
    """ptxas (CUDA 13: ``$PTXAS``, on the PATH, or /usr/local/cuda-13.0), or None where there is none."""
    import os
    import shutil

    ptxas = os.environ.get("PTXAS") or shutil.which("ptxas") or "/usr/local/cuda-13.0/bin/ptxas"
    return ptxas if os.path.exists(ptxas) else None


def assemble_sm90a(ptx: str, workdir, ptxas: str) -> str:
    """``ptx`` assembled for sm_90a into ``workdir/k.cubin``; returns ptxas's ``-v`` report. CuTeDSL writes
    a newer PTX ISA version than ptxas 13.0 reads; the kernels use nothing past 9.0, so it is lowered."""
    import subprocess
    from pathlib import Path

    src = Path(workdir) / "k.ptx"
    src.write_text(re.sub(r"^\.version 9\.\d+", ".version 9.0", ptx, flags=re.M))
    return subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(workdir) / "k.cubin")],
                          capture_output=True, text=True, check=True).stderr


def _ptxas_fits(ptx: str, tmp_path, max_regs: int) -> None:
    """Where ptxas is installed: the PTX assembles for sm_90a within ``max_regs`` registers per thread,
    without spills."""
    ptxas = ptxas_path()
    if ptxas is None:
        return
    out = assemble_sm90a(ptx, tmp_path, ptxas)
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    assert regs <= max_regs and "0 bytes spill stores" in out, out


def decodes_without_conversions(ops: collections.Counter) -> bool:
    """The NVFP4 -> BF16 decode is inline PTX (prmt, mul.lo, bf16x2 multiplies) with no conversion from
    FP8/FP16 left in the kernel (those once bounded it: 16 per clock per SM; the epilogue's f32 -> bf16
    output conversions remain)."""
    return (ops["prmt.b32"] > 0 and ops["mul.rn.bf16x2"] > 0
            and not any(op.startswith("cvt") and op.endswith((".f16", ".e4m3x2")) for op in ops))


def opcodes(ptx: str) -> collections.Counter:
    lines = (line.split() for line in ptx.splitlines())
    return collections.Counter(w[0] for w in lines if w and not w[0].startswith(("/", ".", "{", "}", "$", "@", ")")))


def _tiled_w(lead, n, k):
    """Codes and scale bytes of a weight in the kernels' tile layout (``formats.nvfp4.tile_weight``)."""
    tiles = (*lead, n // 64, k // 128, 64)
    return S((*tiles, 64), jnp.uint8), S((*tiles, 8), jnp.uint8)


def _dense_io(cfg, m, n, k):
    if cfg.act_nvfp4:
        ins = (S((m, k // 2), jnp.uint8), S((m, k // 16), jnp.uint8), S((m,), jnp.float32))
    else:
        ins = (S((m, k), jnp.bfloat16), None, None)
    ins += _tiled_w((), n, k) + (S((1,), jnp.float32),) + kg._NO_GROUPS
    if cfg.split > 1:
        return ins, (S((cfg.split, m, n), jnp.float32),), TensorSpec(mode=(2, 1, 0))
    return ins, (S((m, n), jnp.bfloat16),), TensorSpec(mode=(1, 0))


def _grouped_io(cfg, t, rows, experts, n, k, gate_up):
    from nvfp4jax.kernels import moe as km

    n_out = 2 * n if gate_up else n
    x_rows = t if gate_up else rows
    if cfg.act_nvfp4:
        ins = (S((x_rows, k // 2), jnp.uint8), S((x_rows, k // 16), jnp.uint8), S((x_rows,), jnp.float32))
    else:
        ins = (S((x_rows, k), jnp.bfloat16), None, None)
    w = _tiled_w((experts,), n, k) + (S((experts,), jnp.float32),)
    ins += w + (w if gate_up else (None,) * 3)
    ins += (S((rows,), jnp.int32) if gate_up else None, S((km.num_tiles(rows, experts, cfg.tile_t), 3), jnp.int32),
            S((rows,), jnp.float32) if gate_up else None)
    if cfg.swiglu_limit is not None:
        return ins, (S((rows, n), jnp.bfloat16),), TensorSpec(mode=(1, 0))
    if cfg.split > 1:
        return ins, (S((cfg.split, rows, n_out), jnp.float32),), TensorSpec(mode=(2, 1, 0))
    return ins, (S((rows, n_out), jnp.bfloat16),), TensorSpec(mode=(1, 0))


@pytest.mark.parametrize("k,fused", [(1024, False), (7168, False), (4096, True), (16384, True)])
def test_quantize_compiles_sm90a(tmp_path, k, fused):
    m = 5
    ins = (S((m, k), jnp.bfloat16), S((k,), jnp.bfloat16) if fused else None, S((1,), jnp.float32) if fused else None)
    outs = (S((m, k // 2), jnp.uint8), S((m, k // 16), jnp.uint8), S((m,), jnp.float32))
    ops = opcodes(compile_ptx(kq._kernel(k, fused), ins, outs, None, tmp_path))
    assert ops["div.rn.f32"] >= 16, "correctly rounded division (per block; per value on the slow path)"
    assert ops["fma.rn.f32"] >= 2 and ops["add.rn.f32"] >= 1, "the division-free fast path (e2m1_code_of_quotient)"
    assert not any(op.startswith(("div.approx", "div.full", "rcp.approx")) for op in ops), ops
    assert ops["cvt.rn.satfinite.e4m3x2.f32"] >= 1 and ops["ld.global.v4.b32"] >= 2
    assert (ops["rsqrt.approx.f32"] >= 1) == fused


@pytest.mark.parametrize("k,fused", [(4096, False), (7168, True)])
def test_quantize_decoded_compiles_sm90a(tmp_path, k, fused):
    """The decoded quantize (recipe nvfp4's prefill on gemm_ws): the codes go through the GEMMs' decoder
    (``prmt`` + ``mul.rn.bf16x2``, no conversions) and leave as BF16 in 16-byte stores, not as packed
    bytes; the quantize itself as in the plain kernel (correctly rounded divisions)."""
    m = 5
    ins = (S((m, k), jnp.bfloat16), S((k,), jnp.bfloat16) if fused else None, S((1,), jnp.float32) if fused else None)
    outs = (S((m, k), jnp.bfloat16), S((m, k // 16), jnp.uint8), S((m,), jnp.float32))
    ops = opcodes(compile_ptx(kq._kernel(k, fused, True), ins, outs, None, tmp_path))
    plain = opcodes(compile_ptx(kq._kernel(k, fused), ins, (S((m, k // 2), jnp.uint8),) + outs[1:],
                                None, tmp_path / "plain"))
    assert ops["div.rn.f32"] >= 16 and ops["cvt.rn.satfinite.e4m3x2.f32"] >= 1
    assert ops["prmt.b32"] >= 8 and ops["mul.rn.bf16x2"] >= 8 and plain["mul.rn.bf16x2"] == 0
    assert ops["st.global.v4.b32"] >= 2 and plain["st.global.v4.b32"] == 0, (ops, plain)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (64, 1536, 7168), (200, 512, 4096), (4096, 4096, 4096)])
@pytest.mark.parametrize("act_nvfp4", [True, False])
def test_gemm_compiles_sm90a(tmp_path, monkeypatch, m, n, k, act_nvfp4):
    """The shared-memory stage path (every prefill tile; decode tiles with ``NVFP4JAX_GEMM_W_REGS=0``):
    W and X decoded into BF16 stages with 16-byte shared stores, one wgmma shape."""
    monkeypatch.setenv(kg.W_REGS_ENV, "0")
    cfg = kg.choose_config(m, n, k, act_nvfp4)
    assert not cfg.w_regs
    assert kg.GemmNvfp4Sm90.can_implement(cfg), cfg
    ops = opcodes(compile_ptx(kg._kernel(cfg), *_dense_io(cfg, m, n, k), tmp_path))
    wgmma = [op for op in ops if op.startswith("wgmma.mma_async")]
    assert wgmma == [f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"], wgmma
    assert decodes_without_conversions(ops) and ops["st.shared.v4.b32"] > 0 and ops["ld.global.v4.b32"] > 0


def test_gemm_decode_split_not_a_power_of_two_compiles_sm90a(tmp_path):
    """A decode K split of 7 (V4-Pro wkv, k = 7168: 56 K tiles; ``choose_config`` stops at 8, the GPU test
    ``test_gemm_decode_split_not_a_power_of_two`` and stage ``tune-split`` force others) builds the same
    kernel as split 8: the same wgmma count per K tile, float32 partials out."""
    m, n, k = 1, 512, 7168
    cfg8 = kg.choose_config(m, n, k, False)
    assert cfg8.split == 8 and cfg8.w_regs, cfg8
    cfg7 = dataclasses.replace(cfg8, split=7)
    assert kg.GemmNvfp4Sm90.can_implement(cfg7)
    ops7 = opcodes(compile_ptx(kg._kernel(cfg7), *_dense_io(cfg7, m, n, k), tmp_path / "7"))
    ops8 = opcodes(compile_ptx(kg._kernel(cfg8), *_dense_io(cfg8, m, n, k), tmp_path / "8"))
    mma = "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16"
    assert ops7[mma] == ops8[mma] > 0 and ops7["st.global.b32"] == ops8["st.global.b32"] > 0, (ops7, ops8)


@pytest.mark.parametrize("m,n,k,act_nvfp4,tile_t", [(4096, 4096, 4096, False, 256), (200, 512, 7168, True, 64),
                                                     (512, 4096, 4096, True, 128), (16384, 32768, 1024, True, 256)])
@pytest.mark.parametrize("mode,w_mode", [("ws", "regs"), ("ws-persistent", "regs"), ("ws", "tma"),
                                         ("ws-persistent", "tma")])
def test_gemm_ws_compiles_sm90a(tmp_path, monkeypatch, m, n, k, act_nvfp4, tile_t, mode, w_mode):
    """The warp-specialized prefill kernel (one CTA per tile, or persistent; W to registers or by TMA):
    X by TMA into an mbarrier pipeline, registers moved from the producer warpgroup to the consumers
    (setmaxnreg), one wgmma shape, W decoded without conversions, Y leaving in 16-byte stores. W by TMA:
    four more 2D tensor copies (codes and scales of two 64-row tiles), its reads from shared memory, no
    global loads of W left (with W in registers they are 16-byte loads)."""
    monkeypatch.setenv(kg.PREFILL_ENV, mode)
    monkeypatch.setenv(kw.W_ENV, w_mode)
    cfg = kw.choose_prefill_config(m, n, act_nvfp4)
    assert cfg.tile_t == tile_t and cfg.x_scaled == act_nvfp4 and cfg.persistent == (mode == "ws-persistent")
    assert cfg.w_tma == (w_mode == "tma")
    stages = 4 if not cfg.persistent or tile_t < 256 else (2 if cfg.w_tma else 3)
    assert kw.can_implement(cfg) and cfg.stages == stages, cfg
    ins = (S((m, k), jnp.bfloat16), S((m,), jnp.float32) if act_nvfp4 else None) + _tiled_w((), n, k)
    ins += (S((1,), jnp.float32),) + kw._NO_GROUPS
    ptx = compile_ptx(kw.kernel_for(cfg), ins, (S((m, n), jnp.bfloat16),), None, tmp_path)
    ops = opcodes(ptx)
    # the register moves balance through the CTA's pool (an overdrawn increase spins forever)
    dec = int(re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+);", ptx).group(1))
    inc = int(re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+);", ptx).group(1))
    assert (dec, inc) == (kw.PRODUCER_REGS, kw.CONSUMER_REGS) and ".reqntid 384, 1, 1" in ptx
    assert kw.WG * (kw.LAUNCH_REGS - dec) >= 2 * kw.WG * (inc - kw.LAUNCH_REGS)
    _ptxas_fits(ptx, tmp_path, kw.LAUNCH_REGS)
    wgmma = [op for op in ops if op.startswith("wgmma.mma_async")]
    assert wgmma == [f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"], wgmma
    assert any(op.startswith("cp.async.bulk.tensor.2d.shared::cta.global") for op in ops), sorted(ops)
    assert ops["setmaxnreg.dec.sync.aligned.u32"] == 1 and ops["setmaxnreg.inc.sync.aligned.u32"] == 1
    assert ops["mbarrier.arrive.expect_tx.shared.b64"] > 0 and ops["mbarrier.try_wait.parity.shared.b64"] > 0
    assert decodes_without_conversions(ops) and ops["st.shared.v4.b32"] > 0 and ops["st.global.v4.b32"] > 0
    tma_copies = sum(c for op, c in ops.items() if op.startswith("cp.async.bulk.tensor.2d.shared::cta.global"))
    if cfg.w_tma:  # X in both K tiles of a trip; codes and scales of two blocks: 2 slots' prologue, the refill
        assert tma_copies == 2 + 3 * 4 and ops["ld.shared.v4.b32"] > 0 and ops["bar.sync"] >= 1, ops
        assert not any(op.startswith("ld.global") and op.endswith((".v4.b32", ".v4.u32")) for op in ops), ops
    else:
        assert tma_copies == 2 and ops["ld.global.v4.b32"] > 0


@pytest.mark.parametrize("case", ["dense", "L1-pro-tail", "L2-flash"])
def test_gemm_ws_two_producers_compiles_sm90a(tmp_path, monkeypatch, case):
    """``NVFP4JAX_GEMM_WS_PRODUCERS=2``: two decode warpgroups (512 threads, 128 registers each at launch),
    each decoding one 64-row pass of the CTA's W tile; a 256-row tile runs as two wgmma of N = 128
    (``tile_t = tail = SPLIT``: one N = 256 wgmma needs 154 registers, past the launch's 128); the register
    moves balance (2 x 128 x (128 - 56) = 2 x 128 x (200 - 128)), ptxas fits 128 with no spills, and each
    producer thread decodes half of what one producer's thread does per K tile."""
    from nvfp4jax.kernels import moe as km

    monkeypatch.setenv(kw.W_ENV, "tma")

    def build(producers):
        monkeypatch.setenv(kw.PRODUCERS_ENV, str(producers))
        if case == "dense":
            m, n, k = 16384, 1024, 4096
            cfg = kw.choose_prefill_config(m, n, True)
            ins = (S((m, k), jnp.bfloat16), S((m,), jnp.float32)) + _tiled_w((), n, k)
            return cfg, (ins + (S((1,), jnp.float32),) + kw._NO_GROUPS, (S((m, n), jnp.bfloat16),), None)
        experts, d, inter = (384, 7168, 3072) if case == "L1-pro-tail" else (256, 4096, 2048)
        rows, gate_up = 6 * 16384, case.startswith("L1")
        n, k = (inter, d) if gate_up else (d, inter)
        cfg = km.choose_grouped_prefill_config(rows, experts, True, gate_up=gate_up,
                                               swiglu_limit=10.0 if gate_up else None)
        return cfg, (*_grouped_ws_io(cfg, rows, experts, n, k), None)

    ptxs = {}
    for producers in (1, 2):
        cfg, (ins, outs, extra) = build(producers)
        assert cfg.producers == producers and kw.threads(cfg) == (producers + 2) * kw.WG, cfg
        one_tail = kw.TAIL if case == "L1-pro-tail" else 0  # V4-Pro at T = 16384: moe.ws_tail_auto
        assert (cfg.tile_t, cfg.tail) == ((256, one_tail) if producers == 1 else (kw.SPLIT, kw.SPLIT)), cfg
        assert kw.can_implement(cfg) and kw.rows_per_tile(cfg) == 256 + (one_tail if producers == 1 else 0)
        ptxs[producers] = compile_ptx(kw.kernel_for(cfg), ins, outs, extra, tmp_path / str(producers))
    ptx = ptxs[2]
    dec = int(re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+);", ptx).group(1))
    inc = int(re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+);", ptx).group(1))
    assert (dec, inc) == (kw.PRODUCER_REGS_2, kw.CONSUMER_REGS) and ".reqntid 512, 1, 1" in ptx
    assert kw.launch_regs(cfg) == 128 and 2 * kw.WG * (128 - dec) >= 2 * kw.WG * (inc - 128)
    _ptxas_fits(ptx, tmp_path, 128)
    one, two = opcodes(ptxs[1]), opcodes(ptx)
    wgmma = sorted(op for op in two if op.startswith("wgmma.mma_async"))
    assert wgmma == ["wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"], wgmma
    tma_copies = sum(c for op, c in two.items() if op.startswith("cp.async.bulk.tensor.2d.shared::cta.global"))
    assert tma_copies == 2 + 3 * 4 + 2, two  # X's two boxes in both K tiles of a trip, W's 12 as before
    # the decode's shared stores per producer thread halve (the epilogue's are the consumers')
    assert two["st.shared.v4.b32"] < one["st.shared.v4.b32"] and two["bar.sync"] >= 1, (one, two)
    assert decodes_without_conversions(two) and two["mul.rn.bf16x2"] * 2 == one["mul.rn.bf16x2"], (one, two)
    monkeypatch.setenv(kw.W_ENV, "regs")
    with pytest.raises(ValueError, match="NVFP4JAX_GEMM_WS_PRODUCERS='2'"):
        kw.choose_prefill_config(16384, 1024, True)


def _grouped_ws_io(cfg, rows, experts, n, k):
    """(inputs, outputs) of a grouped gemm_ws call (``GemmPrefillSm90.__call__``) over ``rows`` rows: X, its
    per-row scales (``x_scaled``), W (and W3 for gate_up), the tile table at the config's capacity per
    entry, the routing weights (gate_up); Y."""
    from nvfp4jax.kernels import moe as km

    w = _tiled_w((experts,), n, k) + (S((experts,), jnp.float32),)
    ins = (S((rows, k), jnp.bfloat16), S((rows,), jnp.float32) if cfg.x_scaled else None) + w
    ins += (w if cfg.gate_up else (None,) * 3)
    ins += (S((km.num_tiles(rows, experts, kw.rows_per_tile(cfg)), 3), jnp.int32),)
    ins += (S((rows,), jnp.float32) if cfg.gate_up else None,)
    return ins, (S((rows, n), jnp.bfloat16),)


@pytest.mark.parametrize("stage,act_nvfp4,w_mode", [("L1", True, "regs"), ("L1", False, "regs"), ("L2", True, "regs"),
                                                    ("L1", True, "tma"), ("L2", False, "tma")])
def test_grouped_gemm_ws_compiles_sm90a(tmp_path, monkeypatch, stage, act_nvfp4, w_mode):
    """The MoE GEMMs on the warp-specialized kernel (Flash shapes, T = 16384): expert tiles from the tile
    table, X rows by TMA at each tile's first row; L1 with gate/up paired across the two consumer
    warpgroups and the SwiGLU x routing-weight epilogue (``ex2``), writing BF16 h in 16-byte stores."""
    from nvfp4jax.kernels import moe as km

    experts, d, inter, t = 256, 4096, 2048, 16384
    rows = 6 * t
    gate_up = stage == "L1"
    n, k = (inter, d) if gate_up else (d, inter)
    monkeypatch.setenv(kw.W_ENV, w_mode)
    cfg = km.choose_grouped_prefill_config(rows, experts, act_nvfp4, gate_up=gate_up,
                                           swiglu_limit=10.0 if gate_up else None)
    assert cfg.tile_t == 256 and cfg.grouped and cfg.w_tma == (w_mode == "tma")  # 384 rows per expert: 2 tiles
    ops = opcodes(compile_ptx(kw.kernel_for(cfg), *_grouped_ws_io(cfg, rows, experts, n, k), None, tmp_path))
    wgmma = [op for op in ops if op.startswith("wgmma.mma_async")]
    assert wgmma == ["wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16"], wgmma
    tma_copies = sum(c for op, c in ops.items() if op.startswith("cp.async.bulk.tensor.2d.shared::cta.global"))
    assert tma_copies == (2 + 3 * 4 if cfg.w_tma else 2), ops
    assert decodes_without_conversions(ops) and ops["st.global.v4.b32"] > 0
    assert (ops["ex2.approx.ftz.f32"] > 0) == gate_up


@pytest.mark.parametrize("stage,w_mode", [("L1", "tma"), ("L2", "tma"), ("L1", "regs")])
def test_grouped_gemm_ws_tail_compiles_sm90a(tmp_path, monkeypatch, stage, w_mode):
    """``NVFP4JAX_MOE_WS_TAIL=64`` (V4-Pro's shapes, T = 16384: 256 rows per expert): 256-row tiles take up
    to 64 rows more -- a second wgmma shape (N = 64) beside the first, a second X box by TMA, 3 stages
    with W by TMA (4 with W to registers) -- and the consumers' two accumulators still fit their registers
    (ptxas: no spills)."""
    from nvfp4jax.kernels import moe as km

    experts, d, inter, t = 384, 7168, 3072, 16384
    rows = 6 * t
    gate_up = stage == "L1"
    n, k = (inter, d) if gate_up else (d, inter)
    monkeypatch.setenv(kw.W_ENV, w_mode)
    monkeypatch.setenv(km.WS_TAIL_ENV, "64")
    cfg = km.choose_grouped_prefill_config(rows, experts, True, gate_up=gate_up,
                                           swiglu_limit=10.0 if gate_up else None)
    stages = 3 if w_mode == "tma" else 4  # the most that fit beside the tail's stages (and W's raw slots)
    assert (cfg.tile_t, cfg.tail, cfg.stages, kw.rows_per_tile(cfg)) == (256, 64, stages, 320), cfg
    assert kw.smem_bytes(cfg) <= 227 * 1024 < kw.smem_bytes(dataclasses.replace(cfg, stages=stages + 1))
    ptx = compile_ptx(kw.kernel_for(cfg), *_grouped_ws_io(cfg, rows, experts, n, k), None, tmp_path)
    ops = opcodes(ptx)
    wgmma = sorted(op for op in ops if op.startswith("wgmma.mma_async"))
    assert wgmma == ["wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16",
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"], wgmma
    tma_copies = sum(c for op, c in ops.items() if op.startswith("cp.async.bulk.tensor.2d.shared::cta.global"))
    assert tma_copies == (2 + 3 * 4 if cfg.w_tma else 2) + 2, ops  # the tail's box in both K tiles of a trip
    ptxas = ptxas_path()
    if ptxas is not None:
        assert "0 bytes spill stores" in assemble_sm90a(ptx, tmp_path, ptxas)


def test_w_by_tma_is_the_default(monkeypatch):
    """gemm_ws brings W by TMA unless ``NVFP4JAX_GEMM_WS_W=regs`` (session 10: faster on every measured
    shape); anything else is an error at trace time."""
    monkeypatch.delenv(kw.W_ENV, raising=False)
    assert kw.choose_prefill_config(16384, 1024, True).w_tma
    monkeypatch.setenv(kw.W_ENV, "regs")
    assert not kw.choose_prefill_config(16384, 1024, True).w_tma
    monkeypatch.setenv(kw.W_ENV, "smem")
    with pytest.raises(ValueError, match="NVFP4JAX_GEMM_WS_W='smem'"):
        kw.choose_prefill_config(16384, 1024, True)


class _Int32(int):
    """An int that fails where a DSL Int32 would wrap: what ``cute.size`` of a dynamic shape computes in."""

    def _check(self, v):
        assert -(2**31) <= v < 2**31, f"Int32 overflow: {v}"
        return _Int32(v)

    def __mul__(self, o):
        return self._check(int(self) * int(o))

    __rmul__ = __mul__

    def __floordiv__(self, o):
        return self._check(int(self) // int(o))


@pytest.mark.parametrize("experts,n,k", [(384, 3072, 7168), (384, 7168, 3072), (256, 2048, 4096), (None, 7168, 16384)])
def test_w_tma_byte_rows_stay_in_int32(experts, n, k):
    """W by TMA views W's tile layout as rows of bytes (``gemm_ws.byte_rows``): V4-Pro's W1 / W3 banks
    (384 x 3072 x 7168 / 2 = 4.2e9 code bytes) overflow an Int32 byte count, as ``cute.size`` gave
    (session 10: CUDA_ERROR_ILLEGAL_INSTRUCTION at Pro's MoE on an H200); the rows themselves fit, and
    ``byte_rows`` never forms a larger partial product. Shapes as the kernel sees them, every dimension an
    Int32; the first case's byte count indeed overflows."""
    lead = () if experts is None else (experts,)
    codes = tuple(map(_Int32, (*lead, n // 64, k // 128, 64, 64)))
    scales = tuple(map(_Int32, (*lead, n // 64, k // 128, 64, 8)))
    assert kw.byte_rows(codes, 64) == (experts or 1) * n * k // 2 // 64
    assert kw.byte_rows(scales, 16) == (experts or 1) * n * k // 16 // 16
    if experts == 384 and n == 3072:
        with pytest.raises(AssertionError, match="Int32 overflow"):
            functools.reduce(operator.mul, codes)


@pytest.mark.parametrize("rows,experts", [(6, 256), (384, 384), (1024, 16), (37, 8)])
def test_group_rows_compiles_sm90a(tmp_path, rows, experts):
    """The MoE grouping kernel: stable ranks by ``match.any`` + ``popc``, the scans by shuffles."""
    from nvfp4jax.kernels import group as kgr, moe as km

    tile_t = 16
    tiles = km.num_tiles(rows, experts, tile_t)
    ins = (S((rows,), jnp.int32), S((rows,), jnp.float32))
    i32 = jnp.int32
    outs = (S((rows,), i32), S((rows,), i32), S((experts,), i32), S((rows,), jnp.float32), S((tiles, 3), i32),
            S((rows,), i32))
    ops = opcodes(compile_ptx(kgr._kernel(rows, experts, 6, tile_t, tiles), ins, outs, None, tmp_path))
    assert ops["match.any.sync.b32"] == 1 and ops["popc.b32"] == 2 and ops["shfl.sync.up.b32"] == 10, ops


def test_group_kernel_is_the_default(monkeypatch):
    """The grouping kernel takes 1..1024 rows unless ``NVFP4JAX_MOE_GROUP=xla``; other values are refused."""
    from nvfp4jax.kernels import group as kgr

    monkeypatch.delenv(kgr.ENV, raising=False)
    assert kgr.applies(6, 256) and kgr.applies(kgr.MAX_ROWS, 256) and not kgr.applies(kgr.MAX_ROWS + 1, 256)
    assert not kgr.applies(0, 256)
    monkeypatch.setenv(kgr.ENV, "kernel")
    assert kgr.applies(6, 256)
    monkeypatch.setenv(kgr.ENV, "xla")
    assert not kgr.applies(6, 256)
    monkeypatch.setenv(kgr.ENV, "kernels")
    with pytest.raises(ValueError, match="NVFP4JAX_MOE_GROUP='kernels'"):
        kgr.applies(6, 256)
    with pytest.raises(ValueError, match="1..1024 rows"):
        kgr.group_rows(jnp.zeros((200, 6), jnp.int32), jnp.zeros((200, 6)), 16, 128, 100)


@pytest.mark.parametrize("gather", [False, True])
def test_dequant_rows_compiles_sm90a(tmp_path, gather):
    """The X decoder of the prefill path: 16-byte code loads, no conversions, 16-byte stores; gathering
    (the MoE's L1 input in expert order): one 32-bit row index load more."""
    m, k, r = 300, 4096, 1800
    ins = (S((m, k // 2), jnp.uint8), S((m, k // 16), jnp.uint8), S((r,), jnp.int32) if gather else None)
    out = (S((r if gather else m, k), jnp.bfloat16),)
    ops = opcodes(compile_ptx(kw._dequant_kernel(gather), ins, out, None, tmp_path))
    assert decodes_without_conversions(ops) and ops["ld.global.v4.b32"] == 1 and ops["st.global.v4.b32"] == 4
    assert ops["ld.global.s32"] == int(gather), ops


def test_ws_tail_rule(monkeypatch):
    """``$NVFP4JAX_MOE_WS_TAIL=auto`` (the default): the tail where its saved tiles outweigh its cost on
    every tile. V4-Pro at T = 16384 (256 rows per expert: 1.48 tiles -> 1.00) takes it, V4-Flash at
    T = 16384 (384: 2 tiles either way; 23% slower with it, H200 session 11) does not; calls with 128-row
    tiles never. ``expected_tiles`` against sampled binomial counts; ``0`` / ``64`` force it; other values
    are refused."""
    from nvfp4jax.kernels import moe as km

    rng = np.random.default_rng(0)
    for rows, experts, cap in ((16384 * 6, 384, 256), (16384 * 6, 384, 320), (16384 * 6, 256, 256), (900, 8, 64)):
        sampled = np.mean(-(-rng.binomial(rows, 1 / experts, 400_000) // cap))
        assert abs(km.expected_tiles(rows, experts, cap) - sampled) < 0.01, (rows, experts, cap)
    assert abs(km.expected_tiles(16384 * 6, 384, 256) - 1.48) < 0.01

    def pick(rows, experts):
        return km.choose_grouped_prefill_config(rows, experts, True, gate_up=True, swiglu_limit=10.0)

    monkeypatch.delenv(km.WS_TAIL_ENV, raising=False)
    assert km.ws_tail_auto(16384 * 6, 384) and not km.ws_tail_auto(16384 * 6, 256)
    assert pick(16384 * 6, 384).tail == kw.TAIL and pick(16384 * 6, 256).tail == 0
    assert not km.ws_tail_auto(8192 * 6, 384) and pick(8192 * 6, 384).tail == 0  # 128 rows per expert
    monkeypatch.setenv(km.WS_TAIL_ENV, "0")
    assert pick(16384 * 6, 384).tail == 0
    monkeypatch.setenv(km.WS_TAIL_ENV, "64")
    assert pick(16384 * 6, 256).tail == kw.TAIL and pick(4096 * 6, 256).tail == 0  # tile 128: no tail
    monkeypatch.setenv(km.WS_TAIL_ENV, "32")
    with pytest.raises(ValueError, match="NVFP4JAX_MOE_WS_TAIL='32'"):
        pick(16384 * 6, 384)


def test_ws_prefill_dispatch(monkeypatch):
    """Which GEMMs the warp-specialized kernel gets: under the default ``auto``, dense calls of at least
    ``WS_DENSE_MIN_M`` rows or from 128 with m * n >= 2^21, grouped calls from 64 rows per expert (the measured
    wins); ``ws`` /
    ``ws-persistent`` every m > 64, ``one-warpgroup`` none; never n % 128 != 0 or a float32 output; an
    unknown mode is refused; its own entry point rejects other n."""
    from nvfp4jax.kernels import moe as km

    monkeypatch.delenv(kg.PREFILL_ENV, raising=False)
    assert kg.prefill_mode() == "auto"
    assert kg.uses_ws_prefill(kg.WS_DENSE_MIN_M, 4096, jnp.bfloat16) and kg.uses_ws_prefill(4096, 256, jnp.bfloat16)
    # below 4096 rows, session 13's measured calls: the wins (m * n >= 2^21) and the losses (m * n <= 2^20)
    for m, n in ((128, 32768), (512, 4096), (1024, 2048), (2048, 1024), (4095, 1024)):
        assert kg.uses_ws_prefill(m, n, jnp.bfloat16), (m, n)
    for m, n in ((1024, 1024), (256, 4096), (512, 2048), (128, 4096), (127, 32768), (64, 65536), (4095, 384)):
        assert not kg.uses_ws_prefill(m, n, jnp.bfloat16), (m, n)
    assert not kg.uses_ws_prefill(16384, 4096, jnp.float32) and not kg.uses_ws_prefill(16384, 192, jnp.bfloat16)
    # grouped, 6 rows per token: from 64 rows per expert (Flash from T = 2689, Pro from 4033), tile 256 from 129
    assert [km.ws_tile(p) for p in (64, 65, 128, 129, 256, 384, 768)] == [128, 128, 128, 256, 256, 256, 256]
    assert km.uses_ws(16384 * 6, 384, 2 * 3072) and km.uses_ws(16384 * 6, 384, 7168)
    assert km.uses_ws(8192 * 6, 256, 2 * 2048) and km.uses_ws(4096 * 6, 256, 4096)
    assert km.uses_ws(2689 * 6, 256, 2 * 2048) and not km.uses_ws(2688 * 6, 256, 2 * 2048)
    assert km.uses_ws(4096 * 6, 384, 7168)  # 64 rows per expert: measured 1.12 / 1.32x the decode tiles
    assert km.uses_ws(4033 * 6, 384, 7168) and not km.uses_ws(4032 * 6, 384, 7168)
    assert not km.uses_ws(1024 * 6, 384, 7168)  # 16 rows per expert
    # $NVFP4JAX_MOE_WS_MIN_ROWS moves the grouped threshold (below 64: opt-in); dense calls keep m > 64
    monkeypatch.setenv(km.WS_MIN_ROWS_ENV, "17")
    assert km.uses_ws(4096 * 6, 384, 7168) and km.uses_ws(2048 * 6, 256, 4096) and km.uses_ws(729 * 6, 256, 4096)
    assert not km.uses_ws(682 * 6, 256, 4096) and not kg.uses_ws_prefill(64, 4096, jnp.bfloat16)
    assert km.choose_grouped_prefill_config(4096 * 6, 384, True, gate_up=True, swiglu_limit=10.0).tile_t == 128
    monkeypatch.setenv(km.WS_MIN_ROWS_ENV, "300")
    assert not km.uses_ws(8192 * 6, 256, 2 * 2048) and km.uses_ws(16384 * 6, 256, 2 * 2048)
    for bad in ("0", "-5", "many"):
        monkeypatch.setenv(km.WS_MIN_ROWS_ENV, bad)
        with pytest.raises(ValueError, match="NVFP4JAX_MOE_WS_MIN_ROWS"):
            km.uses_ws(4096 * 6, 384, 7168)
    monkeypatch.delenv(km.WS_MIN_ROWS_ENV)
    monkeypatch.setenv(kg.PREFILL_ENV, "ws")
    assert kg.uses_ws_prefill(65, 4096, jnp.bfloat16) and km.uses_ws(16384 * 6, 256, 2 * 2048)
    assert not kg.uses_ws_prefill(64, 4096, jnp.bfloat16)
    assert not kg.uses_ws_prefill(4096, 4096, jnp.float32)
    assert not kg.uses_ws_prefill(4096, 192, jnp.bfloat16)
    monkeypatch.setenv(kg.PREFILL_ENV, "ws-persistent")
    assert kg.uses_ws_prefill(65, 4096, jnp.bfloat16)
    monkeypatch.setenv(kg.PREFILL_ENV, "one-warpgroup")
    assert not kg.uses_ws_prefill(16384, 4096, jnp.bfloat16) and not km.uses_ws(16384 * 6, 384, 7168)
    assert not km.uses_ws(8192 * 6, 256, 2 * 2048)
    monkeypatch.setenv(kg.PREFILL_ENV, "wss")
    with pytest.raises(ValueError, match="NVFP4JAX_GEMM_PREFILL='wss'"):
        kg.uses_ws_prefill(4096, 4096, jnp.bfloat16)
    from nvfp4jax.formats.nvfp4 import quantize

    w = quantize(jnp.ones((192, 128), jnp.float32))
    assert "n % 128" in kw.supports(jnp.ones((100, 128), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="n % 128"):
        kw.nvfp4_gemm_ws(jnp.ones((100, 128), jnp.bfloat16), w)
    assert not kw.can_implement(kw.PrefillConfig(tile_t=96)) and not kw.can_implement(kw.PrefillConfig(stages=2))


@pytest.mark.parametrize("m,n,k,act_nvfp4", [(1, 4096, 4096, False), (3, 1024, 4096, True), (64, 1536, 7168, True)])
def test_gemm_w_regs_compiles_sm90a(tmp_path, monkeypatch, m, n, k, act_nvfp4):
    """Decode configs take W as wgmma's register operand by default -- the wgmma's A is a list of 4
    registers, and nothing but X is staged in shared memory (no 16-byte shared stores of W);
    ``NVFP4JAX_GEMM_W_REGS=0`` turns it off."""
    monkeypatch.delenv(kg.W_REGS_ENV, raising=False)
    cfg = kg.choose_config(m, n, k, act_nvfp4)
    assert cfg.w_regs and kg.GemmNvfp4Sm90.can_implement(cfg), cfg
    assert kg.smem_bytes(cfg) == 2 * cfg.tile_t * cfg.tile_k  # one BF16 X stage, nothing of W
    ptx = compile_ptx(kg._kernel(cfg), *_dense_io(cfg, m, n, k), tmp_path)
    ops = opcodes(ptx)
    assert ops[f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"] == 8, ops
    assert re.search(r"wgmma\.mma_async\S+ \{[^}]+\}, \{%r\d+, %r\d+, %r\d+, %r\d+\}, %rd", ptx), "A must come from registers"
    assert decodes_without_conversions(ops) and ops["st.shared.v4.b32"] == 0 and ops["wgmma.wait_group.sync.aligned"] >= 1
    # X staged as BF16 pairs: one 32-bit store per pair (cfg.tile_t rows x 128 K / 128 threads / 2 per thread)
    assert ops["st.shared.b32"] == cfg.tile_t // 2 and ops["st.shared.b16"] == 0, ops
    monkeypatch.setenv(kg.W_REGS_ENV, "0")
    assert not kg.choose_config(m, n, k, act_nvfp4).w_regs


def test_gemm_w_regs_prefetch_compiles_sm90a(tmp_path):
    """``w_regs`` with 2 raw register buffers (tile i + 2's loads in flight): one wgmma batch per buffer."""
    m, n, k = 1, 32768, 1024
    cfg = dataclasses.replace(kg.choose_config(m, n, k, False), w_regs=True, prefetch=2, split=1)
    assert kg.GemmNvfp4Sm90.can_implement(cfg)
    ops = opcodes(compile_ptx(kg._kernel(cfg), *_dense_io(cfg, m, n, k), tmp_path))
    assert ops[f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"] == 16 and ops["st.shared.v4.b32"] == 0


def _x_stage_offsets(tile_t: int) -> dict:
    """Element offsets (before the swizzle) of the w_regs X stage ``sB[row, col, 0]``, from CuTe's own
    layout for it (``make_smem_layout_b`` as ``GemmNvfp4Sm90.__call__`` builds it)."""
    import cutlass
    import cutlass.utils.hopper_helpers as sm90_utils
    from cutlass.utils import LayoutEnum

    out = {}

    @cute.jit
    def probe():
        layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (64, tile_t, 128), cutlass.BFloat16, 2)
        out["swizzle"] = str(layout.inner)
        for r in cutlass.range_constexpr(tile_t):
            for c in cutlass.range_constexpr(128):
                out[(r, c)] = cute.crd2idx((r, c, 0), layout.outer)

    cute.compile(probe)
    return out


def _store_wavefronts(offsets, coords, x_chunk, tile_t) -> list:
    """Shared-memory wavefronts of each 32-bit warp store of the w_regs X stage: the stage is 128-byte
    swizzled (S<3,4,3> on byte addresses: 16-byte granule ^= 128-byte line % 8 -- the model that gives
    the 4.5 wavefronts per store ncu measured for the quarter-warp order, 4.0 here), a warp store takes
    as many wavefronts as the most distinct words it puts in one bank."""
    rows_pp = x_chunk
    waves = []
    for p in range(tile_t // rows_pp):
        for i in range(x_chunk // 2):
            for w in range(4):
                banks = collections.defaultdict(set)
                for lane in range(32):
                    row, part = coords(32 * w + lane)
                    col = kg.permuted_column(part * x_chunk + 2 * i)
                    byte = 2 * offsets[(row + p * rows_pp, col)]
                    byte ^= (byte >> 3) & 0x70
                    banks[(byte // 4) % 32].add(byte // 4)
                waves.append(max(len(v) for v in banks.values()))
    return waves


@pytest.mark.parametrize("tile_t", [16, 32, 64])
def test_w_regs_x_stage_is_bank_conflict_free(tile_t):
    """``w_regs_x_coords``: a bijection of the 128 threads onto (row, chunk) of each pass, and one
    wavefront per 32-bit stage store for every X chunk the path uses (BF16 X: 8; NVFP4 X: 16 or 32);
    the quarter-warp order it replaced needs 4 (BF16 X) or 2 (NVFP4 X, 16-value chunks): the check can fail."""
    offsets = _x_stage_offsets(tile_t)
    assert offsets["swizzle"] == "S<3,4,3>", offsets["swizzle"]
    for act_nvfp4 in (False, True):
        cfg = kg.GemmConfig(64, tile_t, 128, 1, act_nvfp4, w_regs=True)
        x_chunk = kg.GemmNvfp4Sm90(cfg).x_chunk
        coords = lambda t: kg.w_regs_x_coords(t, x_chunk)  # noqa: E731
        assert sorted(coords(t) for t in range(128)) == [(r, c) for r in range(x_chunk) for c in range(128 // x_chunk)]
        assert set(_store_wavefronts(offsets, coords, x_chunk, tile_t)) == {1}, (act_nvfp4, x_chunk)
        old = lambda t: kg.thread_coords(t, 128 // x_chunk, x_chunk, 128)  # noqa: E731
        assert max(_store_wavefronts(offsets, old, x_chunk, tile_t)) == {8: 4, 16: 2, 32: 1}[x_chunk]


@pytest.mark.parametrize("tile_w", [64, 128])
def test_w_regs_fragment_order_matches_the_permuted_x_stage(tile_w):
    """The ``w_regs`` path's two halves of one K permutation agree with wgmma's A fragment as CuTeDSL
    lays it out: the pair of code byte t (of the thread's 32-value chunk q = T % 4), row half r, M block
    mb -- fragment word ``fragment_word(t, r, mb)``, where ``decode_w_regs`` writes it -- sits at row
    ``64 mb + 16 (T // 32) + T % 32 // 4 + 8 r`` and column ``permuted_column(32 q + 2 t)``, the column
    ``stage_x_permuted`` gives that K index; every (row, column) of the tile once."""
    import cutlass.utils.hopper_helpers as sm90_utils
    from cutlass import BFloat16, Float32
    from cutlass.cute.nvgpu import OperandMajorMode
    from cutlass.cute.nvgpu.warpgroup import OperandSource

    blocks, pairs = tile_w // 64, []

    @cute.jit
    def probe():
        mma = sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                (1, 1, 1), (64, 16), OperandSource.RMEM)
        for T in cutlass.range_constexpr(128):
            thr = mma.get_slice(T)
            coords = thr.partition_A(cute.make_identity_tensor((tile_w, 128)))
            flat = cute.make_layout(cute.shape(mma.make_fragment_A(thr.partition_shape_A((tile_w, 128))).layout))
            for mb in cutlass.range_constexpr(blocks):
                for r in cutlass.range_constexpr(2):
                    for t in cutlass.range_constexpr(16):
                        for e in cutlass.range_constexpr(2):
                            elem = 2 * kg.fragment_word(t, r, mb, blocks) + e  # BF16 element of the fragment
                            got = coords[flat.get_hier_coord(elem)]
                            want = (64 * mb + 16 * (T // 32) + T % 32 // 4 + 8 * r,
                                    kg.permuted_column(32 * (T % 4) + 2 * t) + e)
                            pairs.append((T, mb, r, t, e, tuple(int(v) for v in got), want))  # compared below

    cute.compile(probe, options="--gpu-arch sm_90a")
    bad = [p for p in pairs if p[-2] != p[-1]]
    assert len(pairs) == 128 * 64 * blocks and not bad, bad[:5]
    assert len({p[-1] for p in pairs}) == tile_w * 128, "every (row, column) of the A tile exactly once"


def test_choose_config_covers_v4_shapes():
    from tests.kernels._gpu import FLASH_LINEARS, PRO_LINEARS

    for _, n, k in FLASH_LINEARS + PRO_LINEARS:
        for m in (1, 3, 16, 64, 65, 200, 4096, 16384):
            for act in (True, False):
                cfg = kg.choose_config(m, n, k, act)
                assert kg.GemmNvfp4Sm90.can_implement(cfg), (m, n, k, cfg)
                assert n % cfg.tile_w == 0 and k % (cfg.tile_k * cfg.split) == 0, (m, n, k, cfg)


def test_prefill_split_fills_idle_sms():
    """Prefill tiles that would leave SMs idle split K up to 2 CTAs per SM, >= 8 K tiles per CTA
    (Flash wq_a at m = 1024: 64 CTAs of 128 x 128 -> split 4); grids of >= 1 CTA per SM keep the
    decode-style rule (split only while m <= k / 32)."""
    def ctas(cfg, m, n):
        return (n // cfg.tile_w) * -(-m // cfg.tile_t) * cfg.split

    assert kg.choose_config(1024, 1024, 4096, True).split == 4
    assert kg.choose_config(1024, 512, 4096, False).split == 8
    assert kg.choose_config(4096, 512, 4096, True).split == 2
    assert kg.choose_config(4096, 4096, 4096, True).split == 1
    from tests.kernels._gpu import FLASH_LINEARS, PRO_LINEARS

    for _, n, k in FLASH_LINEARS + PRO_LINEARS:
        for m in (65, 200, 1024, 4096):
            cfg = kg.choose_config(m, n, k, True)
            base = ctas(dataclasses.replace(cfg, split=1), m, n)
            if base < kg.NUM_SMS:  # every V4 K has >= 16 prefill K tiles: a split is always possible
                assert cfg.split > 1 and k // cfg.tile_k // cfg.split >= 8, (m, n, k, cfg)


@pytest.mark.parametrize("t,act_nvfp4", [(1, True), (64, False), (4096, True)])
@pytest.mark.parametrize("stage", ["L1", "L2"])
def test_grouped_gemm_compiles_sm90a(tmp_path, monkeypatch, t, act_nvfp4, stage):
    """The MoE GEMMs (V4-Flash expert shapes, 16 experts) on the shared-memory stage path
    (``NVFP4JAX_GEMM_W_REGS=0`` for the decode tiles): decode split-K and prefill SwiGLU variants."""
    from nvfp4jax.kernels import moe as km

    monkeypatch.setenv(kg.W_REGS_ENV, "0")
    experts, inter, d = 16, 2048, 4096
    rows, gate_up = 6 * t, stage == "L1"
    n, k = (inter, d) if gate_up else (d, inter)
    n_out = 2 * n if gate_up else n
    cfg = km.choose_grouped_config(rows, experts, n_out, k, act_nvfp4, gate_up=gate_up, swiglu_limit=10.0)
    ins, outs, spec = _grouped_io(cfg, t, rows, experts, n, k, gate_up)
    ops = opcodes(compile_ptx(km._kernel(cfg), ins, outs, spec, tmp_path))
    wgmma = [op for op in ops if op.startswith("wgmma.mma_async")]
    assert wgmma == [f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"], wgmma
    assert decodes_without_conversions(ops) and ops["ld.global.v4.b32"] > 0
    assert (ops["ex2.approx.ftz.f32"] > 0) == (cfg.swiglu_limit is not None), "SwiGLU epilogue (exp) iff fused"


@pytest.mark.parametrize("t,act_nvfp4", [(1, True), (8, False)])
def test_grouped_w_regs_compiles_sm90a(tmp_path, monkeypatch, t, act_nvfp4):
    """The register-A default reaches the MoE's decode tiles: L1 (gate_up, 128 rows = W1 and W3 blocks)
    and L2 (64 rows at t = 1: 6 experts x 64 CTAs; 128 at t = 8: 19 token tiles x 32 CTAs,
    ``moe.l2_decode_tile_w``)."""
    from nvfp4jax.kernels import moe as km

    monkeypatch.delenv(kg.W_REGS_ENV, raising=False)
    experts, inter, d, rows = 16, 2048, 4096, 6 * t
    for gate_up, n, k in ((True, inter, d), (False, d, inter)):
        cfg = km.choose_grouped_config(rows, experts, 2 * n if gate_up else n, k, act_nvfp4, gate_up=gate_up,
                                       swiglu_limit=10.0)
        assert cfg.w_regs and cfg.grouped and cfg.tile_w == (128 if gate_up or t == 8 else 64), cfg
        ptx = compile_ptx(km._kernel(cfg), *_grouped_io(cfg, t, rows, experts, n, k, gate_up), tmp_path)
        ops = opcodes(ptx)
        wgmma = ops[f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"]
        assert wgmma == 8 * cfg.tile_w // 64 and ops["st.shared.v4.b32"] == 0, ops
        assert re.search(r"wgmma\.mma_async\S+ \{[^}]+\}, \{%r\d+, %r\d+, %r\d+, %r\d+\}, %rd", ptx)
        assert (ops["ex2.approx.ftz.f32"] > 0) == (cfg.swiglu_limit is not None)


def test_gemm_ws_two_producers_128_row_tiles_compile_sm90a(tmp_path, monkeypatch):
    """Two decode warpgroups where they are meant to pay (session 12): V4-Flash's MoE L1 at T = 4096 (96 rows
    per expert: 128-row tiles, no split, no tail) -- 512 threads, one wgmma of N = 128 per K step, ptxas within
    the launch's 128 registers."""
    from nvfp4jax.kernels import moe as km

    monkeypatch.delenv(kg.PREFILL_ENV, raising=False)
    monkeypatch.setenv(kw.W_ENV, "tma")
    monkeypatch.setenv(kw.PRODUCERS_ENV, "2")
    experts, d, inter, rows = 256, 4096, 2048, 6 * 4096
    assert km.uses_ws(rows, experts, 2 * inter)
    cfg = km.choose_grouped_prefill_config(rows, experts, True, gate_up=True, swiglu_limit=10.0)
    assert (cfg.tile_t, cfg.tail, cfg.producers, kw.threads(cfg)) == (128, 0, 2, 512), cfg
    ptx = compile_ptx(kw.kernel_for(cfg), *_grouped_ws_io(cfg, rows, experts, inter, d), None, tmp_path)
    assert ".reqntid 512, 1, 1" in ptx
    _ptxas_fits(ptx, tmp_path, 128)
    wgmma = sorted(op for op in opcodes(ptx) if op.startswith("wgmma.mma_async"))
    assert wgmma == ["wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"], wgmma


def test_moe_l2_tile_w_option(monkeypatch):
    """``$NVFP4JAX_MOE_L2_TILE_W``: 128 weight rows per CTA for L2's decode tiles only (L1's and the prefill
    tiles keep theirs); unset is ``auto`` (128 from 264 CTAs of 128 rows: V4-Flash from T = 2, V4-Pro from
    T = 1); another value, or one that does not divide L2's columns, is refused."""
    from nvfp4jax.kernels import moe as km

    def l2(rows, n_out=4096, experts=256):
        return km.choose_grouped_config(rows, experts, n_out, 2048, True, gate_up=False, swiglu_limit=10.0)

    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv(km.L2_TILE_W_ENV, raising=False)
        else:
            monkeypatch.setenv(km.L2_TILE_W_ENV, unset)
        assert l2(6 * 2048).tile_w == 128 and l2(12).tile_w == 128 and l2(6, 7168, 384).tile_w == 128
        assert l2(6).tile_w == 64 and l2(6 * 2048, n_out=4160).tile_w == 64  # 192 CTAs; 4160 % 128 != 0
    monkeypatch.setenv(km.L2_TILE_W_ENV, "64")
    assert l2(6 * 2048).tile_w == 64 and l2(6, 7168, 384).tile_w == 64
    monkeypatch.setenv(km.L2_TILE_W_ENV, "128")
    assert (l2(6 * 2048).tile_w, l2(6 * 2048).tile_t) == (128, 48) and l2(6).tile_w == 128
    assert l2(6 * 8192).tile_w == 128 and l2(6 * 8192).tile_t == 128  # prefill tiles: 128 either way
    l1 = km.choose_grouped_config(6 * 2048, 256, 4096, 4096, True, gate_up=True, swiglu_limit=10.0)
    assert l1.tile_w == 128 and l1.gate_up
    with pytest.raises(ValueError, match="not a multiple"):
        l2(6 * 2048, n_out=4160)
    monkeypatch.setenv(km.L2_TILE_W_ENV, "256")
    with pytest.raises(ValueError, match="NVFP4JAX_MOE_L2_TILE_W='256'; choose auto, 64 or 128"):
        l2(6)


@pytest.mark.parametrize("act_nvfp4", [True, False])
def test_grouped_l2_tile_w_128_compiles_sm90a(tmp_path, monkeypatch, act_nvfp4):
    """``NVFP4JAX_MOE_L2_TILE_W=128`` on L2's decode tiles (48 rows per expert, W in wgmma's A registers):
    compiles for sm_90a with two 64-row wgmma blocks per K step (16 per 128-K tile)."""
    from nvfp4jax.kernels import moe as km

    monkeypatch.delenv(kg.W_REGS_ENV, raising=False)
    monkeypatch.setenv(km.L2_TILE_W_ENV, "128")
    experts, inter, d, t = 16, 2048, 4096, 128
    cfg = km.choose_grouped_config(6 * t, experts, d, inter, act_nvfp4, gate_up=False, swiglu_limit=10.0)
    assert (cfg.tile_w, cfg.tile_t, cfg.w_regs, cfg.gate_up) == (128, 48, True, False), cfg
    ops = opcodes(compile_ptx(km._kernel(cfg), *_grouped_io(cfg, t, 6 * t, experts, d, inter, False), tmp_path))
    assert ops["wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16"] == 16 and ops["st.shared.v4.b32"] == 0, ops


# ---- register prefetch depth (GemmConfig.prefetch >= 2) ----------------------------------------------


def _decode_case(case):
    """(config, inputs, outputs, out spec) of a decode GEMM (dense or MoE) as chosen now."""
    from nvfp4jax.kernels import moe as km

    if case in ("dense_w4a4", "dense_w4a16"):
        m, n, k = 1, 4096, 4096
        cfg = kg.choose_config(m, n, k, case == "dense_w4a4")
        return (cfg, *_dense_io(cfg, m, n, k))
    experts, inter, d = 16, 2048, 4096  # V4-Flash expert shapes; 1 or 4 decode tokens (6 or 24 rows)
    t = 4 if case == "moe_l1_swiglu" else 1
    gate_up = case.startswith("moe_l1")
    n, k = (inter, d) if gate_up else (d, inter)
    cfg = km.choose_grouped_config(6 * t, experts, 2 * n if gate_up else n, k, True, gate_up=gate_up, swiglu_limit=10.0)
    return (cfg, *_grouped_io(cfg, t, 6 * t, experts, n, k, gate_up))


def _env_choices(monkeypatch, var: str, value: str):
    """(m, n, k, act, default config, config with ``$var = value``) for every V4 linear, decode and prefill m."""
    from tests.kernels._gpu import FLASH_LINEARS, PRO_LINEARS

    for _, n, k in FLASH_LINEARS + PRO_LINEARS:
        for m in (1, 3, 16, 64, 65, 4096):
            for act in (True, False):
                monkeypatch.delenv(var, raising=False)
                base = kg.choose_config(m, n, k, act)
                monkeypatch.setenv(var, value)
                yield m, n, k, act, base, kg.choose_config(m, n, k, act)


@pytest.mark.parametrize("case", ["dense_w4a16", "moe_l1_swiglu", "moe_l2"])
@pytest.mark.parametrize("prefetch", [2, 3])
def test_gemm_prefetch_compiles_sm90a(tmp_path, monkeypatch, case, prefetch):
    """P register buffers: P tiles of 128-bit loads in the prologue and P refill sites in the loop body
    (the default has 1 + 1), no cp.async, the same wgmma and conversion-free decode."""
    (tmp_path / "base").mkdir()
    (tmp_path / "prefetch").mkdir()
    base_cfg, ins, outs, spec = _decode_case(case)
    base = opcodes(compile_ptx(kg._kernel(base_cfg), ins, outs, spec, tmp_path / "base"))
    monkeypatch.setenv(kg.PREFETCH_ENV, str(prefetch))
    cfg, ins, outs, spec = _decode_case(case)
    assert cfg.prefetch == prefetch and kg.GemmNvfp4Sm90.can_implement(cfg), cfg
    assert dataclasses.replace(cfg, prefetch=1, split=base_cfg.split, swiglu_limit=base_cfg.swiglu_limit) == base_cfg
    ptx = compile_ptx(kg._kernel(cfg), ins, outs, spec, tmp_path / "prefetch")
    ops = opcodes(ptx)
    assert [op for op in ops if op.startswith("wgmma.mma_async")] == [
        f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_t}k16.f32.bf16.bf16"]
    assert decodes_without_conversions(ops) and "cp.async" not in ptx
    assert ops["ld.global.v4.b32"] == prefetch * base["ld.global.v4.b32"], (ops["ld.global.v4.b32"], base["ld.global.v4.b32"])
    if case == "moe_l1_swiglu":  # a split dropped to 1 keeps the fused SwiGLU epilogue
        assert (ops["ex2.approx.ftz.f32"] > 0) == (cfg.swiglu_limit is not None) == (cfg.split == 1)


def test_gemm_prefetch_prefill_tile_compiles_sm90a(tmp_path, monkeypatch):
    """Depth 2 on a 128 x 128 x 64 prefill tile (W4A4): twice the 128-bit load sites, same wgmma."""
    (tmp_path / "base").mkdir()
    (tmp_path / "prefetch").mkdir()
    m, n, k = 200, 512, 4096
    base_cfg = kg.choose_config(m, n, k, True)
    base = opcodes(compile_ptx(kg._kernel(base_cfg), *_dense_io(base_cfg, m, n, k), tmp_path / "base"))
    monkeypatch.setenv(kg.PREFETCH_ENV, "2")
    cfg = kg.choose_config(m, n, k, True)
    assert cfg == dataclasses.replace(base_cfg, prefetch=2) and (cfg.tile_w, cfg.tile_t) == (128, 128)
    ops = opcodes(compile_ptx(kg._kernel(cfg), *_dense_io(cfg, m, n, k), tmp_path / "prefetch"))
    assert ops["ld.global.v4.b32"] == 2 * base["ld.global.v4.b32"] and decodes_without_conversions(ops)
    assert ops["wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"] > 0


def test_prefetch_config_choice(monkeypatch):
    """$NVFP4JAX_GEMM_PREFETCH: decode configs get the depth and a K split leaving each CTA >= 2P K tiles
    (or split 1), prefill configs depth 2; the default stays unchanged."""

    assert not kg.GemmNvfp4Sm90.can_implement(kg.GemmConfig(64, 16, 128, 1, True, prefetch=5))
    for m, _, k, _, base, cfg in _env_choices(monkeypatch, kg.PREFETCH_ENV, "3"):
        assert base.prefetch == 1
        if m > 64:  # prefill tiles: depth 2 at most (ptxas spills at 3), nothing else changes
            assert cfg == dataclasses.replace(base, prefetch=2)
            continue
        assert cfg.prefetch == 3 and kg.GemmNvfp4Sm90.can_implement(cfg), cfg
        assert cfg.split <= base.split and k % (cfg.tile_k * cfg.split) == 0, cfg
        assert cfg.split == 1 or k // (cfg.tile_k * cfg.split) >= 6, cfg
        assert dataclasses.replace(cfg, split=base.split, prefetch=1) == base


@pytest.fixture(autouse=True)
def _no_prefetch_env(monkeypatch):
    """The tests above check the default kernels: a $NVFP4JAX_GEMM_PREFETCH set for a GPU A/B run
    must not change them (tests that want it set it themselves)."""
    monkeypatch.delenv(kg.PREFETCH_ENV, raising=False)

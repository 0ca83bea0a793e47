"""SASS statistics of a GEMM kernel's K loop, on the CPU: registers, spills, instructions per K tile.

Compiles the config ``choose_config`` (or ``moe.choose_grouped_config``) picks for a shape to PTX
(CuTeDSL, sm_90a), assembles it with ptxas and disassembles it with cuobjdump, then counts the
instructions of the K loop (the block from the back branch after the first HGMMA to its target)
by opcode. These are the numbers quoted in ``nvfp4jax/kernels/gemm.py`` and ``benchmarks/RESULTS.md``
("instructions per K tile per warp"). The GPU's driver may allocate registers differently (ncu showed
72 where offline ptxas 13.0 used 96), so registers here are indicative.

Needs ptxas (CUDA 13: ``$PTXAS`` or ``/usr/local/cuda-13.0/bin/ptxas``) and cuobjdump
(``$CUOBJDUMP``; on a machine without the CUDA binutils: ``pip download --no-deps nvidia-cuda-cuobjdump``
and unzip the wheel). Usage::

    python benchmarks/sass_stats.py dense 1 32768 1024 w4a16     # Flash wq_b, m = 1
    python benchmarks/sass_stats.py moe-l1 1 2048 4096 w4a4      # Flash experts, T = 1 (6 rows)
    NVFP4JAX_GEMM_W_REGS=0 python benchmarks/sass_stats.py dense 1 32768 1024 w4a16
    python benchmarks/sass_stats.py ws 4096 32768 1024 w4a16     # the warp-specialized prefill kernel

For ``ws`` it also prints the highest register each warpgroup role's code uses after its ``setmaxnreg``
(SASS ``USETMAXREG``), which must stay within ``gemm_ws.PRODUCER_REGS`` / ``CONSUMER_REGS``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


def loop_counts(sass: str) -> collections.Counter:
    """Opcode counts of the K loop: the first branch after the first HGMMA that jumps back to before
    it, from its target up to it (with ``prefetch`` P the loop body holds P K tiles: see
    :func:`tiles_per_trip`)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    first = next(i for i, ln in enumerate(lines) if "HGMMA" in ln)

    def target(i):
        m = re.search(r"@!?U?P\d+ BRA (0x[0-9a-f]+)", lines[i])
        return int(m.group(1), 16) if m else None

    back = next(i for i in range(first, len(lines)) if target(i) is not None and target(i) <= addr[first])
    start = addr.index(target(back))
    ops = collections.Counter()
    for ln in lines[start:back + 1]:
        words = ln.split("*/", 1)[1].split()
        op = words[1] if words[0].startswith("@") else words[0]
        ops[op.split(".")[0].rstrip(";")] += 1
    return ops


def tiles_per_trip(ops: collections.Counter, hgmma_per_tile: int) -> int:
    """K tiles per trip of a loop whose opcode counts are ``ops``: its HGMMAs over one tile's."""
    return max(1, ops["HGMMA"] // hgmma_per_tile)


def producer_loop_counts(sass: str) -> collections.Counter:
    """gemm_ws: opcode counts of the producer's K loop (two K tiles per trip): between the producer's
    ``USETMAXREG.DEALLOC`` and the consumers' ``USETMAXREG.TRY_ALLOC``, the longest backward branch whose
    body holds a ``SYNCS`` barrier wait and shared stores (the per-tile loop around it is longer but is
    taken once per tile)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    lo = next(i for i, ln in enumerate(lines) if "USETMAXREG.DEALLOC" in ln)
    hi = next(i for i, ln in enumerate(lines) if "USETMAXREG.TRY_ALLOC" in ln)
    best = None
    for i in range(lo, hi):
        m = re.search(r"BRA (0x[0-9a-f]+)", lines[i])
        if not m or int(m.group(1), 16) >= addr[i]:
            continue
        start = addr.index(int(m.group(1), 16))
        body = lines[start:i + 1]
        if any("STS" in ln for ln in body) and any("SYNCS.PHASECHK" in ln for ln in body):
            if best is None or (i - start) < (best[1] - best[0]):  # the innermost such loop
                best = (start, i)
    ops = collections.Counter()
    for ln in lines[best[0]:best[1] + 1]:
        words = ln.split("*/", 1)[1].split()
        op = words[1] if words[0].startswith("@") else words[0]
        ops[op.split(".")[0].rstrip(";")] += 1
    return ops


def region_registers(sass: str) -> list[tuple[str, int]]:
    """(the ``USETMAXREG`` instruction, highest register index + 1 used after it up to the next one)."""
    lines = sass.splitlines()
    marks = [i for i, ln in enumerate(lines) if "USETMAXREG" in ln] + [len(lines)]
    out = []
    for a, b in zip(marks, marks[1:]):
        regs = [int(r) for ln in lines[a:b] for r in re.findall(r"\bR(\d+)\b", ln)]
        out.append((lines[a].split("*/", 1)[1].split(";")[0].strip(), max(regs, default=-1) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("dense", "moe-l1", "moe-l2", "ws"))
    ap.add_argument("m", type=int, help="tokens (dense: rows of x; MoE: tokens, 6 rows each)")
    ap.add_argument("n", type=int, help="dense: output features; MoE: the expert's intermediate (L1) or d (L2)")
    ap.add_argument("k", type=int)
    ap.add_argument("recipe", choices=("w4a4", "w4a16"))
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--sass-out", default=None, help="also write the whole SASS listing here")
    args = ap.parse_args()

    from nvfp4jax.kernels import gemm as kg, moe as km
    from tests.kernels.test_compile import _dense_io, _grouped_io, compile_ptx

    act = args.recipe == "w4a4"
    with tempfile.TemporaryDirectory() as tmp:
        if args.kind == "dense":
            cfg = kg.choose_config(args.m, args.n, args.k, act)
            ptx = compile_ptx(kg._kernel(cfg), *_dense_io(cfg, args.m, args.n, args.k), tmp)
        elif args.kind == "ws":
            import jax.numpy as jnp

            from nvfp4jax.kernels import gemm_ws as kw
            from tests.kernels.test_compile import S, _tiled_w

            cfg = kw.choose_prefill_config(args.m, args.n, act)
            ins = (S((args.m, args.k), jnp.bfloat16), S((args.m,), jnp.float32) if act else None)
            ins += _tiled_w((), args.n, args.k) + (S((1,), jnp.float32),) + kw._NO_GROUPS
            ptx = compile_ptx(kw.kernel_for(cfg), ins, (S((args.m, args.n), jnp.bfloat16),), None, tmp)
        else:
            gate_up, rows = args.kind == "moe-l1", 6 * args.m
            cfg = km.choose_grouped_config(rows, args.experts, 2 * args.n if gate_up else args.n, args.k, act,
                                           gate_up=gate_up, swiglu_limit=10.0)
            io = _grouped_io(cfg, args.m, rows, args.experts, args.n, args.k, gate_up)
            ptx = compile_ptx(km._kernel(cfg), *io, tmp)
        from tests.kernels.test_compile import assemble_sm90a, ptxas_path

        ptxas = ptxas_path()
        if ptxas is None:
            sys.exit("no ptxas: set $PTXAS (CUDA 13)")
        report = assemble_sm90a(ptx, tmp, ptxas)
        sass = subprocess.run([os.environ.get("CUOBJDUMP", "cuobjdump"), "-sass", "k.cubin"], cwd=tmp,
                              capture_output=True, text=True, check=True).stdout
    if args.sass_out:
        Path(args.sass_out).write_text(sass)
    print(cfg)
    print(" ".join(ln.split("info    : ")[-1] for ln in report.splitlines() if "Used" in ln or "spill" in ln))
    for instr, regs in region_registers(sass):
        print(f"after {instr}: registers used {regs}")
    if args.kind == "ws":
        prod = producer_loop_counts(sass)
        print(f"producer K loop: {sum(prod.values()) / 2:.0f} instructions per K tile per warp (two K tiles per trip)")
        print("  " + ", ".join(f"{op} {c}" for op, c in prod.most_common(12)))
    ops = loop_counts(sass)
    per_tile = 64 // 16 if args.kind == "ws" else (cfg.tile_k // 16) * (cfg.tile_w // 64)  # HGMMAs per K tile
    trip = tiles_per_trip(ops, per_tile)
    print(f"K loop: {sum(ops.values()) / trip:.0f} instructions per K tile per warp ({trip} K tiles per trip)")
    print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common()))


if __name__ == "__main__":
    main()

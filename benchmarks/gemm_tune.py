"""Config sweep of the NVFP4 GEMM (GPU): time each (tile, K split, prefetch depth) candidate per shape.

For every shape (decode m <= 64; m > 64 with the 128 x 128 x 64 prefill tiles) it times ``nvfp4_gemm`` with each candidate ``GemmConfig``
(forced by replacing ``choose_config`` for that trace), the XLA BF16 dot, and prints us and % of
the measured copy bandwidth on the bytes moved, marking the config ``choose_config`` picks. Timing
as in ``benchmarks/gemm.py`` (device kernel time from the profiler trace, L2 flushed). The numbers
choose the heuristics in ``choose_config``; they are not the reported results (``gemm.py`` is).

Usage (GPU): ``python benchmarks/gemm_tune.py [--shapes flash|pro|all] [--m 1,16] [--budget-s 400]
[--w-regs 0,1]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gemm import measure_ceilings, timed_cases, xla_dot  # noqa: E402
from nvfp4jax.formats.nvfp4 import quantize  # noqa: E402
from nvfp4jax.kernels import gemm as kg, quantize as kq  # noqa: E402
from tests.kernels._gpu import FLASH_LINEARS, PRO_LINEARS  # noqa: E402


def candidates(m: int, n: int, k: int, act_nvfp4: bool, tile_ws=(64, 128), tile_ks=(128,),
               splits=(1, 2, 4, 8, 16), prefetch_list=(1, 2, 3), w_regs_list=(False,)):
    tile_t = max(16, -(-m // 16) * 16) if m <= 64 else 128  # prefill: choose_config's 128-token tiles
    if m > 64:  # prefill tiles: K tiles of 64 on the shared-memory path (w_regs needs K tiles of 128)
        tile_ks = tuple(t for t in tile_ks if t == 64) or (64,)
        w_regs_list = (False,)
    for tile_w in tile_ws:
        if n % tile_w:
            continue
        for tile_k in tile_ks:
            for split in splits:
                if (k // tile_k) % split:
                    continue
                for prefetch in prefetch_list:
                    for w_regs in w_regs_list:
                        cfg = kg.GemmConfig(tile_w, tile_t, tile_k, split, act_nvfp4, prefetch=prefetch, w_regs=w_regs)
                        if k // tile_k // split >= prefetch and kg.GemmNvfp4Sm90.can_implement(cfg):
                            yield cfg


def run_cfg(cfg, x, w):
    orig = kg.choose_config
    kg.choose_config = lambda *a, **kw: cfg
    try:  # compiled inside device_times, while the forced config is in place
        return timed_cases({"c": (lambda x, w: kg.nvfp4_gemm(x, w), (x, w))}, {"c"})["c"]
    finally:
        kg.choose_config = orig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--names", default="", help="comma list of linear names to keep (default all)")
    ap.add_argument("--recipes", default="w4a16,w4a4")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--tile-w", default="64,128")
    ap.add_argument("--tile-k", default="128")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--prefetch", default="1,2,3")
    ap.add_argument("--w-regs", default="1", help="1: W decoded into wgmma's A registers (the default path); "
                    "0: BF16 shared-memory stages; 0,1: both")
    args = ap.parse_args()
    t0 = time.time()
    bw, _ = measure_ceilings()
    print(f"copy BW {bw / 1e12:.2f} TB/s ({jax.devices()[0].device_kind})", flush=True)
    shapes = []
    if args.shapes in ("flash", "all"):
        shapes += [("flash", *s) for s in FLASH_LINEARS]
    if args.shapes in ("pro", "all"):
        shapes += [("pro", *s) for s in PRO_LINEARS]
    keep = set(filter(None, args.names.split(",")))
    rng = np.random.default_rng(0)
    for model, name, n, k in shapes:
        if keep and name not in keep:
            continue
        w = kg.as_tiled(jax.jit(quantize)(jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * 0.02)))
        wb = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
        for m in map(int, args.m.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            bf16 = timed_cases({"b": (xla_dot, (x, wb))})["b"]
            print(f"\n{model} {name} n={n} k={k} m={m}: XLA BF16 {bf16 * 1e6:.1f} us "
                  f"({100 * (2 * n * k) / bf16 / bw:.0f}% BW)", flush=True)
            for recipe in args.recipes.split(","):
                act = recipe == "w4a4"
                xin = kq.quantize_nvfp4(x) if act else x
                nbytes = n * k * 0.5625 + m * k * (0.5625 if act else 2) + 2 * m * n
                chosen = kg.choose_config(m, n, k, act)
                res = []
                ints = lambda v: tuple(map(int, v.split(",")))  # noqa: E731
                for cfg in candidates(m, n, k, act, ints(args.tile_w), ints(args.tile_k), ints(args.splits),
                                      ints(args.prefetch), tuple(bool(v) for v in ints(args.w_regs))):
                    if time.time() - t0 > args.budget_s:
                        print("  (time budget reached)", flush=True)
                        return
                    try:
                        t = run_cfg(cfg, xin, w)
                    except Exception as e:  # noqa: BLE001 - a sweep records failures and goes on
                        print(f"  {recipe} {cfg}: FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    res.append((t, cfg))
                res.sort(key=lambda r: r[0])
                for t, cfg in res[:6] + [r for r in res[6:] if r[1] == chosen]:
                    mark = " <- chosen" if cfg == chosen else ""
                    print(f"  {recipe} w{cfg.tile_w} k{cfg.tile_k} split{cfg.split} "
                          f"prefetch{cfg.prefetch}{' w_regs' if cfg.w_regs else ''}: "
                          f"{t * 1e6:.1f} us {100 * nbytes / t / bw:.0f}% BW, x{bf16 / t:.2f} BF16{mark}", flush=True)


if __name__ == "__main__":
    main()

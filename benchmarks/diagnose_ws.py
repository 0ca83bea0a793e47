"""Where the warp-specialized prefill GEMM (``nvfp4jax.kernels.gemm_ws``) differs from the reference (GPU).

For a first run of a new kernel: one small case per mode, and for each a map of which output blocks are
wrong -- rows of W (64-row M blocks: which consumer warpgroup, W1 vs W3), tokens (tile_t tiles, the
partial last tile), K (a case with one K tile vs many: the pipeline's stages and parities) -- instead of
the tests' single cosine number. Prints, per case: max |kernel - reference| relative to the reference's
scale, the fraction of elements off by more than 1%, NaNs (unwritten elements: outputs are poisoned),
and the bad (token tile, 64-row W block) pairs.

Each mode (one CTA per tile with W to registers, the same with W by TMA, persistent), smallest case first,
each announced before it runs, so that a hang shows as the last "running" line. Usage (GPU machine): ``python benchmarks/diagnose_ws.py`` (~1-2 min).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nvfp4jax.formats.nvfp4 import quantize, tile_weight  # noqa: E402
from nvfp4jax.ref import gemm as ref  # noqa: E402
from nvfp4jax.kernels import gemm as kg, gemm_ws as kw  # noqa: E402
from tests.kernels._gpu import activations, fresh_jit, poison_device_memory  # noqa: E402


def report(name: str, got, want, tile_t: int) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = np.sqrt(np.mean(want**2)) + 1e-30
    err = np.abs(got - want) / scale
    nan = np.isnan(got)
    bad = (err > 1e-2) | nan
    print(f"{name}: max err {np.nanmax(err):.2e} x rms, {100 * bad.mean():.3f}% elements off, {nan.sum()} NaN")
    if bad.any():
        m, n = bad.shape
        blocks = sorted({(r // tile_t, c // 64) for r, c in zip(*np.nonzero(bad))})
        print(f"  bad (token tile, 64-row W block) of ({-(-m // tile_t)}, {n // 64}): {blocks[:40]}"
              f"{' ...' if len(blocks) > 40 else ''}")
        r, c = np.argwhere(bad)[0]
        print(f"  first bad element: token {r}, W row {c}: kernel {got[r, c]:.5g}, reference {want[r, c]:.5g}")


def main():
    rng = np.random.default_rng(0)
    # smallest first: a hang (the pipeline's barriers) shows as the last case printed
    for mode, w_mode in (("ws", "regs"), ("ws", "tma"), ("ws-persistent", "regs"), ("ws-persistent", "tma")):
        os.environ[kg.PREFILL_ENV] = mode
        os.environ[kw.W_ENV] = w_mode
        for m, n, k, act in [(70, 128, 128, False), (300, 256, 1024, False), (300, 256, 1024, True),
                             (1000, 1024, 4096, False), (4096, 4096, 4096, True)]:
            w = jax.jit(quantize)(jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32))
            x = activations(rng, m, k)
            x = ref.quantize_nvfp4(x) if act else x
            cfg = kw.choose_prefill_config(m, n, act)
            print(f"running {mode} W {w_mode} m={m} n={n} k={k} act_nvfp4={act} {cfg}", flush=True)
            poison_device_memory()
            # a fresh trace per case: jax.jit(kw.nvfp4_gemm_ws) would reuse the first mode's trace of these
            # shapes (one trace cache per function), as it did until session 9 -- its W-by-TMA and
            # persistent lines then timed the first mode's kernel and could not show their hang
            got = fresh_jit(kw.nvfp4_gemm_ws)(x, tile_weight(w)).block_until_ready()
            report(f"{mode} W {w_mode} m={m} n={n} k={k} {'W4A4' if act else 'W4A16'} tile_t={cfg.tile_t}", got,
                   jax.jit(ref.nvfp4_gemm)(x, w), cfg.tile_t)
    xq = ref.quantize_nvfp4(activations(rng, 64, 256))
    report("dequant_rows (as BF16 x 2^8 vs the reference decode)",
           jax.jit(kw.dequant_rows)(xq).astype(jnp.float32) * 2.0**kw.DECODE_SHIFT, ref._dequant_unscaled(xq), 64)


if __name__ == "__main__":
    main()

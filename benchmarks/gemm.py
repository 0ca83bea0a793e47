"""NVFP4 GEMM and quantize benchmark (GPU): ours (W4A4, W4A16) vs XLA BF16 and FP8 dots, with rooflines.

Timing: R back-to-back calls inside one jitted ``lax.fori_loop`` (each iteration's input depends
on the previous output through a one-element in-place update, so nothing is hoisted), so Python
dispatch (~45 us per call) is excluded; the median over several repeats of (loop time / R) is
reported. Every loop of our kernels is checked in the compiled HLO: the CuTeDSL call must still be
there (not eliminated as dead code, as an integer ``* 0`` dependence once let XLA do), else the run
stops. For memory-bound cases (GEMM m <= 64; quantize whenever its bytes could stay in L2) every
iteration also rewrites a 128 MiB buffer to flush L2, and the time of that flush-only loop,
measured the same way, is subtracted. A quantize time below bytes / copy bandwidth is printed as
INVALID.
Ceilings measured in the same run: copy bandwidth (read+write of a 2 GiB buffer) and BF16 peak
(8192^3 ``jnp.dot``). Roofline = max(bytes / copy BW, FLOPs / BF16 peak), bytes counting the
operands as stored (NVFP4: 0.5625 B per weight) plus the BF16 output.

Usage (GPU machine): ``python benchmarks/gemm.py [--quick] [--out benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nvfp4jax.formats.nvfp4 import NVFP4Tensor, quantize  # noqa: E402
from nvfp4jax.kernels import gemm as kg, quantize as kq  # noqa: E402
from tests.kernels._gpu import FLASH_LINEARS, PRO_LINEARS  # noqa: E402

M_VALUES = (1, 4, 16, 64, 256, 1024, 4096, 16384)
FLUSH_BYTES = 128 << 20
KERNEL_TARGET = 'custom_call_target="CuteDSLRT_NvJaxCutlassCall'  # what cutlass_call lowers to


def count_kernel_calls(hlo: str) -> int:
    """CuTeDSL calls left in an optimized HLO module (0: the timed kernel was dead-code eliminated)."""
    return hlo.count(KERNEL_TARGET)


def _loop_time(step, carry, reps: int, flush: bool, kernel_calls: int = 0) -> float:
    """Median seconds per call of ``carry = step(carry)`` over ``reps`` calls in one fori_loop;
    ``kernel_calls``: how many CuTeDSL calls one step must leave in the compiled program (the data
    dependence between iterations keeps them in the loop body)."""

    def body(_, c):
        c, buf = c
        c = step(c)
        if flush:
            buf = buf + jnp.uint8(1)
        return c, buf

    buf = jnp.zeros((FLUSH_BYTES if flush else 1,), jnp.uint8)
    run = jax.jit(lambda c, b: jax.lax.fori_loop(0, reps, body, (c, b))).lower(carry, buf).compile()
    found = count_kernel_calls(run.as_text())
    if found < kernel_calls:
        raise RuntimeError(f"the timed loop holds {found} CuTeDSL calls, expected {kernel_calls}: "
                           "the kernel was eliminated, the timing would be invalid")
    jax.block_until_ready(run(carry, buf))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(run(carry, buf))
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def timed(step, carry, flush: bool, reps: int, kernel_calls: int = 0) -> float:
    t = _loop_time(step, carry, reps, flush, kernel_calls)
    if flush:
        t -= _loop_time(lambda c: c, carry, reps, True)
    return max(t, 1e-9)


def measure_ceilings() -> tuple[float, float]:
    n = 1 << 30
    x = jnp.ones((n,), jnp.bfloat16)
    t = timed(lambda v: v + jnp.bfloat16(1.0), x, False, 20)
    bw = 2 * 2 * n / t
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    t = timed(lambda v: jnp.dot(v, a, preferred_element_type=jnp.float32).astype(jnp.bfloat16), a, False, 20)
    return bw, 2 * 8192**3 / t


def _poke(x, y):
    """Make the next iteration's input depend on this output (one element, updated in place)."""
    # float32 multiply by 0 is not folded (NaN semantics); an integer one would be, and the op DCE'd
    return x.at[0, 0].add((y[0, 0].astype(jnp.float32) * 0).astype(x.dtype))


def bench_shape(n: int, k: int, m: int, reps: int):
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * 0.02)
    w = jax.jit(quantize)(w32)
    wb = w32.astype(jnp.bfloat16)
    w8 = w32.astype(jnp.float8_e4m3fn)
    del w32
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    xq = kq.quantize_nvfp4(x)
    x8 = x.astype(jnp.float8_e4m3fn)
    flush = m <= 64

    def w4a4(c):
        y = kg.nvfp4_gemm(c, w)
        return NVFP4Tensor(c.values, c.scales, c.global_scale.at[0].add(y[0, 0].astype(jnp.float32) * 0))

    def w4a16(c):
        return _poke(c, kg.nvfp4_gemm(c, w))

    def bf16(c):
        return _poke(c, jnp.dot(c, wb.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16))

    def fp8(c):
        y = jnp.dot(c, w8.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return c.at[0, 0].set((c[0, 0].astype(jnp.float32) + y[0, 0].astype(jnp.float32) * 0).astype(c.dtype))

    out = {
        "w4a4": timed(w4a4, xq, flush, reps, kernel_calls=1),
        "w4a16": timed(w4a16, x, flush, reps, kernel_calls=1),
        "bf16": timed(bf16, x, flush, reps),
        "fp8": timed(fp8, x8, flush, reps),
    }
    bytes_w4a4 = n * k * 0.5625 + m * k * 0.5625 + 2 * m * n
    return out, bytes_w4a4, 2.0 * m * n * k


def bench_quantize(m: int, k: int, reps: int, fused_norm: bool) -> tuple[float, float]:
    """Seconds per quantize call (with the fused RMSNorm when ``fused_norm``) and bytes moved."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    norm = jnp.asarray(1 + 0.1 * rng.standard_normal(k), jnp.bfloat16) if fused_norm else None
    nbytes = m * k * (2 + 0.5625) + 4 * m + (2 * k if fused_norm else 0)

    def step(c):
        q = kq.quantize_nvfp4(c, norm, 1e-6)
        # the next input takes an output value (row 0's global scale): a real data dependence that
        # no algebraic rewrite removes, so the call runs every iteration (checked in the HLO too)
        return c.at[0, 0].set(q.global_scale[0].astype(c.dtype))

    return timed(step, x, nbytes <= FLUSH_BYTES, reps, kernel_calls=1), nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Pro shapes only at m in {1, 16, 4096}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new shapes after this")
    args = ap.parse_args()
    t_start = time.time()
    dev = jax.devices()[0].device_kind
    bw, peak = measure_ceilings()
    lines = [f"measured copy bandwidth {bw / 1e12:.2f} TB/s, BF16 dense peak {peak / 1e12:.0f} TFLOP/s ({dev})", ""]
    # quantize first: cheap, and a run cut short by the device budget should still have it
    lines += ["| quantize m | k | us | % copy BW | fused RMSNorm us | % copy BW |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for m, k in ((1, 4096), (16, 7168), (4096, 4096), (16384, 7168)):
        cells = []
        for fused_norm in (False, True):
            t, nbytes = bench_quantize(m, k, 50 if m < 4096 else 10, fused_norm)
            pct = 100 * nbytes / t / bw
            cells += [f"{t * 1e6:.1f}", f"{pct:.0f}" if pct <= 110 else f"{pct:.0f} INVALID (above copy BW)"]
        lines.append(f"| {m} | {k} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    lines.append("")
    lines += ["| model | linear | n | k | m | W4A4 us | W4A16 us | BF16 us | FP8 us | roofline us | W4A4 % roof | x BF16 (W4A4) | x BF16 (W4A16) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines[-2:]), flush=True)
    quick_m = (1, 16, 64, 1024, 4096)
    shapes = [("flash", *s, quick_m if args.quick else M_VALUES) for s in FLASH_LINEARS]
    shapes += [("pro", *s, (1, 4096) if args.quick else M_VALUES) for s in PRO_LINEARS]
    stopped = False
    for model, name, n, k, ms in shapes:
        for m in ms:
            if not stopped and time.time() - t_start > args.budget_s:
                lines.append(f"| (stopped by the time budget at {model} {name} m={m}: later cases not measured) |")
                stopped = True
            if stopped:
                break
            reps = 200 if m <= 64 else (50 if m <= 1024 else 10)
            t, nbytes, flops = bench_shape(n, k, m, reps)
            roof = max(nbytes / bw, flops / peak)
            line = (f"| {model} | {name} | {n} | {k} | {m} | {t['w4a4'] * 1e6:.1f} | {t['w4a16'] * 1e6:.1f} | "
                    f"{t['bf16'] * 1e6:.1f} | {t['fp8'] * 1e6:.1f} | {roof * 1e6:.1f} | {100 * roof / t['w4a4']:.0f} | "
                    f"{t['bf16'] / t['w4a4']:.2f} | {t['bf16'] / t['w4a16']:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        commit = os.environ.get("NVFP4JAX_COMMIT", "")
        if not commit:
            try:
                commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
            except OSError:
                commit = ""
        head = f"\n## nvfp4_gemm / quantize_nvfp4 — {dev}, {datetime.date.today()}, commit {commit or 'unknown'}\n\n"
        with open(args.out, "a") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

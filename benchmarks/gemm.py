"""NVFP4 GEMM and quantize benchmark (GPU): ours (W4A4, W4A16) vs XLA BF16 and FP8 dots, with rooflines.

Timing (``benchmarks/_timing.py``): device kernel time of single jitted calls from the JAX
profiler's trace, median of 5, L2 flushed before every call (a 256 MiB write), after warm-up. A
call's time is the sum of its kernels (ours: the GEMM kernel plus, for split-K shapes, XLA's
reduction of the float32 partials; W4A4 takes already-quantized x, the activation quantize is
timed on its own). Every timed call of ours must show a CuTeDSL kernel in the trace, else the run
stops. Ceilings measured in the same run, the same way: copy bandwidth (read+write of a 2 GiB
buffer) and BF16 peak (8192^3 ``jnp.dot``). Roofline = max(bytes / copy BW, FLOPs / BF16 peak),
bytes counting the operands as stored (NVFP4: 0.5625 B per weight) plus the BF16 output.

Usage (GPU machine): ``python benchmarks/gemm.py [--quick] [--out benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import append_results, checked, device_times  # noqa: E402
from nvfp4jax.formats.nvfp4 import quantize  # noqa: E402
from nvfp4jax.kernels import gemm as kg, gemm_ws as kw, quantize as kq  # noqa: E402
from tests.kernels._gpu import FLASH_LINEARS, PRO_LINEARS  # noqa: E402

M_VALUES = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def timed_cases(cases: dict, ours: set[str] = frozenset()) -> dict[str, float]:
    """Kernel seconds per case; the cases in ``ours`` must have run a CuTeDSL kernel (else it raises)."""
    out = {}
    for name, r in device_times(cases).items():
        try:
            out[name] = checked(r, 1 if name in ours else 0)["kernels"]
        except Exception as e:
            e.add_note(f"benchmark case {name}")
            raise
    return out


def xla_dot(x, w):
    """XLA's ``x @ w^T`` with float32 accumulation, BF16 out (the BF16 and FP8 baselines)."""
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def measure_ceilings(n: int = 1 << 30, d: int = 8192) -> tuple[float, float]:
    """(copy bandwidth: read + write of ``n`` BF16, BF16 peak: a ``d^3`` dot), in bytes/s and FLOP/s."""
    x = jnp.ones((n,), jnp.bfloat16)
    a = jnp.ones((d, d), jnp.bfloat16)
    t = timed_cases({"copy": (lambda v: v + jnp.bfloat16(1.0), (x,)), "dot": (xla_dot, (a, a))})
    return 2 * 2 * n / t["copy"], 2 * d**3 / t["dot"]


def with_env(fn, env: dict[str, str]):
    """``fn`` traced with the environment variables ``env`` set (the kernels read their options at trace
    time); a new function object, so that ``jax.jit`` traces it afresh."""
    def call(*args):
        saved = {v: os.environ.get(v) for v in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
    return call


def mode_env(mode: str) -> dict[str, str]:
    """``--modes`` entry -> variables: ``PREFILL[:W[:PRODUCERS]]``, e.g. ``ws`` (W by TMA, the default),
    ``ws:regs``, ``ws:tma:2`` (two decode warpgroups), ``one-warpgroup``."""
    prefill, _, rest = mode.partition(":")
    w, _, producers = rest.partition(":")
    return {kg.PREFILL_ENV: prefill, "NVFP4JAX_GEMM_WS_W": w, "NVFP4JAX_GEMM_WS_PRODUCERS": producers}


def quantize_then_gemm(x, w):
    """Recipe nvfp4's linear as two calls: the NVFP4 quantize, then the GEMM (gemm_ws: ``dequant_rows`` too)."""
    return kg.nvfp4_gemm(kq.quantize_nvfp4(x), w)


def bench_shape(n: int, k: int, ms, modes=("",), linear: bool = False):
    """Yields ``(m, {recipe: seconds}, bytes W4A4, FLOPs)`` for one weight shape at each m in turn, each m
    timed in its own ``device_times`` run (so a run stopped by its time limit keeps the m values already
    measured; the weights are made once). With ``modes``, our recipes are keyed ``w4a4@mode`` /
    ``w4a16@mode``, each traced under :func:`mode_env`, and the baselines are measured once per m.
    ``linear``: also recipe nvfp4's whole linear from BF16 X, quantize included, as one op (``lin4``:
    :func:`kg.nvfp4_linear`, X decoded by the quantize on the gemm_ws path) and as quantize then GEMM
    (``qg4``)."""
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * 0.02)
    w = kg.as_tiled(jax.jit(quantize)(w32))  # the layout a loaded model holds (no per-call rearrangement)
    wb = w32.astype(jnp.bfloat16)
    w8 = w32.astype(jnp.float8_e4m3fn)
    del w32
    for m in ms:
        cases, ours = {}, set()
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        xq = kq.quantize_nvfp4(x)
        for mode in modes:
            at = f"@{mode}" if mode else ""
            gemm = with_env(kg.nvfp4_gemm, mode_env(mode)) if mode else kg.nvfp4_gemm
            cases[f"w4a4{at}"] = (gemm, (xq, w))
            cases[f"w4a16{at}"] = (gemm, (x, w))
            ours |= {f"w4a4{at}", f"w4a16{at}"}
            if linear:
                env = mode_env(mode) if mode else {}
                cases[f"lin4{at}"] = (with_env(kg.nvfp4_linear, env), (x, w))
                cases[f"qg4{at}"] = (with_env(quantize_then_gemm, env), (x, w))
                ours |= {f"lin4{at}", f"qg4{at}"}
        if m <= 64:
            cases["stream"] = (read_all, (w.values, w.scales))
        cases["bf16"] = (xla_dot, (x, wb))
        cases["fp8"] = (xla_dot, (x.astype(jnp.float8_e4m3fn), w8))
        yield m, timed_cases(cases, ours), n * k * 0.5625 + m * k * 0.5625 + 2 * m * n, 2.0 * m * n * k


def read_all(values, scales):
    """Every byte of an NVFP4 weight read once (XLA reductions over its codes and scales viewed as 32-bit
    words): the time a memory-bound kernel needs just to stream these bytes at this size, launch and
    ramp included -- the decode GEMM's practical floor beside the roofline's large-copy bandwidth (a
    19 MB weight streams well below a 2 GB copy's rate: session 4's load-only kernels)."""
    words = lambda a: jax.lax.bitcast_convert_type(a.reshape(-1, 4).view(jnp.uint8), jnp.uint32)
    return jnp.sum(words(values), dtype=jnp.uint32) + jnp.sum(words(scales), dtype=jnp.uint32)


def bench_quantize(shapes) -> dict:
    """{(m, k, kind): (seconds, bytes)} for quantize calls: ``plain``, ``fused`` (the fused RMSNorm), and
    gemm_ws's two X passes of recipe nvfp4 -- ``decoded`` (:func:`kq.quantize_nvfp4_decoded`, BF16 in,
    decoded BF16 out) and ``dequant`` (:func:`kw.dequant_rows`, NVFP4 in, decoded BF16 out)."""
    rng = np.random.default_rng(1)
    cases, nbytes = {}, {}
    for m, k in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        norm = jnp.asarray(1 + 0.1 * rng.standard_normal(k), jnp.bfloat16)
        cases[(m, k, "plain")] = (lambda x: kq.quantize_nvfp4(x), (x,))
        cases[(m, k, "fused")] = (lambda x, g: kq.quantize_nvfp4(x, g, 1e-6), (x, norm))
        cases[(m, k, "decoded")] = (lambda x: kq.quantize_nvfp4_decoded(x), (x,))
        cases[(m, k, "dequant")] = (kw.dequant_rows, (kq.quantize_nvfp4(x),))
        base = m * k * (2 + 0.5625) + 4 * m
        nbytes[(m, k, "plain")], nbytes[(m, k, "fused")] = base, base + 2 * k
        nbytes[(m, k, "decoded")] = m * k * (2 + 2 + 1 / 16) + 4 * m
        nbytes[(m, k, "dequant")] = m * k * (0.5625 + 2)
    t = timed_cases({str(c): v for c, v in cases.items()}, {str(c) for c in cases})
    return {c: (t[str(c)], nbytes[c]) for c in cases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Flash shapes at m in {1, 16, 64, 1024, 4096}, Pro at {1, 4096}")
    ap.add_argument("--names", default="", help="comma list of linear names to measure (default: all)")
    ap.add_argument("--models", default="flash,pro", help="comma list of models whose linears are measured")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new m values after this")
    ap.add_argument("--m", default="", help="comma list of m values for every shape (overrides --quick's)")
    ap.add_argument("--no-quantize", action="store_true", help="skip the quantize table")
    ap.add_argument("--modes", default="", help="comma list of prefill kernel modes timed side by side, "
                    "PREFILL[:W] (e.g. ws,ws:regs,one-warpgroup): a row per mode, the baselines measured once")
    ap.add_argument("--linear", action="store_true", help="also time recipe nvfp4's linear from BF16 X (quantize "
                    "included): kg.nvfp4_linear and quantize-then-GEMM, two more columns")
    args = ap.parse_args()
    models = set(filter(None, args.models.split(",")))
    if models - {"flash", "pro"}:
        ap.error(f"--models: unknown {sorted(models - {'flash', 'pro'})}; choose flash, pro")
    known = {name for name, _, _ in FLASH_LINEARS + PRO_LINEARS}
    if set(filter(None, args.names.split(","))) - known:
        ap.error(f"--names: unknown {sorted(set(args.names.split(',')) - known - {''})}; choose from {sorted(known)}")
    t_start = time.time()
    dev = jax.devices()[0].device_kind
    bw, peak = measure_ceilings()
    mode = kg.prefill_mode()
    prefill = {"auto": f"warp-specialized (gemm_ws) from {kg.WS_DENSE_MIN_M} rows and from {kg.WS_DENSE_MID_M} where "
                       f"m * n >= {kg.WS_DENSE_MID_MN}, one-warpgroup (gemm) otherwise",
               "one-warpgroup": "one-warpgroup (gemm)"}.get(mode, "warp-specialized (gemm_ws)")
    prefill = f"{prefill}, NVFP4JAX_GEMM_PREFILL={mode}; gemm_ws's W4A4 includes dequant_rows of X"
    if args.modes:
        prefill = ("per row the mode in brackets (baselines shared): NVFP4JAX_GEMM_PREFILL[:NVFP4JAX_GEMM_WS_W] "
                   "(no W: W by TMA, the default); gemm_ws's W4A4 includes dequant_rows of X")
    lines = [f"measured copy bandwidth {bw / 1e12:.2f} TB/s, BF16 dense peak {peak / 1e12:.0f} TFLOP/s ({dev}); "
             "device kernel times from the profiler trace, L2 flushed before each call (benchmarks/_timing.py); "
             f"m > 64: {prefill}", ""]
    # quantize first: cheap, and a run cut short by the device budget should still have it
    q_shapes = () if args.no_quantize else ((1, 4096), (16, 7168), (4096, 4096), (16384, 7168))
    if q_shapes:
        lines += [("| quantize m | k | us | % copy BW | fused RMSNorm us | % copy BW | decoded (gemm_ws X) us "
                   "| % copy BW | dequant_rows us | % copy BW |"), "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    q = bench_quantize(q_shapes) if q_shapes else {}
    for m, k in q_shapes:
        cells = []
        for kind in ("plain", "fused", "decoded", "dequant"):
            t, nbytes = q[(m, k, kind)]
            pct = 100 * nbytes / t / bw
            cells += [f"{t * 1e6:.1f}", f"{pct:.0f}" if pct <= 110 else f"{pct:.0f} INVALID (above copy BW)"]
        lines.append(f"| {m} | {k} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    if q_shapes:
        lines.append("")
    lines += ["| model | linear | n | k | m | W4A4 us | W4A16 us | BF16 us | FP8 us | roofline us | W4A4 % roof | x BF16 (W4A4) | x BF16 (W4A16) | W read-only us | W4A4 % read-only |"
              + (" W4A4 linear us (quantize incl.) | quantize + W4A4 us | x BF16 (linear) |" if args.linear else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.linear else "")]
    print("\n".join(lines[-2:]), flush=True)
    quick_m = (1, 16, 64, 1024, 4096)
    m_flash, m_pro = (quick_m, (1, 4096)) if args.quick else (M_VALUES, M_VALUES)
    if args.m:
        m_flash = m_pro = tuple(int(v) for v in args.m.split(","))
    shapes = [("flash", *s, m_flash) for s in FLASH_LINEARS] + [("pro", *s, m_pro) for s in PRO_LINEARS]
    shapes = [s for s in shapes if s[0] in models]
    keep = set(filter(None, args.names.split(",")))
    # a run killed by `timeout` (SIGTERM) still appends the rows measured so far
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench_shapes(args, [s for s in shapes if not keep or s[1] in keep], bw, peak, t_start, lines)
    finally:
        if args.out:
            append_results(args.out, "nvfp4_gemm / quantize_nvfp4", lines)


def bench_shapes(args, shapes, bw: float, peak: float, t_start: float, lines: list[str]) -> None:
    """The GEMM table's rows, appended to ``lines`` and printed as each m is measured, until
    ``--budget-s`` has passed (checked before each m; the rest named in a last row)."""
    modes = tuple(filter(None, args.modes.split(","))) or ("",)
    for model, name, n, k, ms in shapes:
        for m, t, nbytes, flops in bench_shape(n, k, ms, modes, args.linear):
            roof = max(nbytes / bw, flops / peak)
            for mode in modes:
                at = f"@{mode}" if mode else ""
                a4, a16 = t[f"w4a4{at}"], t[f"w4a16{at}"]
                label = f"{name} [{mode}]" if mode else name
                line = (f"| {model} | {label} | {n} | {k} | {m} | {a4 * 1e6:.1f} | {a16 * 1e6:.1f} | "
                        f"{t['bf16'] * 1e6:.1f} | {t['fp8'] * 1e6:.1f} | {roof * 1e6:.1f} | {100 * roof / a4:.0f} | "
                        f"{t['bf16'] / a4:.2f} | {t['bf16'] / a16:.2f} | ")
                stream = t.get("stream")  # decode rows: the weight's bytes merely read (read_all)
                line += f"{stream * 1e6:.1f} | {100 * stream / a4:.0f} |" if stream else "- | - |"
                if args.linear:
                    lin, qg = t[f"lin4{at}"], t[f"qg4{at}"]
                    line += f" {lin * 1e6:.1f} | {qg * 1e6:.1f} | {t['bf16'] / lin:.2f} |"
                lines.append(line)
                print(line, flush=True)
            if time.time() - t_start > args.budget_s and (m != ms[-1] or (model, name) != shapes[-1][:2]):
                rest = [f"m > {m}"] if m != ms[-1] else []
                later = shapes[[s[:2] for s in shapes].index((model, name)) + 1:]
                rest += [f"{s[0]} {s[1]}" for s in later]
                lines.append(f"| (stopped by the time budget after {model} {name} m = {m}: not measured "
                             f"{', '.join(rest)}) |")
                print(lines[-1], flush=True)
                return


if __name__ == "__main__":
    main()

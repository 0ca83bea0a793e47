"""MoE layer benchmark (GPU): ours (recipes nvfp4 and nvfp4-w4a16) vs ``jax.lax.ragged_dot`` in BF16, with rooflines.

Layers: V4-Flash (256 experts, top-6, dim 4096, inter 2048) and V4-Pro (384, 7168, 3072) at
T in {1, 8, 64, 512, 4096, 16384} tokens. Routing is uniform: router logits are i.i.d. normal, so
``route`` (zero bias) picks 6 distinct experts per token uniformly, with the weights it computes.

Measured per (model, T):
* ours: ``nvfp4jax.kernels.moe.moe_experts`` (BF16 ``x``, routing weights and ids -> float32 sum of
  the 6 expert outputs), recipe ``nvfp4`` (``quantize_activations=True``) and ``nvfp4-w4a16``;
* route + group (XLA): ``route`` from router logits ``[T, experts]`` (the router GEMM excluded),
  then the stable sort by expert, per-expert counts and the gather of the token rows, which a
  ``ragged_dot`` user needs (our kernel call does its own sort/counts and includes them);
* ``ragged_dot`` BF16: what a JAX user has -- rows sorted by expert, ``ragged_dot`` for w1 and w3
  (float32 out), SwiGLU with the clamps and routing weight, BF16 ``h``, ``ragged_dot`` for w2, the
  float32 combine; BF16 weights stored in ``ragged_dot``'s rhs layout (``[experts, dim, inter]``
  for w1/w3, ``[experts, inter, dim]`` for w2: the math of ``[experts, inter, dim]`` weights with no
  transpose per call). Pro's BF16 experts are 3 x 384 x 7168 x 3072 x 2 B = 50.7 GB: allocated only
  when the device reports that much free; "does not fit" / "OOM" / errors are result rows.

Weights are synthetic and made on the device (no host round trip; 25 G NVFP4 weights for Pro would
not fit as float32): random E2M1 codes, E4M3 block scales drawn from [0.5, 1.875] (codes 0x30..0x3F,
never NaN), one global scale per expert; BF16 weights ``0.02 * normal``. The values do not change
the work done.

Timing (``benchmarks/_timing.py``): device kernel time of single jitted calls from the JAX
profiler's trace, median of 5, L2 flushed before every call: the sum of the call's kernels (the
"us" columns) and, for ours, the span from its first kernel's start to its last kernel's end (launch
gaps between its ~20 kernels included). Each timed call of ours must show at least the two
grouped-GEMM CuTeDSL kernels in the trace, else the entry is an error.
Rooflines, from ceilings measured in the same run (``measure_ceilings``: copy bandwidth, BF16 dense
peak): bytes = distinct experts hit x 3 x dim x inter x 0.5625 B (NVFP4 expert weights, activations
not counted); FLOPs = 2 x T x 6 x 3 x dim x inter; roofline = max(bytes / bandwidth, FLOPs / peak).

Phases per model: our weights (14.3 GB for Pro) and our timings, then they are freed and the BF16
weights made for ``ragged_dot``; after ``ragged_dot`` runs out of memory at some T, larger T are
recorded as such without being tried.

Usage (GPU machine): ``python benchmarks/moe.py [--quick] [--out benchmarks/RESULTS.md] [--budget-s 480]``
(``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` lets Pro's 50.7 GB of BF16 weights fit on an 80 GB card;
with the default 75% they are recorded as "does not fit").
``--cpu-smoke``: tiny shapes on CPU with the *reference* MoE in place of the kernel, to exercise the
weight generation, routing, timing, baseline and failure paths; its numbers mean nothing and it
refuses ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import append_results, checked, device_times
from benchmarks.gemm import measure_ceilings
from nvfp4jax.formats.nvfp4 import TILE_K, TILE_ROWS, NVFP4Tensor
from nvfp4jax.ref import moe as ref

TOPK = 6
SWIGLU_LIMIT = 10.0
NVFP4_BYTES = 0.5625  # per weight: 4-bit code + one E4M3 scale per 16
#: model -> (experts, dim, inter, routed scale)
MODELS = {"flash": (256, 4096, 2048, 1.5), "pro": (384, 7168, 3072, 2.5)}
SMOKE_MODELS = {"flash-tiny": (16, 256, 128, 1.5), "pro-tiny": (24, 384, 256, 2.5)}
T_VALUES = (1, 8, 64, 512, 4096, 16384)
QUICK_T = (1, 64, 16384)
SMOKE_T = (1, 8, 64)


# --------------------------------------------------------------------------- inputs, made on the device
@functools.partial(jax.jit, static_argnums=1)
def random_nvfp4_experts(key, shape: tuple[int, int, int]) -> NVFP4Tensor:
    """``[experts, rows, k]`` NVFP4 with random codes, valid E4M3 scales in [0.5, 1.875], global 0.02 / 3,
    drawn directly in the kernels' tile layout (``formats.nvfp4``; the layout a loaded model holds).

    One expert at a time (``lax.map``), so the random-bit temporaries stay small.
    """
    experts, rows, k = shape
    tiles = (rows // TILE_ROWS, k // TILE_K, TILE_ROWS)

    def one(key):
        kv, ks = jax.random.split(key)
        values = jax.random.bits(kv, (*tiles, TILE_K // 2), jnp.uint8)
        scale_codes = jnp.uint8(0x30) | (jax.random.bits(ks, (*tiles, TILE_K // 16), jnp.uint8) & jnp.uint8(0x0F))
        return values, jax.lax.bitcast_convert_type(scale_codes, jnp.float8_e4m3fn)

    values, scales = jax.lax.map(one, jax.random.split(key, experts))
    # rms of a uniform random E2M1 code is ~2.9, so weights are ~0.02 rms
    return NVFP4Tensor(values, scales, jnp.full((experts,), 0.02 / 3, jnp.float32), "tiled")


@functools.partial(jax.jit, static_argnums=1)
def random_bf16_experts(key, shape: tuple[int, int, int]) -> jax.Array:
    """``0.02 * normal`` BF16 ``[experts, a, b]``, one expert at a time."""
    return jax.lax.map(lambda k: (0.02 * jax.random.normal(k, shape[1:], jnp.float32)).astype(jnp.bfloat16),
                       jax.random.split(key, shape[0]))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def random_layer_inputs(key, t: int, experts: int, dim: int, routed_scale: float):
    """BF16 ``x [t, dim]``, router logits ``[t, experts]`` and their uniform routing (weights, ids)."""
    kx, kl = jax.random.split(key)
    x = jax.random.normal(kx, (t, dim), jnp.float32).astype(jnp.bfloat16)
    logits = jax.random.normal(kl, (t, experts), jnp.float32)
    weights, ids = ref.route(logits, TOPK, routed_scale, bias=jnp.zeros((experts,), jnp.float32))
    return x, logits, weights, ids


# --------------------------------------------------------------------------- the measured computations
def group_by_expert(x, weights, ids, experts: int):
    """(order, sizes, x rows in expert order, routing weights in expert order): the grouping a
    ``ragged_dot`` MoE needs."""
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
    return order, sizes, x[order // ids.shape[1]], weights.reshape(-1)[order]


def ragged_dot_moe(x, weights, ids, w1t, w3t, w2t):
    """Routed experts with ``jax.lax.ragged_dot`` in BF16: ``w1t``/``w3t`` ``[experts, dim, inter]``,
    ``w2t`` ``[experts, inter, dim]``; float32 ``[t, dim]`` like ``moe_experts``."""
    t, k = ids.shape
    order, sizes, xs, ws = group_by_expert(x, weights, ids, w1t.shape[0])
    gate = jax.lax.ragged_dot(xs, w1t, sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, w3t, sizes, preferred_element_type=jnp.float32)
    h = (ref.swiglu(gate, up, SWIGLU_LIMIT) * ws[:, None]).astype(jnp.bfloat16)
    y = jax.lax.ragged_dot(h, w2t, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros((t * k, y.shape[1]), jnp.float32).at[order].set(y).reshape(t, k, -1).sum(axis=1)


def route_group_call(routed_scale: float, experts: int):
    """``(logits, x)``: route from the logits, group the rows of ``x`` (what a ``ragged_dot`` user needs)."""

    def call(logits, x):
        weights, ids = ref.route(logits, TOPK, routed_scale, bias=jnp.zeros((experts,), jnp.float32))
        return group_by_expert(x, weights, ids, experts)

    return call


# --------------------------------------------------------------------------- measuring
def describe_failure(e: BaseException) -> str:
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        return "OOM"
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"error: {type(e).__name__}: {first[:100]}".replace("|", "/")


def measure(fn, args, kernel_calls: int = 0) -> tuple[float | str, float | str]:
    """(kernel seconds, span seconds) of one call, or failure strings (the run goes on).
    ``kernel_calls``: CuTeDSL kernels the call must show in the trace."""
    try:
        r = checked(device_times({"case": (fn, args)})["case"], kernel_calls)
    except Exception as e:  # noqa: BLE001 -- every failure is a result row
        traceback.print_exception(e, limit=2, file=sys.stderr)
        why = describe_failure(e)
        return why, why
    return r["kernels"], r["span"]


def free_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def _us(v: float | str) -> str:
    return f"{v * 1e6:.1f}" if isinstance(v, float) else v


def _ratio(num: float | str, den: float | str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if isinstance(num, float) and isinstance(den, float):
        return fmt.format(scale * num / den)
    return "-"


# --------------------------------------------------------------------------- one model
def bench_model(name, shape, t_values, ours, ours_kernel_calls, bw, peak, deadline, emit):
    experts, dim, inter, routed_scale = shape
    key = jax.random.key(sum(map(ord, name)))
    inputs = {t: random_layer_inputs(jax.random.fold_in(key, t), t, experts, dim, routed_scale) for t in t_values}
    res = {t: {} for t in t_values}

    def run(label: str, t: int, fn, args, kernel_calls: int = 0) -> None:
        over = time.time() > deadline
        res[t][label], res[t][label + " span"] = ("not run (budget)",) * 2 if over else measure(fn, args, kernel_calls)
        emit(f"  {name} T={t} {label}: {_us(res[t][label])}{' us' if isinstance(res[t][label], float) else ''} "
             f"(span {_us(res[t][label + ' span'])})")

    kw, kd, k2 = jax.random.split(jax.random.fold_in(key, 1), 3)
    try:
        w = (random_nvfp4_experts(kw, (experts, inter, dim)), random_nvfp4_experts(kd, (experts, inter, dim)),
             random_nvfp4_experts(k2, (experts, dim, inter)))
        jax.block_until_ready(w)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(limit=2, file=sys.stderr)
        w, failed = None, f"weights: {describe_failure(e)}"
    for t in t_values:
        x, logits, weights, ids = inputs[t]
        for recipe, qa in (("nvfp4", True), ("w4a16", False)):
            if w is None:
                res[t][recipe] = failed
            else:
                moe = functools.partial(ours, swiglu_limit=SWIGLU_LIMIT, quantize_activations=qa)
                run(recipe, t, moe, (x, weights, ids, *w), ours_kernel_calls)
        run("route+group", t, route_group_call(routed_scale, experts), (logits, x))
    w = None  # free our weights before the BF16 ones are made

    need = 3 * experts * dim * inter * 2
    free = free_device_bytes()
    wb, oom_at = None, None
    if free is not None and need > 0.95 * free:
        why = f"does not fit ({need / 1e9:.1f} GB BF16 weights, {free / 1e9:.1f} GB free)"
    else:
        try:
            wb = (random_bf16_experts(kw, (experts, dim, inter)), random_bf16_experts(kd, (experts, dim, inter)),
                  random_bf16_experts(k2, (experts, inter, dim)))
            jax.block_until_ready(wb)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(limit=2, file=sys.stderr)
            wb, why = None, f"weights: {describe_failure(e)}"
    for t in t_values:
        x, _, weights, ids = inputs[t]
        if wb is None:
            res[t]["ragged"] = why
        elif oom_at is not None:
            res[t]["ragged"] = f"OOM at T={oom_at} (not tried)"
        else:
            run("ragged", t, ragged_dot_moe, (x, weights, ids, *wb))
            if res[t]["ragged"] == "OOM":
                oom_at = t
    wb = None

    rows = []
    for t in t_values:
        r = res[t]
        hit = int(jnp.sum(jnp.bincount(inputs[t][3].reshape(-1), length=experts) > 0))
        nbytes = hit * 3 * dim * inter * NVFP4_BYTES
        flops = 2.0 * t * TOPK * 3 * dim * inter
        roof = max(nbytes / bw, flops / peak)
        bound = "memory" if nbytes / bw >= flops / peak else "compute"
        rows.append(
            f"| {name} | {experts} | {t} | {hit} | {_us(r['nvfp4'])} | {_us(r['nvfp4 span'])} | {_us(r['w4a16'])} | "
            f"{_us(r['route+group'])} | "
            f"{_us(r['ragged'])} | {roof * 1e6:.1f} | {bound} | {_ratio(roof, r['nvfp4'], 100, '{:.0f}')} | "
            f"{_ratio(roof, r['w4a16'], 100, '{:.0f}')} | {_ratio(r['ragged'], r['nvfp4'])} | {_ratio(r['ragged'], r['w4a16'])} |"
        )
        emit(rows[-1])
    return rows


def ws_configs(models: dict, t_values) -> str:
    """Which calls run the grouped GEMMs on gemm_ws and with what token tile (and tail), as the kernels choose
    them at trace time under the current environment: the tables then say which kernel each row timed."""
    from nvfp4jax.kernels import moe as km

    out = []
    for name, (experts, dim, inter, _) in models.items():
        for t in t_values:
            rows = t * TOPK
            if km.uses_ws(rows, experts, 2 * inter):
                cfg = km.choose_grouped_prefill_config(rows, experts, True, gate_up=True, swiglu_limit=SWIGLU_LIMIT)
                tail = f" + tail {cfg.tail}" if cfg.tail else ""
                out.append(f"{name} T={t} tile {cfg.tile_t}{tail}, W {'by TMA' if cfg.w_tma else 'to registers'}")
    return "grouped GEMMs on gemm_ws: " + "; ".join(out) if out else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"T in {QUICK_T} only")
    ap.add_argument("--t", default=None, help="comma list of token counts (overrides --quick)")
    ap.add_argument("--out", default=None, help="append the table to this markdown file (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new measurements after this")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes, the reference MoE in place of the kernel; exercises the script, measures nothing")
    args = ap.parse_args()
    if args.cpu_smoke and args.out:
        ap.error("--cpu-smoke numbers are meaningless; it does not write --out")
    t_start = time.time()
    deadline = t_start + args.budget_s
    dev = jax.devices()[0].device_kind
    lines = []

    def emit(line: str, record: bool = False):
        print(line, flush=True)
        if record:
            lines.append(line)

    if args.cpu_smoke:
        emit("SMOKE RUN (--cpu-smoke): tiny shapes, the REFERENCE MoE (nvfp4jax.ref.moe) stands in for the kernel; "
             "no number below measures anything of ours", record=True)
        models, t_values, ours, kernel_calls = SMOKE_MODELS, SMOKE_T, ref.moe_experts, 0
        bw, peak = measure_ceilings(1 << 24, 512)  # CPU numbers: meaningless for a GPU
    else:
        from nvfp4jax.kernels import moe as km

        # the two grouped GEMMs (L1, L2) at least must be in every timed call
        models, t_values, ours, kernel_calls = MODELS, QUICK_T if args.quick else T_VALUES, km.moe_experts, 2
        if args.t:
            t_values = tuple(int(v) for v in args.t.split(","))
        bw, peak = measure_ceilings()
    opt_in = " ".join(f"{v}={os.environ[v]}" for v in ("NVFP4JAX_GEMM_PREFILL", "NVFP4JAX_MOE_GROUP",
                                                        "NVFP4JAX_GEMM_W_REGS", "NVFP4JAX_MOE_CTAS_PER_SM",
                                                        "NVFP4JAX_GEMM_WS_W", "NVFP4JAX_MOE_WS_TAIL",
                                                        "NVFP4JAX_GEMM_PREFETCH")
                      if os.environ.get(v))
    ws_note = "" if args.cpu_smoke else ws_configs(models, t_values)
    emit(f"measured copy bandwidth {bw / 1e12:.2f} TB/s, BF16 dense peak {peak / 1e12:.0f} TFLOP/s ({dev})"
         + (f"; kernel options: {opt_in}" if opt_in else "") + (f"; {ws_note}" if ws_note else ""),
         record=True)
    emit("", record=True)
    emit("| model | experts | T | experts hit | ours nvfp4 us | nvfp4 span us | ours w4a16 us | route+group (XLA) us "
         "| ragged_dot BF16 us | roofline us | bound | nvfp4 % roof | w4a16 % roof | x ragged (nvfp4) | x ragged (w4a16) |",
         record=True)
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", record=True)
    for name, shape in models.items():
        lines.extend(bench_model(name, shape, t_values, ours, kernel_calls, bw, peak, deadline, emit))
    if time.time() > deadline:
        emit(f"\n(time budget of {args.budget_s:.0f} s reached: entries marked 'not run (budget)' were not measured)",
             record=True)
    if args.out:
        append_results(args.out, "moe_experts (routed experts)", lines)

if __name__ == "__main__":
    main()

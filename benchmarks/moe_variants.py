"""Our MoE layer under several kernel-option settings, side by side in one process (GPU).

``benchmarks/moe.py`` times one setting per process, with the ``ragged_dot`` baseline and the routing
beside it; this times only ``nvfp4jax.kernels.moe.moe_experts`` (both recipes) at the given T for each
setting of ``--variants``: the kernels read their options when a call is traced, so each variant is the
same call traced with its variables set (``benchmarks.gemm.with_env``), on the same weights and inputs
(uniform routing, ``benchmarks/moe.py``'s synthetic weights), timed in one ``device_times`` run (profiler
trace, L2 flushed, median of 5). Prints per (model, T, recipe) the time of each variant, its % of the BF16
peak measured in the same run, and its ratio to the first variant.

Usage: ``python benchmarks/moe_variants.py --t 16384 --models flash,pro
--variants "NVFP4JAX_GEMM_WS_PRODUCERS=1;NVFP4JAX_GEMM_WS_PRODUCERS=2" [--out benchmarks/RESULTS.md]``
(a variant is ``VAR=VALUE[,VAR=VALUE...]``; ``-`` is the defaults).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import append_results, checked, device_times
from benchmarks.gemm import measure_ceilings, with_env
from benchmarks.moe import (
    MODELS,
    SWIGLU_LIMIT,
    TOPK,
    random_layer_inputs,
    random_nvfp4_experts,
)


def parse_variant(text: str) -> dict[str, str]:
    """``VAR=VALUE[,VAR=VALUE...]`` (or ``-``: no variables) -> {VAR: VALUE}."""
    text = text.strip()
    if text in ("", "-"):
        return {}
    env = {}
    for item in text.split(","):
        var, sep, value = item.partition("=")
        if not sep or not var.strip():
            raise SystemExit(f"--variants: {item!r} is not VAR=VALUE")
        env[var.strip()] = value.strip()
    return env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", default="16384", help="comma list of token counts")
    ap.add_argument("--models", default="flash,pro", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--variants", required=True, help="';'-separated VAR=VALUE[,VAR=VALUE] settings ('-': defaults)")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(";")]
    envs = [parse_variant(v) for v in variants]
    t_values = [int(v) for v in args.t.split(",")]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if jax.devices()[0].platform != "gpu":
        ap.error("this benchmark times GPU kernels: run it on the GPU machine")
    from nvfp4jax.kernels import moe as km

    dev = jax.devices()[0].device_kind
    _, peak = measure_ceilings()
    lines = [f"BF16 dense peak {peak / 1e12:.0f} TFLOP/s ({dev}); variants: "
             + "; ".join(f"{i}: {v or '-'}" for i, v in enumerate(variants)), "",
             "| model | T | recipe | " + " | ".join(f"variant {i} us (% peak, x v0)" for i in range(len(variants))) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    for line in lines:
        print(line, flush=True)
    for name in models:
        experts, dim, inter, routed_scale = MODELS[name]
        key = jax.random.key(sum(map(ord, name)))
        kw, kd, k2 = jax.random.split(jax.random.fold_in(key, 1), 3)
        w = (random_nvfp4_experts(kw, (experts, inter, dim)), random_nvfp4_experts(kd, (experts, inter, dim)),
             random_nvfp4_experts(k2, (experts, dim, inter)))
        for t in t_values:
            x, _, weights, ids = random_layer_inputs(jax.random.fold_in(key, t), t, experts, dim, routed_scale)
            flops = 2.0 * t * TOPK * 3 * dim * inter
            for recipe, qa in (("nvfp4", True), ("w4a16", False)):
                moe = functools.partial(km.moe_experts, swiglu_limit=SWIGLU_LIMIT, quantize_activations=qa)
                cases = {str(i): (with_env(moe, env), (x, weights, ids, *w)) for i, env in enumerate(envs)}
                times = {i: checked(r, 2)["kernels"] for i, r in device_times(cases).items()}
                cells = [f"{times[str(i)] * 1e6:.1f} ({100 * flops / peak / times[str(i)]:.0f}%, "
                         f"{times['0'] / times[str(i)]:.2f}x)" for i in range(len(envs))]
                lines.append(f"| {name} | {t} | {recipe} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
        w = None
    if args.out:
        append_results(args.out, "moe_experts variants", lines)


if __name__ == "__main__":
    main()

"""Per-kernel device times of single calls, under Nsight Compute (GPU): where does a call's time go?

Each case is compiled and run once untimed, then run once inside the profiled range; a marker
kernel ``mark_<case>`` (cupy) is launched before each case, so in ncu's per-kernel list every
kernel after a marker belongs to that case. ncu replays each kernel with caches flushed
(``--cache-control all``) and, with ``--clock-control none``, at the clocks the card would run.

Usage (GPU machine):
``ncu --profile-from-start off --cache-control all --clock-control none --metrics gpu__time_duration.sum \
--csv python benchmarks/profile_kernels.py [cases] > kernels.csv`` then
``python benchmarks/profile_kernels.py --summarize kernels.csv`` (any machine).
"""

from __future__ import annotations

import csv
import functools
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summarize(path: str) -> None:
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    head, rows = rows[0], rows[1:]
    name_i, metric_i, value_i = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    unit_i = head.index("Metric Unit")
    case, per = None, defaultdict(list)
    for r in rows:
        if r[metric_i] != "gpu__time_duration.sum":
            continue
        name = r[name_i]
        if name.startswith("mark_"):
            case = name[5:]
            continue
        scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}[r[unit_i]]
        per[case].append((name, float(r[value_i].replace(",", "")) * scale))
    for case, ks in per.items():
        print(f"{case}: {len(ks)} kernels, {sum(t for _, t in ks):.1f} us")
        for name, t in ks:
            print(f"    {t:9.1f} us  {name[:110]}")


def summarize_trace(path: str) -> None:
    """Kernels of each case from a JAX profiler perfetto trace (``--trace DIR``): device events
    inside the case's host annotation window (every case ends with a block_until_ready)."""
    import gzip
    import json

    files = sorted(Path(path).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(files[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    windows = [(e["ts"], e["ts"] + e["dur"], e["name"][5:]) for e in events
               if e.get("ph") == "X" and str(e.get("name", "")).startswith("case:")]
    tids = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = [e for e in events if e.get("ph") == "X" and "/device:GPU" in pids.get(e["pid"], "") and "dur" in e]
    # stream lines hold the kernels; "XLA Modules"/"XLA Ops" lines repeat them (not summed)
    kernels = [e for e in device if "Stream" in tids.get((e["pid"], e["tid"]), "Stream")]
    modules = [e for e in device if tids.get((e["pid"], e["tid"]), "") == "XLA Modules"]
    span = defaultdict(list)
    for e in modules:
        for t0, t1, case in windows:
            if t0 <= e["ts"] <= t1:
                span[case.rsplit("#", 1)[0]].append(e["dur"])
    per = defaultdict(lambda: defaultdict(list))
    for e in kernels:
        for t0, t1, case in windows:
            if t0 <= e["ts"] <= t1:
                per[case.rsplit("#", 1)[0]][case].append((e["name"], e["dur"]))
    for case, runs in per.items():
        runs = list(runs.values())
        best = min(runs, key=lambda ks: sum(t for _, t in ks))
        sums = [sum(t for _, t in ks) for ks in runs]
        mods = ", ".join(f"{d:.1f}" for d in span.get(case, []))
        print(f"{case}: {len(best)} kernels, sum {min(sums):.1f} us (runs: {', '.join(f'{s:.1f}' for s in sums)}); "
              f"XLA module spans: {mods or '-'} us")
        for name, t in best:
            print(f"    {t:9.1f} us  {name[:110]}")


def main(selected: list[str], trace_dir: str | None = None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.moe import MODELS, SWIGLU_LIMIT, random_layer_inputs, random_nvfp4_experts
    from nvfp4jax.formats.nvfp4 import quantize
    from nvfp4jax.kernels import gemm as kg, moe as km, quantize as kq

    rng = np.random.default_rng(0)
    cases = {}

    def dense(tag, n, k, ms):
        w32 = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * 0.02)
        w, wb = jax.jit(quantize)(w32), w32.astype(jnp.bfloat16)
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            cases[f"{tag}_m{m}_w4a16"] = (lambda x, w: kg.nvfp4_gemm(x, w), (x, w))
            cases[f"{tag}_m{m}_w4a4"] = (lambda x, w: kg.nvfp4_gemm(kq.quantize_nvfp4(x), w), (x, w))
            cases[f"{tag}_m{m}_bf16"] = (lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32)
                                         .astype(jnp.bfloat16), (x, wb))

    def moe(tag, model, ts):
        experts, dim, inter, scale = MODELS[model]
        key = jax.random.key(0)
        ws = [random_nvfp4_experts(jax.random.fold_in(key, i), s)
              for i, s in enumerate(((experts, inter, dim), (experts, inter, dim), (experts, dim, inter)))]
        for t in ts:
            x, _, rw, ids = random_layer_inputs(jax.random.fold_in(key, t), t, experts, dim, scale)
            for recipe, qa in (("nvfp4", True), ("w4a16", False)):
                f = functools.partial(km.moe_experts, swiglu_limit=SWIGLU_LIMIT, quantize_activations=qa)
                cases[f"{tag}_T{t}_{recipe}"] = (f, (x, rw, ids, *ws))

    want = set(selected)
    if not want or "dense" in want:
        dense("flash_wq_b", 32768, 1024, (1, 16))
        dense("flash_wo_b", 4096, 8192, (1, 4096))
    if not want or "moe" in want:
        moe("flash_moe", "flash", (1, 64, 16384))

    if trace_dir:
        flush = jax.jit(lambda b: b + 1)
        buf = jnp.zeros((256 << 20,), jnp.uint8)
        fns = {name: jax.jit(f) for name, (f, _) in cases.items()}
        for name, (_, args) in cases.items():
            jax.block_until_ready(fns[name](*args))
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for name, (_, args) in cases.items():
                for rep in range(3):
                    buf = jax.block_until_ready(flush(buf))  # L2 holds the flush buffer, not this case's data
                    with jax.profiler.TraceAnnotation(f"case:{name}#{rep}"):
                        jax.block_until_ready(fns[name](*args))
        return
    import cupy

    mark = {}
    for name, (f, args) in cases.items():
        fn = jax.jit(f)
        jax.block_until_ready(fn(*args))
        mark[name] = cupy.ElementwiseKernel("float32 x", "float32 y", "y = x", f"mark_{name}")
        cases[name] = (fn, args)
    dummy = cupy.zeros(1, cupy.float32)
    for k in mark.values():
        k(dummy)
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStart()
    for name, (fn, args) in cases.items():
        mark[name](dummy)
        cupy.cuda.runtime.deviceSynchronize()
        jax.block_until_ready(fn(*args))
    cupy.cuda.runtime.profilerStop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2])
    elif sys.argv[1:2] == ["--summarize-trace"]:
        summarize_trace(sys.argv[2])
    elif sys.argv[1:2] == ["--trace"]:
        main(sys.argv[3:], sys.argv[2])
    else:
        main(sys.argv[1:])

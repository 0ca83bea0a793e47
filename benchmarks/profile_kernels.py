"""Per-kernel device times of single calls (GPU): where does a GEMM's or an MoE layer's time go?

Each case (dense GEMMs in both recipes and XLA BF16; V4-Flash MoE layers in both recipes) is timed by
``benchmarks/_timing.device_times``: single calls, L2 flushed before each, kernel times from the JAX
profiler trace, median of 3. For each case it prints the kernel sum, the first-to-last-kernel span and
every kernel of the median run. (Nsight Compute segfaulted when profiling the JAX process on the GPU
image, hence the profiler trace.)

Usage (GPU machine): ``python benchmarks/profile_kernels.py [dense] [moe]`` (default: both).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import device_times  # noqa: E402
from benchmarks.gemm import xla_dot  # noqa: E402
from benchmarks.moe import MODELS, SWIGLU_LIMIT, random_layer_inputs, random_nvfp4_experts  # noqa: E402
from nvfp4jax.formats.nvfp4 import quantize  # noqa: E402


def dense_cases(rng, tag: str, n: int, k: int, ms) -> dict:
    from nvfp4jax.kernels import gemm as kg, quantize as kq

    w32 = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * 0.02)
    w, wb = kg.as_tiled(jax.jit(quantize)(w32)), w32.astype(jnp.bfloat16)
    cases = {}
    for m in ms:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        cases[f"{tag}_m{m}_w4a16"] = (kg.nvfp4_gemm, (x, w))
        cases[f"{tag}_m{m}_w4a4"] = (lambda x, w: kg.nvfp4_gemm(kq.quantize_nvfp4(x), w), (x, w))
        cases[f"{tag}_m{m}_bf16"] = (xla_dot, (x, wb))
    return cases


def moe_cases(tag: str, model: str, ts) -> dict:
    from nvfp4jax.kernels import moe as km

    experts, dim, inter, scale = MODELS[model]
    key = jax.random.key(0)
    ws = [random_nvfp4_experts(jax.random.fold_in(key, i), s)
          for i, s in enumerate(((experts, inter, dim), (experts, inter, dim), (experts, dim, inter)))]
    cases = {}
    for t in ts:
        x, _, rw, ids = random_layer_inputs(jax.random.fold_in(key, t), t, experts, dim, scale)
        for recipe, qa in (("nvfp4", True), ("w4a16", False)):
            f = functools.partial(km.moe_experts, swiglu_limit=SWIGLU_LIMIT, quantize_activations=qa)
            cases[f"{tag}_T{t}_{recipe}"] = (f, (x, rw, ids, *ws))
    return cases


def main(selected: list[str]) -> None:
    want = set(selected) or {"dense", "moe"}
    rng = np.random.default_rng(0)
    cases = {}
    if "dense" in want:
        cases |= dense_cases(rng, "flash_wq_b", 32768, 1024, (1, 16))
        cases |= dense_cases(rng, "flash_wo_b", 4096, 8192, (1, 4096))
    if "moe" in want:
        cases |= moe_cases("flash_moe", "flash", (1, 64, 16384))
    print(f"{jax.devices()[0].device_kind}: kernel times from the profiler trace, L2 flushed before each call")
    for name, r in device_times(cases, reps=3).items():
        if "error" in r:
            print(f"{name}: error {type(r['error']).__name__}: {r['error']}")
            continue
        print(f"{name}: {len(r['per_kernel'])} kernels, sum {r['kernels'] * 1e6:.1f} us, span {r['span'] * 1e6:.1f} us")
        for kname, t in r["per_kernel"]:
            print(f"    {t * 1e6:9.1f} us  {kname[:110]}")


if __name__ == "__main__":
    main(sys.argv[1:])

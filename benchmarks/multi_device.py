"""Multi-device decode benchmark: tokens/s and per-layer time at batch 1, 32, 256 on a device mesh.

The model (synthetic weights made on the device, not a checkpoint) is built at a preset's full
width with ``--layers`` blocks, placed by ``nvfp4jax.sharding.shard_model`` on a
``(data, expert, tensor)`` mesh of ``--devices`` devices, and run as one jitted cached decode step
(``Transformer.step``, state donated) under ``jax.set_mesh`` (so the routed experts are expert
parallel, all-to-all dispatch). Timing: ``--warmup`` untimed steps (compilation excluded), then the
median of ``--steps`` steps, each ended by ``block_until_ready``. Reported: step time, decode
tokens/s (= batch / step time) and step time / layers (which includes the embedding and head share).
``--config auto`` picks the largest preset (pro, flash, tiny) whose weights fit the devices'
memory at ``--layers`` depth (weights are built on one device first, then placed: the largest
*per-device* footprint is the whole model, a limit of this script, not of the sharding).

Runs on CPU fake devices too, to prove it works::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python benchmarks/multi_device.py --config tiny --batches 1,4 --steps 3

CPU numbers say nothing about GPUs; never record them in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nvfp4jax import ops
from nvfp4jax.checkpoint.schema import F32, I64, block_schema, global_schema
from nvfp4jax.config import DeepSeekV4Config, preset
from nvfp4jax.formats.nvfp4 import NVFP4Tensor
from nvfp4jax.model import model_from_tensors
from nvfp4jax.model.weights import is_big_linear
from nvfp4jax.sharding import make_mesh, shard_batch, shard_model, shard_state
from nvfp4jax.state import init_state


def synthetic_getter(cfg: DeepSeekV4Config, seed: int = 0):
    """Random weights of the right structure, generated on the default device (fast at any size).

    NVFP4 linears: random E2M1 codes, block scales 1.0, global ``0.02 / 6``; plain tensors
    ``0.02 * normal``; expert ids uniform. Values only need to be finite and plausibly scaled.
    """
    specs = {s.name: s for s in global_schema(cfg)}
    for layer in range(cfg.num_layers):
        specs.update({s.name: s for s in block_schema(cfg, layer, f"layers.{layer}")})
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def get(name: str):
        spec = specs[name]
        k = jax.random.fold_in(key, next(counter))
        shape = spec.logical_shape
        if is_big_linear(spec) and cfg.recipe != "bf16":
            values = jax.random.randint(k, (*shape[:-1], shape[-1] // 2), 0, 256, jnp.int32).astype(jnp.uint8)
            scales = jnp.ones((*shape[:-1], shape[-1] // 16), jnp.float8_e4m3fn)
            return NVFP4Tensor(values, scales, jnp.float32(0.02 / 6))
        if spec.dtype == I64:
            return jax.random.randint(k, shape, 0, cfg.num_experts, jnp.int32)
        return 0.02 * jax.random.normal(k, shape, jnp.float32 if spec.dtype == F32 else jnp.bfloat16)

    return get


def weight_bytes(cfg: DeepSeekV4Config) -> int:
    """Bytes of the model's weights as held (NVFP4: 0.5625 B per big-linear value)."""
    total = 0
    specs = list(global_schema(cfg))
    for layer in range(cfg.num_layers):
        specs += list(block_schema(cfg, layer, f"layers.{layer}"))
    for s in specs:
        n = 1
        for d in s.logical_shape:
            n *= d
        if s.name.endswith(".scale"):
            continue
        total += int(n * (0.5625 if is_big_linear(s) and cfg.recipe != "bf16" else 2))
    return total


def device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def reference_moe_bytes(cfg: DeepSeekV4Config, expert_shards: int) -> int:
    """Per-device temporaries of the reference MoE (``ref.moe.moe_experts``), which dequantizes a layer's
    whole expert banks before its ``ragged_dot``: ~3 float32 copies of one ``[experts, inter, dim]`` bank
    (an estimate: V4-Pro at 4 layers on 2 H200s asked for one 39.9 GiB buffer this way, session 8). The
    kernels (``ops.backend() == "cutedsl"``) decode weights on chip and need none of this."""
    if cfg.recipe == "bf16":
        return 0
    return 3 * 4 * cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size // expert_shards


def choose_config(name: str, layers: int, recipe: str, expert_shards: int = 1) -> DeepSeekV4Config:
    """``name``'s preset at ``layers`` depth; ``auto``: the largest (pro, flash, tiny) whose weights, built
    on one device, plus the reference MoE's temporaries when the kernels are not in use, fit 60% of it."""
    names = ("pro", "flash", "tiny") if name == "auto" else (name,)
    limit = device_memory()
    reference = ops.backend() == "reference"
    for n in names:
        cfg = preset(n, recipe=recipe)
        depth = min(layers, cfg.num_layers)
        cfg = cfg.replace(num_layers=depth, compress_ratios=cfg.compress_ratios[:depth] + (0,) * cfg.num_mtp_layers)
        need = weight_bytes(cfg) + (reference_moe_bytes(cfg, expert_shards) if reference else 0)
        if name != "auto" or limit is None or need < 0.6 * limit:
            return cfg
    return cfg


def time_decode(model, mesh, batch: int, context: int, warmup: int, steps: int) -> list[float]:
    step = jax.jit(lambda m, s, t: m.step(s, t)[::2], donate_argnums=1)
    state = shard_state(init_state(model, batch, context + warmup + steps + 1), mesh)
    tokens = shard_batch(jnp.zeros((batch, 1), jnp.int32), mesh)
    times = []
    with jax.set_mesh(mesh):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            logits, state = step(model, state, tokens)
            logits.block_until_ready()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            tokens = shard_batch(jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), mesh)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="auto", help="auto | tiny | flash | pro")
    ap.add_argument("--recipe", default="nvfp4")
    ap.add_argument("--layers", type=int, default=4, help="blocks built (full width); default 4")
    ap.add_argument("--devices", type=int, default=None, help="default: all")
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--context", type=int, default=0, help="(unused slots of) max length beyond the timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--jsonl", default=None, help="append one JSON record per batch size here")
    args = ap.parse_args()

    mesh = make_mesh(args.devices, data=args.data, tensor=args.tensor)
    cfg = choose_config(args.config, args.layers, args.recipe, mesh.shape["expert"])
    model = shard_model(model_from_tensors(cfg, synthetic_getter(cfg), include_mtp=False), mesh)
    dev = jax.devices()[0]
    where = f"{mesh.size} x {dev.device_kind} ({dev.platform}, host {platform.node()})"
    print(f"# {where}; mesh {dict(mesh.shape)}; hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_experts} experts, recipe {cfg.recipe}; weights {weight_bytes(cfg) / 2**30:.2f} GiB; "
          f"backend {ops.backend()}", flush=True)
    print("| batch | step ms | tokens/s | ms / layer |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in (int(b) for b in args.batches.split(",")):
        times = time_decode(model, mesh, batch, args.context, args.warmup, args.steps)
        ms = 1e3 * statistics.median(times)
        record = {"device": where, "mesh": dict(mesh.shape), "backend": ops.backend(), "hidden": cfg.hidden_size,
                  "layers": cfg.num_layers,
                  "recipe": cfg.recipe, "batch": batch, "step_ms": ms, "tokens_per_s": batch / ms * 1e3,
                  "ms_per_layer": ms / cfg.num_layers}
        print(f"| {batch} | {ms:.3f} | {batch / ms * 1e3:.1f} | {ms / cfg.num_layers:.3f} |", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

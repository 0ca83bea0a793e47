"""Load a checkpoint straight onto a device mesh, one layer at a time (issue 8).

:func:`load_sharded` gives the same model as ``shard_model(load_model(path)[0], mesh)`` — the same
leaves, bitwise, on the same ``NamedSharding`` s (:data:`nvfp4jax.sharding.PARAM_AXES` x ``rules``) —
without ever holding the whole model on one device:

1. Before reading a weight, the model's shapes are derived (``jax.eval_shape`` of each block built
   from zero tensors) and every sharded dimension is checked to divide over its mesh axes
   (:func:`check_divisible`: one error names every tensor, dimension and axis that does not;
   ``shard_model`` would silently replicate them).
2. Layers are read in order: one block is decoded (``Checkpoint.get``, one tensor in host memory at
   a time) and built and checked exactly as :func:`~nvfp4jax.model.weights.model_from_tensors`
   does, put on the per-layer sharding (``jax.device_put`` per leaf) and written into its slot of
   the segment position's stack ``[repeats, ...]`` (allocated on its sharding when the position's
   first layer arrives) by a donated, in-place update. The MTP block is placed as soon as it is
   built, the embedding and head as they are read, the small norms and mHC head last.

Memory: host, about one tensor (the reader maps only that tensor's bytes); the default device, one
layer's leaves transiently (the routed experts of a layer are stacked there before they are put on
the ``expert`` axis); every device, its shard of the model. Reading only a device's slice
(``jax.make_array_from_callback``) would not help the big linears: an FP8 or MXFP4 tensor's NVFP4
global scale depends on the whole tensor, so each tensor is decoded whole anyway.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import namedtuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from nvfp4jax import ops
from nvfp4jax.checkpoint.reader import Checkpoint, open_checkpoint
from nvfp4jax.checkpoint.schema import F32, I64, block_schema, global_schema, mtp_schema
from nvfp4jax.config import DeepSeekV4Config
from nvfp4jax.formats.nvfp4 import NVFP4Tensor, to_layout
from nvfp4jax.model.transformer import Segment, Transformer, segment_schedule
from nvfp4jax.model.weights import (
    _Checked,
    build_block,
    build_head_mix,
    build_mtp,
    compute_dtype,
    is_big_linear,
)
from nvfp4jax.sharding import (
    PARAM_AXES,
    RULES,
    ShardingRules,
    indivisible_dims,
    shard_model,
    tree_shardings,
)

#: leaves named by their checkpoint tensors, for error messages (model path -> official name)
_OFFICIAL = ((r"\.ffn\.w([123])$", r".ffn.experts.*.w\1.weight"), (r"\.shared\.", ".shared_experts."),
             (r"\.attn\.sink$", ".attn.attn_sink"), (r"\.attn\.wo_a$", ".attn.wo_a.weight"),
             (r"^\.(embed|head)$", r"\1.weight"))
_Globals = namedtuple("_Globals", "embed head")


def _official_name(path: str) -> str:
    """``.ffn.w1.values`` -> ``ffn.experts.*.w1.weight`` (relative to its layer), ``.embed`` -> ``embed.weight``."""
    base = re.sub(r"\.(values|scales|global_scale)$", "", path)
    for pattern, repl in _OFFICIAL:
        base = re.sub(pattern, repl, base)
    return base.removeprefix(".")


def _zeros_getter(cfg: DeepSeekV4Config, specs):
    """Zero tensors at the leaf types ``_Checked`` would return (for ``jax.eval_shape`` only)."""
    layout = ops.weight_layout()

    def get(name: str):
        spec = specs[name]
        shape = spec.logical_shape
        if is_big_linear(spec) and cfg.recipe != "bf16":
            rows, k = shape[:-1], shape[-1]
            return to_layout(NVFP4Tensor(jnp.zeros((*rows, k // 2), jnp.uint8),
                                         jnp.zeros((*rows, k // 16), jnp.float8_e4m3fn), jnp.zeros((), jnp.float32)),
                             layout)
        dtype = jnp.int32 if spec.dtype == I64 else jnp.float32 if spec.dtype == F32 else compute_dtype(cfg)
        return jnp.zeros(shape, dtype)

    return get


def _abstract_block(cfg: DeepSeekV4Config, layer: int, prefix: str):
    specs = {s.name: s for s in (mtp_schema(cfg, 0) if prefix.startswith("mtp.") else block_schema(cfg, layer, prefix))}
    return jax.eval_shape(lambda: build_block(cfg, layer, prefix, _zeros_getter(cfg, specs)))


def _vocab_shapes(cfg: DeepSeekV4Config) -> _Globals:
    """``embed`` and ``head`` as abstract leaves at the model paths ``.embed`` / ``.head``."""
    specs = {s.name: s for s in global_schema(cfg)}
    return _Globals(*(jax.ShapeDtypeStruct(specs[f"{n}.weight"].logical_shape, compute_dtype(cfg)) for n in _Globals._fields))


def _stacked(tree, repeats: int):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((repeats, *x.shape), x.dtype), tree)


def _unstacked(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def check_divisible(cfg: DeepSeekV4Config, mesh: Mesh, rules: ShardingRules = RULES, *, include_mtp: bool = False) -> None:
    """Raise ``ValueError`` naming every tensor whose sharded dimension its mesh axes do not divide.

    Uses shapes only (nothing is read or allocated). ``shard_model`` would replicate such a dimension;
    the sharded loader refuses instead, before reading a weight.
    """
    found = [("", p) for p in indivisible_dims(_vocab_shapes(cfg), mesh, PARAM_AXES, rules)]
    for first, period, repeats in segment_schedule(cfg):
        for k in range(period):  # the layers of one position share their shapes
            dims = indivisible_dims(_abstract_block(cfg, first + k, f"layers.{first + k}"), mesh, PARAM_AXES, rules)
            found += [(f"layers.{first + r * period + k}", p) for r in range(repeats) for p in dims]
    if include_mtp and cfg.num_mtp_layers:
        found += [("mtp.0", p) for p in indivisible_dims(_abstract_block(cfg, cfg.num_layers, "mtp.0"), mesh, PARAM_AXES,
                                                         rules)]
    where: dict[tuple, tuple[list[str], set[str]]] = {}  # per tensor kind: its layers, its NVFP4 parts
    for prefix, (path, dim, size, logical, axes, ways) in found:
        layers, parts = where.setdefault((_official_name(path), dim, size, logical, axes, ways), ([], set()))
        layers += [] if prefix in layers else [prefix]
        part = re.search(r"\.(values|scales|global_scale)$", path)
        parts.add(part.group(1) if part else "")
    lines = []
    for (name, dim, size, logical, axes, ways), (layers, parts) in where.items():
        more = layers[1:] if len(layers) <= 5 else [*layers[1:4], f"{len(layers) - 4} more"]
        also = f" (and in {', '.join(more)})" if more else ""
        only = f", its NVFP4 {' and '.join(sorted(parts))}" if parts and not parts & {"", "values"} else ""
        lines.append(f"tensor '{(layers[0] + '.' if layers[0] else '') + name}'{also}{only}: dim {dim} of size {size} "
                     f"(logical axis '{logical}') does not divide over mesh axis {axes!r} of {ways} devices")
    if lines:
        raise ValueError(f"mesh {dict(mesh.shape)} does not fit the model; {len(lines)} tensor kinds:\n  "
                         + "\n  ".join(lines))


def _insert_fn(shardings):
    """A donated in-place write of one layer into slot ``i`` of a stacked, sharded block."""
    return jax.jit(lambda stack, block, i: jax.tree.map(lambda s, x: s.at[i].set(x), stack, block),
                   donate_argnums=0, out_shardings=shardings)


def _place(tree, shardings):
    return jax.tree.map(jax.device_put, tree, shardings)


def load_sharded(path: str | os.PathLike, mesh: Mesh, *, rules: ShardingRules = RULES, recipe: str | None = None,
                 include_mtp: bool | None = None, progress: bool = True, **config_overrides) -> tuple[Transformer, Checkpoint]:
    """``load_model`` onto ``mesh``: each weight put on its ``NamedSharding`` as its layer is read.

    Returns ``(model, checkpoint)`` equal, leaf for leaf (values and shardings), to
    ``shard_model(load_model(path, ...)[0], mesh, rules)``. Raises ``ValueError`` before reading any
    weight when a sharded dimension does not divide over its mesh axes (:func:`check_divisible`),
    and :class:`~nvfp4jax.checkpoint.CheckpointError` for checkpoint faults as ``open_checkpoint`` does.
    """
    ckpt = open_checkpoint(path, recipe=recipe, include_mtp=include_mtp, **config_overrides)
    cfg = ckpt.config
    check_divisible(cfg, mesh, rules, include_mtp=ckpt.has_mtp)
    specs = {s.name: s for s in global_schema(cfg)}
    for layer in range(cfg.num_layers):
        specs.update({s.name: s for s in block_schema(cfg, layer, f"layers.{layer}")})
    with_mtp = ckpt.has_mtp and cfg.num_mtp_layers > 0
    if with_mtp:
        specs.update({s.name: s for s in mtp_schema(cfg, 0)})
    bar = tqdm(total=len(ckpt.names()), desc=f"loading {os.path.basename(ckpt.path)} onto {mesh.size} devices",
               unit="tensor", disable=not progress)

    def read(name: str):
        value = ckpt.get(name)
        bar.update(1)
        return value

    g = _Checked(cfg, read, specs)
    try:
        segments = []
        for first, period, repeats in segment_schedule(cfg):
            stacks, inserts, layer_shardings = [None] * period, [None] * period, [None] * period
            for r in range(repeats):
                for k in range(period):
                    layer = first + r * period + k
                    block = build_block(cfg, layer, f"layers.{layer}", g)
                    if stacks[k] is None:  # the stack of this position, allocated on its sharding
                        shapes = _stacked(block, repeats)
                        shardings = tree_shardings(shapes, mesh, PARAM_AXES, rules)
                        layer_shardings[k] = jax.tree.map(_unstacked, shardings)
                        stacks[k] = jax.jit(lambda shapes=shapes: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
                                            out_shardings=shardings)()
                        inserts[k] = _insert_fn(shardings)
                    block = _place(block, layer_shardings[k])
                    stacks[k] = inserts[k](stacks[k], block, jnp.int32(r))
                    del block
            segments.append(Segment(tuple(stacks), first))
        mtp = None
        if with_mtp:
            mtp = build_mtp(cfg, g)
            mtp = _place(mtp, tree_shardings(mtp, mesh, PARAM_AXES, rules))
        head_mix = build_head_mix(cfg, g)
        vocab = tree_shardings(_vocab_shapes(cfg), mesh, PARAM_AXES, rules)
        embed = jax.device_put(g("embed.weight"), vocab.embed)
        head = jax.device_put(g("head.weight"), vocab.head)
        model = Transformer(embed, tuple(segments), head_mix, g("norm.weight"), head, mtp, cfg)
    finally:
        bar.close()
    model = shard_model(model, mesh, rules)  # places the globals; the blocks are already where they belong
    for c in ckpt.inexact():
        if c.source == "mxfp4":
            warnings.warn(f"{ckpt.path}: {c.describe()}", stacklevel=2)
    return model, ckpt

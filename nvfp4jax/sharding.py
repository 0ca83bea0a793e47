"""Multi-device execution: a device mesh, logical axis names, and the one sharding-rules table.

Mesh axes (:func:`make_mesh`): ``data`` (decode slots / batch rows), ``expert`` (routed experts:
expert parallelism, tokens dispatched by all-to-all in :mod:`nvfp4jax.model.moe_ep`) and
``tensor`` (tensor parallelism of attention heads, the shared expert and the vocabulary).

Parameters are named by *logical* axes in :data:`PARAM_AXES` (a leaf path pattern -> logical
axes of the parameter's trailing dims); :data:`RULES` maps each logical axis to mesh axes. Nothing
inside the model names a mesh axis: :func:`shard_model` places a built model's leaves by path, and
XLA's SPMD partitioner derives the activations' shardings (and the collectives) from them.

| logical axis | parameters (or state) | default mesh axis |
| --- | --- | --- |
| ``experts`` | routed ``w1``/``w3``/``w2`` stacks (values, scales and per-expert global scales) | ``expert`` |
| ``heads`` | ``wq_b`` rows (heads x head_dim), attention ``sink`` | ``tensor`` |
| ``groups`` | ``wo_a`` groups, ``wo_b`` columns (groups x o_lora) | ``tensor`` |
| ``ffn`` | shared expert ``w1``/``w3`` rows, ``w2`` columns | ``tensor`` |
| ``vocab`` | ``embed`` and ``head`` rows | ``tensor`` |
| ``batch`` | decode-state slots: rings, compressor carries, lengths, page tables; input token rows | ``data`` |

Everything else (latent projections ``wq_a``/``wkv``, norms, mHC, compressor, indexer, router,
MTP projections) is replicated: it is small next to the experts. A dimension that the mesh axes
do not divide is replicated rather than refused (e.g. 2 ``o_groups`` over a 4-way ``tensor``).
NVFP4 weights shard their ``values`` and ``scales`` like the logical weight (a split of K falls on
whole 16-element blocks when the split divides K/16); a stack's global scales follow its leading axes.
In the kernels' tile layout (``[..., n/64, k/128, 64, 64]``) the split falls on whole tiles: n and k
are split through their tile axes, so a dimension is divided when the mesh divides its tile count.

Decode state: per-slot leaves are split over ``data`` (a slot lives on one data shard); the paged
pools of compressed entries and their free bitmaps are **replicated**, because pages are shared by
all slots and allocated inside jit from one bitmap (sharding pages by slot would need one pool per
data shard; see the report of issue 8).

Expert parallelism is switched on by the mesh in context: under ``jax.set_mesh(mesh)`` with an
``expert`` axis larger than 1, ``ops.moe_experts`` runs :func:`nvfp4jax.model.moe_ep.moe_experts_ep`.
Typical use::

    mesh = make_mesh(8, tensor=2)                 # data 1 x expert 4 x tensor 2
    model = shard_model(model, mesh)
    state = shard_state(init_state(model, batch, max_len), mesh)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, t: m(t))(model, shard_batch(tokens, mesh))
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or axes, or None for replicated)."""

    batch: MeshAxes = "data"
    experts: MeshAxes = "expert"
    heads: MeshAxes = "tensor"
    groups: MeshAxes = "tensor"
    ffn: MeshAxes = "tensor"
    vocab: MeshAxes = "tensor"

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        return None if logical is None else getattr(self, logical)


RULES = ShardingRules()

#: leaf path (without an NVFP4 component) -> logical axes of the parameter's trailing dims.
#: Leading stack axes (layers of a segment) are never sharded. First match wins; no match: replicated.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"^\.embed$", ("vocab", None)),
    (r"^\.head$", ("vocab", None)),
    (r"(^|\.)attn\.wq_b\.weight$", ("heads", None)),
    (r"(^|\.)attn\.sink$", ("heads",)),
    (r"(^|\.)attn\.wo_a$", ("groups", None, None)),
    (r"(^|\.)attn\.wo_b\.weight$", (None, "groups")),
    (r"(^|\.)ffn\.w[123]$", ("experts", None, None)),
    (r"(^|\.)ffn\.shared\.w[13]\.weight$", ("ffn", None)),
    (r"(^|\.)ffn\.shared\.w2\.weight$", (None, "ffn")),
)

#: the same for the decode state (``nvfp4jax.state.DecodeState``)
STATE_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"^\.(mtp_)?lengths$", ("batch",)),
    (r"^\.page_tables\[", ("batch", None)),
    (r"\.ring\.(nope|scale|rope)$", ("batch", None, None)),  # [batch, window, channels]
    (r"\.(index_)?carry\.(kv|gate|prev_kv|prev_gate)$", ("batch", None, None)),  # [batch, ratio, width]
)

_NVFP4_PART = re.compile(r"\.(values|scales|global_scale)$")


def make_mesh(num_devices: int | None = None, *, data: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, expert, tensor)`` mesh over the first ``num_devices`` devices (default: all).

    ``expert`` gets what ``data`` and ``tensor`` leave: ``num_devices // (data * tensor)``.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else num_devices
    if n < 1 or n > len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} available")
    if data < 1 or tensor < 1 or n % (data * tensor):
        raise ValueError(f"data={data} x tensor={tensor} does not divide {n} devices")
    shape = (data, n // (data * tensor), tensor)
    return Mesh(np.array(devices[:n]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def partition_spec(shape: tuple[int, ...], logical: tuple[str | None, ...], mesh: Mesh,
                   rules: ShardingRules = RULES) -> PartitionSpec:
    """The spec of an array whose trailing dims have ``logical`` axes (leading dims replicated).

    A dim that its mesh axes do not divide, or mesh axes already used by an earlier dim, is replicated.
    """
    if len(logical) > len(shape):
        raise ValueError(f"logical axes {logical} do not fit shape {shape}")
    spec, used = [None] * (len(shape) - len(logical)), set()
    for size, name in zip(shape[len(shape) - len(logical):], logical):
        axes = rules.mesh_axes(name)
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        ok = axes is not None and size % _axis_size(mesh, axes) == 0 and not used & set(names)
        spec.append(axes if ok else None)
        used |= set(names) if ok else set()
    return PartitionSpec(*spec)


def _logical_axes(path: str, ndim: int, table, tiled: frozenset[str] = frozenset()) -> tuple[str | None, ...]:
    part = _NVFP4_PART.search(path)
    base = path[: part.start()] if part else path
    for pattern, logical in table:
        if re.search(pattern, base):
            if part and part.group(1) == "global_scale":  # one per matrix: the axes before the last two
                logical = logical[:-2]
            elif part and base in tiled:  # [..., n/64, k/128, 64, 64 | 8]: split along whole tiles
                logical = logical + (None, None)
            return logical[-ndim:] if ndim else ()
    return ()


def _tiled(tree) -> frozenset[str]:
    """Paths of the NVFP4 tensors of ``tree`` held in the kernels' tile layout (``formats.nvfp4``)."""
    from nvfp4jax.formats.nvfp4 import NVFP4Tensor

    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NVFP4Tensor))[0]
    return frozenset(jax.tree_util.keystr(p) for p, x in nodes if isinstance(x, NVFP4Tensor) and x.layout == "tiled")


def tree_shardings(tree, mesh: Mesh, table, rules: ShardingRules = RULES):
    """A ``NamedSharding`` for every array leaf of ``tree``, from a path table (:data:`PARAM_AXES`)."""

    tiled = _tiled(tree)

    def one(path, leaf):
        shape = tuple(leaf.shape)
        return NamedSharding(mesh, partition_spec(
            shape, _logical_axes(jax.tree_util.keystr(path), len(shape), table, tiled), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def indivisible_dims(tree, mesh: Mesh, table=PARAM_AXES, rules: ShardingRules = RULES):
    """``(path, dim, size, logical, mesh_axes, ways)`` of every leaf dim whose rule names mesh axes of
    more than one device that do not divide it (:func:`partition_spec` replicates those; a loader
    that must not silently replicate checks here first). Leaves need only ``shape`` (e.g. abstract)."""
    out, tiled = [], _tiled(tree)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key, shape = jax.tree_util.keystr(path), tuple(leaf.shape)
        logical = _logical_axes(key, len(shape), table, tiled)
        for dim, name in zip(range(len(shape) - len(logical), len(shape)), logical):
            axes = rules.mesh_axes(name)
            ways = _axis_size(mesh, axes)
            if ways > 1 and shape[dim] % ways:
                out.append((key, dim, shape[dim], name, axes, ways))
    return out


def _place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def shard_model(model, mesh: Mesh, rules: ShardingRules = RULES):
    """The model with every weight placed on its ``NamedSharding`` (:data:`PARAM_AXES` x ``rules``).

    Also usable layer by layer while loading: call it on one built ``Block`` stack at a time.
    """
    return _place(model, tree_shardings(model, mesh, PARAM_AXES, rules))


def shard_state(state, mesh: Mesh, rules: ShardingRules = RULES):
    """The decode state placed to match: per-slot leaves over ``batch``, pools and bitmaps replicated."""
    return _place(state, tree_shardings(state, mesh, STATE_AXES, rules))


def shard_batch(tokens, mesh: Mesh, rules: ShardingRules = RULES):
    """Token ids ``[batch, ...]`` (or per-slot vectors) with rows split over the ``batch`` rule."""
    tokens = jax.numpy.asarray(tokens)
    logical = ("batch",) + (None,) * (tokens.ndim - 1)
    return jax.device_put(tokens, NamedSharding(mesh, partition_spec(tokens.shape, logical, mesh, rules)))

"""Open a checkpoint directory lazily, validate it against the schema, and decode tensors on demand.

A checkpoint directory holds ``config.json``, sharded ``*.safetensors`` and (when sharded)
``model.safetensors.index.json``. :func:`open_checkpoint` reads only ``config.json``, the index
and the shard headers (plus the scalar global scales of NVFP4 layouts), checks everything it can
without touching the weights, and raises one :class:`CheckpointError` listing every fault, each
naming its file and tensor. Nothing is half-loaded: a checkpoint either opens whole or not at all.

Tensors are then read one at a time (a memory map of just their bytes) by :meth:`Checkpoint.get`,
which decodes per recipe (:mod:`nvfp4jax.checkpoint.decode`) and records a :class:`Conversion`.
:meth:`Checkpoint.iter_layers` walks the model layer by layer with a progress bar; memory is bounded
by one layer. :func:`load_model` hands :meth:`Checkpoint.get` to the model's weight mapping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nvfp4jax.checkpoint.decode import Conversion, check_global_scale, decode
from nvfp4jax.checkpoint.layouts import LogicalTensor, layer_key, logical_tensors
from nvfp4jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile
from nvfp4jax.config import DeepSeekV4Config

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
#: scalar tensors that real files store as ``[]`` or ``[1]``
_SCALAR_SUFFIXES = (".weight_scale_2", ".input_scale", ".global_scale")
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding about a checkpoint: ``error`` stops loading, ``warning`` does not."""

    severity: str
    file: str
    tensor: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: tensor '{self.tensor}'" if self.tensor else self.file
        return f"{where}: {self.message}"


def raise_if_errors(problems: list[Problem]) -> None:
    """Warn about warnings; raise one :class:`CheckpointError` listing every error."""
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        if p.severity == "warning":
            warnings.warn(str(p), stacklevel=3)
    if errors:
        lines = [str(p) for p in errors[:_MAX_LISTED]]
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        head = lines[0] if len(errors) == 1 else f"{len(errors)} problems, first: {lines[0]}"
        raise CheckpointError(head + ("\n  " + "\n  ".join(lines[1:]) if len(lines) > 1 else "") + more)


# ----------------------------------------------------------------------------- directory scan
@dataclasses.dataclass
class Directory:
    """The files of a checkpoint directory: config, index, shard headers, and where each tensor lives."""

    path: str
    config_dict: dict[str, Any]
    index_path: str | None
    shards: dict[str, SafetensorsFile]  # file name -> header
    location: dict[str, str]  # tensor name -> shard file name

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.location[name])

    @property
    def listing(self) -> str:
        """What names the directory's tensors as a whole: the index, or the directory."""
        return self.index_path or self.path


def scan_directory(path: str | os.PathLike) -> tuple[Directory | None, list[Problem]]:
    """Parse ``config.json``, the index and every shard header; file-level faults become problems."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None, [Problem("error", path, "", "not a checkpoint directory")]
    problems: list[Problem] = []
    config_path = os.path.join(path, CONFIG)
    try:
        with open(config_path) as f:
            config_dict = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return None, [Problem("error", config_path, "", f"cannot read config: {e}")]
    index_path = os.path.join(path, INDEX)
    weight_map: dict[str, str] | None = None
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            return None, [Problem("error", index_path, "", f"cannot read index: {e}")]
        files = sorted(set(weight_map.values()))
    else:
        index_path = None
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            return None, [Problem("error", path, "", f"no {INDEX} and no .safetensors files")]
    shards: dict[str, SafetensorsFile] = {}
    for file in files:
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            names = sorted(n for n, f in (weight_map or {}).items() if f == file)
            problems.append(Problem("error", index_path or path, names[0] if names else "",
                                    f"mapped to shard '{file}', which does not exist ({len(names)} tensors in it)"))
            continue
        try:
            shards[file] = SafetensorsFile(full)
        except CheckpointError as e:
            problems.append(Problem("error", full, "", str(e).removeprefix(f"{full}: ")))
    location: dict[str, str] = {}
    if weight_map is None:  # no index: the shard headers are the listing
        for file, shard in shards.items():
            for name in shard.names():
                if name in location:
                    problems.append(Problem("error", os.path.join(path, file), name, f"also stored in '{location[name]}'"))
                location[name] = file
    else:  # the index is the listing; shard headers must agree with it
        for name, file in weight_map.items():
            if file not in shards:
                continue
            if name not in shards[file].entries:
                problems.append(Problem("error", os.path.join(path, file), name, f"listed in {INDEX} but absent from this shard"))
            else:
                location[name] = file
        for file, shard in shards.items():
            for name in shard.names():
                if weight_map.get(name) != file:
                    problems.append(Problem("warning", os.path.join(path, file), name,
                                            f"stored in this shard but not listed there by {INDEX}; ignored"))
    return Directory(path, config_dict, index_path, shards, location), problems


def detect_layout(config_dict: dict[str, Any], names) -> tuple[str, str | None]:
    """``(layout, stored_recipe)``: ours by ``quant_method``, NVIDIA by its ``weight_scale_2`` tensors."""
    qc = config_dict.get("quantization_config") or {}
    if qc.get("quant_method") == "nvfp4jax":
        return "nvfp4jax", qc.get("recipe", "nvfp4")
    if qc.get("quant_method") == "modelopt" or any(n.endswith(".weight_scale_2") for n in names):
        return "nvidia", None
    return "official", None


# ----------------------------------------------------------------------------- validation
_LAYER_ID = re.compile(r"^layers\.(\d+)\.")
_EXPERT_ID = re.compile(r"^(layers\.\d+|mtp\.\d+)\.ffn\.experts\.(\d+)\.")


def check_config(d: Directory, cfg: DeepSeekV4Config) -> list[Problem]:
    """Does ``config.json`` describe the tensors present? (Layers, widths, layer types, experts.)"""
    cfg_file = os.path.join(d.path, CONFIG)
    bad: list[Problem] = []

    def mismatch(tensor: str, msg: str) -> None:
        bad.append(Problem("error", cfg_file, tensor, f"config.json does not match the tensors: {msg}"))

    names = d.location
    if "embed.weight" in names:
        shape = d.shards[names["embed.weight"]].entries["embed.weight"].shape
        if shape != (cfg.vocab_size, cfg.hidden_size):
            mismatch("embed.weight", f"shape {list(shape)}, config says [vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}]")
    layers = sorted({int(m.group(1)) for n in names if (m := _LAYER_ID.match(n))})
    # more layers than the config, or a clean prefix of fewer (gaps are missing tensors, reported later)
    if layers and (layers[-1] >= cfg.num_layers or (layers == list(range(len(layers))) and len(layers) < cfg.num_layers)):
        extra = [i for i in layers if i >= cfg.num_layers]
        tensor = next(n for n in names if n.startswith(f"layers.{extra[0]}.")) if extra else ""
        mismatch(tensor, f"num_hidden_layers={cfg.num_layers} but the checkpoint holds layers {layers[0]}..{layers[-1]} "
                         f"({len(layers)} layers)")
    experts: dict[str, set[int]] = {}
    for n in names:
        if m := _EXPERT_ID.match(n):
            experts.setdefault(m.group(1), set()).add(int(m.group(2)))
    # more experts than the config, or every block with the same smaller set 0..k-1
    fewer = {len(ids) for ids in experts.values()} if all(ids == set(range(len(ids))) for ids in experts.values()) else set()
    for prefix, ids in experts.items():
        if max(ids) >= cfg.num_experts or (len(fewer) == 1 and max(ids) + 1 < cfg.num_experts):
            mismatch(f"{prefix}.ffn.experts.{max(ids)}", f"n_routed_experts={cfg.num_experts} but {prefix} has experts 0..{max(ids)}")
            break
    # per layer, judged only from tensors that are present (absent ones are reported as missing later)
    for layer in layers:
        if layer >= cfg.num_layers:
            break
        p = f"layers.{layer}"
        ratio, ape = cfg.compress_ratio(layer), f"{p}.attn.compressor.ape"
        if ape in names:
            stored_ratio = d.shards[names[ape]].entries[ape].shape[0]
            if stored_ratio != ratio:
                mismatch(ape, f"compress_ratios[{layer}]={ratio} but the tensors say {stored_ratio}")
        elif ratio and f"{p}.attn.wkv.weight" in names:
            mismatch(ape, f"compress_ratios[{layer}]={ratio} but layer {layer} has no compressor")
        tid2eid, bias = f"{p}.ffn.gate.tid2eid", f"{p}.ffn.gate.bias"
        if (tid2eid in names and not cfg.is_hash_layer(layer)) or (bias in names and cfg.is_hash_layer(layer)):
            mismatch(tid2eid, f"num_hash_layers={cfg.num_hash_layers} but layer {layer} "
                              f"{'has tid2eid' if tid2eid in names else 'has a score bias, no tid2eid'}")
    return bad


def check_tensors(d: Directory, expected: list[LogicalTensor]) -> list[Problem]:
    """Every expected stored tensor present with its dtype and shape; unknown tensors are warnings."""
    problems: list[Problem] = []
    known = set()
    for t in expected:
        for spec in t.stored:
            known.add(spec.name)
            if spec.name not in d.location:
                problems.append(Problem("error", d.listing, spec.name,
                                        f"missing (expected {spec.dtype} {list(spec.shape)}, part of '{t.name}')"))
                continue
            entry = d.shards[d.location[spec.name]].entries[spec.name]
            file = d.file_of(spec.name)
            if entry.dtype != spec.dtype:
                problems.append(Problem("error", file, spec.name, f"dtype {entry.dtype}, expected {spec.dtype}"))
            ok_shapes = {spec.shape, (1,)} if spec.name.endswith(_SCALAR_SUFFIXES) else {spec.shape}
            if entry.shape not in ok_shapes:
                problems.append(Problem("error", file, spec.name, f"shape {list(entry.shape)}, expected {list(spec.shape)}"))
    for name in d.location:
        if name not in known:
            problems.append(Problem("warning", d.file_of(name), name, "unknown tensor, ignored"))
    return problems


def check_global_scales(d: Directory, expected: list[LogicalTensor]) -> list[Problem]:
    """Read every NVFP4 per-tensor global scale (a few bytes each): zero or non-finite is an error."""
    problems = []
    for t in expected:
        for spec in t.stored:
            if spec.name.endswith((".weight_scale_2", ".global_scale")):
                try:
                    check_global_scale(d.shards[d.location[spec.name]].read(spec.name), d.file_of(spec.name), spec.name)
                except CheckpointError as e:
                    problems.append(Problem("error", d.file_of(spec.name), spec.name, str(e).split("': ", 1)[1]))
    return problems


# ----------------------------------------------------------------------------- the checkpoint
class Checkpoint:
    """A validated checkpoint directory; tensors are decoded on demand for ``config.recipe``."""

    def __init__(self, d: Directory, cfg: DeepSeekV4Config, layout: str, tensors: list[LogicalTensor]):
        self.directory = d
        self.config = cfg
        self.layout = layout
        self._tensors = {t.name: t for t in tensors}
        #: conversion record of every tensor decoded so far, by logical name
        self.conversions: dict[str, Conversion] = {}

    @property
    def path(self) -> str:
        return self.directory.path

    @property
    def recipe(self) -> str:
        return self.config.recipe

    @property
    def has_mtp(self) -> bool:
        return any(n.startswith("mtp.") for n in self._tensors)

    def names(self) -> list[str]:
        """Logical (official) names of every model weight, in schema order."""
        return list(self._tensors)

    def layers(self) -> list[str]:
        """Layer keys in order: ``global``, ``layers.0`` .. ``layers.{L-1}``, then ``mtp.0`` if present."""
        return list(dict.fromkeys(layer_key(n) for n in self._tensors))

    def layer_names(self, layer: int | str) -> list[str]:
        """Names of one layer (an int, ``"layers.3"``, ``"mtp.0"`` or ``"global"``)."""
        key = f"layers.{layer}" if isinstance(layer, int) else layer
        names = [n for n in self._tensors if layer_key(n) == key]
        if not names:
            raise KeyError(f"{self.path}: no layer {key!r}; layers are {self.layers()[0]} .. {self.layers()[-1]}")
        return names

    def tensor(self, name: str) -> LogicalTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor '{name}' in the {self.layout} layout of this config") from None

    def read_stored(self, name: str) -> dict[str, np.ndarray]:
        """The raw stored arrays of one logical tensor, by stored name."""
        d = self.directory
        return {s.name: d.shards[d.location[s.name]].read(s.name) for s in self.tensor(name).stored}

    def get(self, name: str):
        """One weight decoded for the recipe: ``NVFP4Tensor`` or a JAX array (see :mod:`.decode`)."""
        t = self.tensor(name)
        value, conversion = decode(t, self.read_stored(name), self.config, self.recipe, self.directory.file_of)
        self.conversions[name] = conversion
        return value

    def iter_layers(self, *, progress: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(layer_key, {name: decoded})`` one layer at a time, with a progress bar."""
        for key in tqdm(self.layers(), desc=f"loading {os.path.basename(self.path)}", unit="layer", disable=not progress):
            yield key, {n: self.get(n) for n in self.layer_names(key)}

    def inexact(self) -> list[Conversion]:
        """Decoded tensors whose values differ from the stored ones (re-quantised or rounded)."""
        return [c for c in self.conversions.values() if not c.exact]

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, layout={self.layout}, recipe={self.recipe}, {len(self._tensors)} tensors)"


def open_checkpoint(path: str | os.PathLike, *, recipe: str | None = None, include_mtp: bool | None = None,
                    **config_overrides) -> Checkpoint:
    """Open and validate a checkpoint directory (official, NVIDIA NVFP4, or ours from ``convert``).

    ``recipe``: ``nvfp4`` (default; ours: the recipe it was converted for), ``nvfp4-w4a16`` or
    ``bf16``. ``include_mtp``: ``None`` loads the MTP block when the checkpoint has one (warning
    when the config announces one that is absent), ``True`` requires it, ``False`` skips it.
    ``config_overrides`` replace config fields that are ours, not the checkpoint's (e.g.
    ``compute_dtype``, ``quant_simulation``). Raises :class:`CheckpointError` naming file and tensor
    for every fault found.
    """
    d, problems = scan_directory(path)
    raise_if_errors(problems)
    layout, stored_recipe = detect_layout(d.config_dict, d.location)
    try:
        cfg = DeepSeekV4Config.from_hf_dict(d.config_dict, recipe=recipe or stored_recipe or "nvfp4", **config_overrides)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(d.path, CONFIG)}: {e}") from None
    raise_if_errors(check_config(d, cfg))
    has_mtp = any(n.startswith("mtp.") for n in d.location)
    if include_mtp is None:
        include_mtp = has_mtp and cfg.num_mtp_layers > 0
        if cfg.num_mtp_layers and not has_mtp:
            warnings.warn(f"{d.listing}: config announces {cfg.num_mtp_layers} MTP layer(s) but no mtp.* tensors "
                          "are stored; loading the backbone only", stacklevel=2)
    expected = list(logical_tensors(cfg, layout, recipe=stored_recipe or "nvfp4", include_mtp=include_mtp))
    problems = check_tensors(d, expected)
    if not include_mtp:
        problems = [p for p in problems if not (p.severity == "warning" and p.tensor.startswith("mtp."))]
    raise_if_errors(problems)
    raise_if_errors(check_global_scales(d, expected))
    return Checkpoint(d, cfg, layout, expected)


def load_model(path: str | os.PathLike, *, recipe: str | None = None, include_mtp: bool | None = None, progress: bool = True,
               **config_overrides):
    """Build the model from a checkpoint: ``nvfp4jax.model.weights.model_from_tensors(cfg, get)``.

    Returns ``(model, checkpoint)``; ``checkpoint.inexact()`` lists tensors that were re-quantised.
    """
    from nvfp4jax.model.weights import model_from_tensors

    ckpt = open_checkpoint(path, recipe=recipe, include_mtp=include_mtp, **config_overrides)
    bar = tqdm(total=len(ckpt.names()), desc=f"loading {os.path.basename(ckpt.path)}", unit="tensor", disable=not progress)

    def get(name: str):
        value = ckpt.get(name)
        bar.update(1)
        return value

    try:
        model = model_from_tensors(ckpt.config, get, include_mtp=ckpt.has_mtp)
    finally:
        bar.close()
    for c in ckpt.inexact():
        if c.source == "mxfp4":
            warnings.warn(f"{ckpt.path}: {c.describe()}", stacklevel=2)
    return model, ckpt

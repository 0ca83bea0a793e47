"""``nvfp4jax convert``: any supported checkpoint -> our own NVFP4 checkpoint that loads with no conversion.

The output (layout ``nvfp4jax``, see :mod:`.layouts`) keeps the official tensor names and shapes
for everything that is not a quantised linear, and stores each big linear for recipe ``nvfp4`` /
``nvfp4-w4a16`` as the exact NVFP4 triple the model holds:

    <base>.values        U8       [out, in/2]   E2M1 pairs, low nibble = even element
    <base>.scales        F8_E4M3  [out, in/16]  block scales, row-major (not swizzled)
    <base>.global_scale  F32      []            per-tensor global scale

(``<base>`` = official name without ``.weight``; recipe ``bf16`` stores ``<base>.weight`` BF16).
``attn.wo_a.weight`` is stored dequantised in BF16; ``tid2eid`` as I32. ``config.json`` is the
source's with ``quantization_config = {"quant_method": "nvfp4jax", "recipe": ...}``. Tokenizer and
generation files are copied. Work is layer by layer (memory: one layer plus one output shard).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from nvfp4jax.checkpoint.decode import Conversion
from nvfp4jax.checkpoint.layouts import logical_tensors
from nvfp4jax.checkpoint.reader import CONFIG, INDEX, open_checkpoint
from nvfp4jax.checkpoint.synthetic import checkpoint_config, nvfp4_arrays
from nvfp4jax.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardedWriter
from nvfp4jax.formats import NVFP4Tensor


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    recipe: str = "nvfp4",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    include_mtp: bool | None = None,
    progress: bool = True,
) -> list[Conversion]:
    """Convert ``src`` into ``dst`` for ``recipe``; returns the conversion record of every tensor."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert: SRC and DST must differ")
    if os.path.exists(os.path.join(dst, INDEX)):
        raise FileExistsError(f"{dst}: already holds a checkpoint; choose an empty directory")
    ckpt = open_checkpoint(src, recipe=recipe, include_mtp=include_mtp)
    targets = {t.name: t for t in logical_tensors(ckpt.config, "nvfp4jax", recipe=recipe, include_mtp=ckpt.has_mtp)}
    writer = ShardedWriter(dst, max_shard_bytes=max_shard_bytes, metadata={"producer": "nvfp4jax convert"})
    for _, values in ckpt.iter_layers(progress=progress):
        for name, value in values.items():
            t = targets[name]
            # decoded values already have the stored dtypes (BF16, F32, I32 tid2eid, NVFP4 triples)
            arrays = nvfp4_arrays(t, value) if isinstance(value, NVFP4Tensor) else {name: np.asarray(value)}
            for stored, array in arrays.items():
                writer.add(stored, array)
    writer.close(checkpoint_config(ckpt.config, "nvfp4jax", recipe))
    _copy_side_files(src, dst)
    return [ckpt.conversions[n] for n in ckpt.names()]


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, generation config and other small top-level files (not weights, index, config)."""
    for f in sorted(os.listdir(src)):
        full = os.path.join(src, f)
        if os.path.isfile(full) and not f.endswith(".safetensors") and f not in (INDEX, CONFIG):
            shutil.copy2(full, os.path.join(dst, f))


def summarize(conversions: list[Conversion]) -> str:
    """Counts per (source -> target, exact) and every inexact MXFP4 tensor."""
    counts: dict[tuple[str, str, bool], int] = {}
    for c in conversions:
        key = (c.source, c.target, c.exact)
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{n:7d}  {s} -> {t}, {'exact' if e else 'inexact'}" for (s, t, e), n in sorted(counts.items())]
    lines += [f"  {c.describe()}" for c in conversions if not c.exact and c.source == "mxfp4"]
    return "\n".join(lines)


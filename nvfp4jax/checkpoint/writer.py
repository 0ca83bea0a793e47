"""Write a sharded checkpoint directory: ``model-0000k-of-0000n.safetensors`` + index + ``config.json``.

Tensors are added one at a time and flushed to a shard whenever the buffered bytes reach
``max_shard_bytes``, so writing needs memory for about one shard. Shards are renamed to their
final ``-of-`` names and the index is written on :meth:`ShardedWriter.close`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from nvfp4jax.checkpoint.reader import CONFIG, INDEX
from nvfp4jax.checkpoint.safetensors_io import write_safetensors

DEFAULT_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str) -> int:
    """``"5GB"``, ``"512MiB"``, ``"4096"`` -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


class ShardedWriter:
    def __init__(self, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, np.ndarray] = {}
        self._buffered = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor '{name}' written twice")
        self._buffer[name] = np.asarray(array)
        self._buffered += self._buffer[name].nbytes
        if self._buffered >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        k = len(self._shards) + 1
        write_safetensors(os.path.join(self.path, f"model-{k:05d}.partial"), self._buffer, self.metadata)
        self._total += self._buffered
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0

    def close(self, config: dict[str, Any]) -> list[str]:
        """Finish the shards, write the index and ``config.json``; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        files, weight_map = [], {}
        for k, names in enumerate(self._shards, start=1):
            file = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.path, f"model-{k:05d}.partial"), os.path.join(self.path, file))
            files.append(file)
            weight_map.update(dict.fromkeys(names, file))
        with open(os.path.join(self.path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(self.path, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        return files

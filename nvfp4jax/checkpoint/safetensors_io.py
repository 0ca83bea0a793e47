"""A small safetensors reader/writer that handles the float8 dtypes of DeepSeek-V4 checkpoints.

The installed ``safetensors`` NumPy API cannot save or load ``F8_E4M3`` / ``F8_E8M0`` (it looks
for ``numpy.float8_*``), so this module reads and writes the file format itself. The format:

    8 bytes   little-endian uint64 N = header length
    N bytes   UTF-8 JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                           "__metadata__": {str: str}}  (padded with spaces to a multiple of 8)
    rest      raw little-endian tensor bytes; offsets are relative to the end of the header

Reading is lazy: :class:`SafetensorsFile` parses only the header, validates every entry against
the file size, and :meth:`SafetensorsFile.read` memory-maps one tensor at a time.

E8M0 scales are raw exponent bytes. They are read as ``ml_dtypes.float8_e8m0fnu`` *views* of the
bytes and written from such views (or from uint8 with an explicit dtype): never numerically cast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

#: safetensors dtype name -> NumPy dtype of the in-memory array (same byte width, same bits)
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
_NAME_OF = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint fault; the message names the file and, where there is one, the tensor."""


def dtype_name(array: np.ndarray) -> str:
    try:
        return _NAME_OF[array.dtype]
    except KeyError:
        raise TypeError(f"no safetensors dtype for NumPy dtype {array.dtype}") from None


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """The parsed header of one ``.safetensors`` file; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated shard: {size} bytes, no header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{self.path}: truncated or corrupt shard: header of {n} bytes in a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt header: {e}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        start = 8 + n
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
                begin, end = (start + int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor '{name}': malformed header entry {info!r}") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}': unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if end - begin != expected:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}': {dtype} {list(shape)} needs {expected} bytes, "
                    f"header gives {end - begin}"
                )
            self.entries[name] = Entry(dtype, shape, begin, end)
        beyond = sorted((e.end, name) for name, e in self.entries.items() if e.end > size)
        if beyond:
            end, name = beyond[0]
            raise CheckpointError(
                f"{self.path}: truncated shard: tensor '{name}' ends at byte {end} but the file has {size} bytes "
                f"({len(beyond)} tensors affected)"
            )

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> np.ndarray:
        """One tensor, copied out of a read-only memory map (only its own bytes are touched)."""
        e = self.entries[name]
        dtype = DTYPES[e.dtype]
        if e.nbytes == 0:
            return np.zeros(e.shape, dtype)
        m = np.memmap(self.path, dtype=np.uint8, mode="r", offset=e.begin, shape=(e.nbytes,))
        return np.array(m).view(dtype).reshape(e.shape)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (dtype chosen from each array's NumPy dtype, see :data:`DTYPES`); returns bytes written."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        a = np.ascontiguousarray(array)
        header[name] = {"dtype": dtype_name(a), "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).tobytes())
    return 8 + len(blob) + offset

"""Our safetensors reader/writer against the official library (through torch, which knows float8)."""

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4jax.checkpoint.safetensors_io import DTYPES, CheckpointError, SafetensorsFile, write_safetensors
from tests.conftest import assert_bitwise_equal


def _random_tensors(rng) -> dict[str, np.ndarray]:
    """Random bytes viewed as every supported dtype (odd shapes), plus a 0-d scalar."""
    out = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        shape = (3, 2 * i + 1)
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        out[f"t.{name}"] = raw.view(dtype).reshape(shape)
    out["t.BOOL"] = out["t.BOOL"].view(np.uint8) % 2 == 1
    out["scalar"] = np.array(3.5, np.float32)
    return out


def test_round_trip_bitwise(tmp_path, rng):
    tensors = _random_tensors(rng)
    write_safetensors(tmp_path / "a.safetensors", tensors, {"k": "v"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert f.metadata == {"k": "v"}
    assert f.names() == list(tensors)
    for name, expected in tensors.items():
        assert_bitwise_equal(f.read(name), expected, name)


def test_files_are_readable_by_the_safetensors_library(tmp_path, rng):
    w = rng.standard_normal((4, 8)).astype(ml_dtypes.float8_e4m3fn)
    s = rng.integers(100, 140, (1, 1), dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    b = rng.standard_normal((3,)).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "a.safetensors", {"w": w, "s": s, "b": b})
    loaded = load_file(tmp_path / "a.safetensors")
    assert loaded["w"].dtype == torch.float8_e4m3fn and loaded["s"].dtype == torch.float8_e8m0fnu
    for name, a in (("w", w), ("s", s), ("b", b)):
        assert_bitwise_equal(loaded[name].view(torch.uint8).numpy(), a.view(np.uint8), name)


def test_reads_files_written_by_the_safetensors_library(tmp_path):
    t = {"w": torch.randn(4, 8).to(torch.float8_e4m3fn), "s": torch.tensor([[127, 3]], dtype=torch.uint8).view(torch.float8_e8m0fnu),
         "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.randn(5).to(torch.bfloat16)}
    save_file(t, tmp_path / "a.safetensors")
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert {n: f.entries[n].dtype for n in t} == {"w": "F8_E4M3", "s": "F8_E8M0", "i": "I64", "b": "BF16"}
    for name, a in t.items():
        assert_bitwise_equal(f.read(name).view(np.uint8), a.view(torch.uint8).numpy(), name)
    assert f.read("s").view(np.uint8).tolist() == [[127, 3]]  # E8M0 bytes, not cast


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"first": np.zeros(64, np.float32), "second": np.ones(64, np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"a\.safetensors: truncated shard: tensor 'second'"):
        SafetensorsFile(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated shard"):
        SafetensorsFile(path)

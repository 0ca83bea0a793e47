"""Checkpoints: the official schema, reading (official, NVIDIA NVFP4, ours), convert, inspect, synthetic twins."""

from nvfp4jax.checkpoint.convert import convert_checkpoint
from nvfp4jax.checkpoint.decode import Conversion
from nvfp4jax.checkpoint.inspect import InspectReport, format_report, inspect_checkpoint
from nvfp4jax.checkpoint.reader import Checkpoint, load_model, open_checkpoint
from nvfp4jax.checkpoint.safetensors_io import CheckpointError
from nvfp4jax.checkpoint.synthetic import write_checkpoint

__all__ = [
    "Checkpoint", "CheckpointError", "Conversion", "InspectReport", "convert_checkpoint", "format_report",
    "inspect_checkpoint", "load_model", "load_sharded", "open_checkpoint", "write_checkpoint",
]


def __getattr__(name: str):
    # imported on first use: nvfp4jax.checkpoint.sharded needs nvfp4jax.model.weights, which imports
    # this package while it initialises
    if name == "load_sharded":
        from nvfp4jax.checkpoint.sharded import load_sharded

        return load_sharded
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Equinox modules of DeepSeek-V4 and the builders that fill them from official tensor names."""

from nvfp4jax.model.transformer import Transformer, segment_schedule
from nvfp4jax.model.weights import model_from_tensors, random_model, source_getter

__all__ = ["Transformer", "model_from_tensors", "random_model", "segment_schedule", "source_getter"]

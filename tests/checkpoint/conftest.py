"""Shared synthetic checkpoints (written once per test session; tests must not modify them)."""

import numpy as np
import pytest

from nvfp4jax.checkpoint.random_weights import random_official_weights
from nvfp4jax.checkpoint.synthetic import write_checkpoint
from nvfp4jax.config import preset

#: experts whose rows span > 18 binades: MXFP4 -> NVFP4 cannot be exact there
PLANTED_WIDE = ("layers.1.ffn.experts.2.w1.weight", "mtp.0.ffn.experts.5.w3.weight")
SHARD_BYTES = 256 * 1024


@pytest.fixture(scope="session")
def tiny_source():
    cfg = preset("tiny")
    weights = random_official_weights(cfg, seed=7)
    for name in PLANTED_WIDE:
        w = weights[name].copy()
        w[0] *= np.float32(2.0**-24)
        weights[name] = w
    return cfg, weights


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory, tiny_source):
    cfg, weights = tiny_source
    path = tmp_path_factory.mktemp("official")
    write_checkpoint(path, cfg, weights, layout="official", max_shard_bytes=SHARD_BYTES)
    return path


@pytest.fixture(scope="session")
def nvidia_dir(tmp_path_factory, tiny_source):
    cfg, weights = tiny_source
    path = tmp_path_factory.mktemp("nvidia")
    write_checkpoint(path, cfg, weights, layout="nvidia", max_shard_bytes=SHARD_BYTES)
    return path

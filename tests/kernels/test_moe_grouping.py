"""CPU checks of the MoE kernel's XLA side: the tile table and the tile choice (no GPU needed)."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("cutlass")
from nvfp4jax.kernels import moe as km  # noqa: E402


def _tiles_by_hand(sizes, tile_t):
    out, row = [], 0
    for e, s in enumerate(sizes):
        for first in range(0, s, tile_t):
            out.append((e, row + first, min(tile_t, s - first)))
        row += s
    return out


@pytest.mark.parametrize("tile_t", [16, 32, 128])
def test_tile_table_matches_hand_enumeration(rng, tile_t):
    cases = [[0, 0, 5, 0, 17, 1, 0, 40], [6, 0, 0, 0], [0, 0, 0, 6], [1] * 6 + [0] * 10]
    cases += [list(rng.multinomial(rng.integers(1, 600), np.ones(9) / 9)) for _ in range(20)]
    for sizes in cases:
        rows, experts = sum(sizes), len(sizes)
        tiles = km.num_tiles(rows, experts, tile_t)
        want = _tiles_by_hand(sizes, tile_t)
        assert len(want) <= tiles, (sizes, tile_t)
        got = np.asarray(km.tile_table(jnp.asarray(sizes, jnp.int32), tile_t, tiles))
        assert [tuple(r) for r in got[: len(want)]] == want, sizes
        assert (got[len(want):, 2] == 0).all(), sizes  # unused CTAs exit at once
        assert got[:, 0].max() < experts and got[:, 0].min() >= 0


def test_tile_choice_covers_v4_experts():
    for experts, d, inter in ((256, 4096, 2048), (384, 7168, 3072), (8, 4096, 2048)):
        for t in (1, 3, 8, 64, 200, 512, 4096, 16384):
            rows = 6 * t
            for gate_up, n_out, k in ((True, 2 * inter, d), (False, d, inter)):
                for act in (True, False):
                    cfg = km.choose_grouped_config(rows, experts, n_out, k, act, gate_up=gate_up, swiglu_limit=10.0)
                    assert km.kg.GemmNvfp4Sm90.can_implement(cfg), cfg
                    assert n_out % cfg.tile_w == 0 and k % (cfg.tile_k * cfg.split) == 0, cfg

"""CPU: the mbarrier protocol of the warp-specialized GEMM (``gemm_ws``), simulated.

A hang or a stage overwritten while wgmma still reads it would only show on a GPU (a hang costs the
whole command's time). This runs the producer warpgroup, the TMA unit and the two consumer warpgroups
as actors under random interleavings, with mbarriers modelled as in PTX (arrival counts, phases,
``try_wait.parity``: the phase of that parity has completed) and the kernel's own parity functions
(``gemm_ws.free_parity`` / ``full_parity``) and arrival counts; it checks that every schedule finishes,
that each consumer reads K tile ``kt`` from a stage holding ``kt`` (both operands), and that neither
the producer's stores nor a TMA write land in a stage a wgmma is still reading. With W by TMA
(``w_tma``): the raw slots' ``raw_full`` barriers (one arrival + the copies' bytes, parity
``(chunk // RAW_SLOTS) % 2``), the prologue of ``RAW_SLOTS`` chunks per tile and the refill of a slot after
the producer warpgroup's named barrier; checked: the producer decodes chunk ``c`` from a slot holding
``c``, and no copy lands in a slot before its previous chunk was read. (The 128 producer threads are one
actor; the named barrier makes them one for the refill.)
"""

import random

import pytest

pytest.importorskip("cutlass")
from nvfp4jax.kernels import gemm_ws as kw  # noqa: E402


class MBarrier:
    def __init__(self, count: int):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self, n: int = 1):
        assert self.pending >= n, "more arrivals than the phase expects"
        self.pending -= n
        if self.pending == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def passed(self, parity: int) -> bool:
        """``try_wait.parity``: true once the phase of that parity has completed (a fresh barrier's
        preceding phase, parity 1, counts as completed)."""
        return self.phase % 2 != parity


def simulate(k_tiles: int, stages: int, rng: random.Random, tiles: int = 1, w_tma: bool = False,
             refill_early: bool = False, producers: int = 1) -> None:
    """``tiles`` tiles of ``k_tiles`` K tiles through one CTA (persistent when > 1): stage and parity
    continue across tiles (the kernel's ``done`` count), the consumers release a tile's last stage after
    ``wait_group(0)``, the producer starts the next tile meanwhile. ``producers``: decode warpgroups (2:
    ``PrefillConfig.producers``, each storing its half of the A stage; the first also issues the TMA copies;
    the named barrier spans both)."""
    # 128 arrivals per producer warpgroup + arrive.expect_tx; tx below
    full = [MBarrier(producers * kw.WG + 1) for _ in range(stages)]
    empty = [MBarrier(2 * kw.WG // 32) for _ in range(stages)]  # lane 0 of the 8 consumer warps
    a_tag, b_tag = [[None] * stages for _ in range(producers)], [None] * stages
    slot_reads = {}  # chunk -> producer warpgroups that have read it (the named barrier waits for all)
    reading = [set() for _ in range(stages)]  # consumer warpgroups whose wgmma still read the stage
    tx_pending = [0] * stages
    tma_queue = []
    slots = kw.RAW_SLOTS
    raw_full = [MBarrier(1) for _ in range(slots)]
    raw_tag, raw_read = [None] * slots, [True] * slots  # chunk in the slot; whether it has been read
    raw_tx = [0] * slots

    def issue_w(chunk):
        slot = chunk % slots
        raw_full[slot].arrive()  # arrive.expect_tx
        raw_tx[slot] += 1
        tma_queue.append(("raw", slot, chunk))

    def producer(q):
        chunks = k_tiles // 2
        for g in range(tiles * k_tiles):
            s, kt = g % stages, g
            if w_tma and g % 2 == 0:  # a chunk (two K tiles) starts
                tile, c = divmod(g // 2, chunks)
                if c == 0 and q == 0:  # the tile's prologue
                    for i in range(min(slots, chunks)):
                        issue_w(tile * chunks + i)
                gc = g // 2
                slot = gc % slots
                if refill_early and c + slots < chunks and q == 0:  # a deliberate bug: the test that this can fail
                    issue_w(gc + slots)
                while not (raw_full[slot].passed((gc // slots) % 2) and raw_tx[slot] == 0):
                    yield False
                assert raw_tag[slot] == gc, f"producer decodes chunk {gc} from slot {slot} holding {raw_tag[slot]}"
                slot_reads.setdefault(gc, set()).add(q)
                yield True
                while len(slot_reads[gc]) < producers:  # named barrier: every producer thread has read the slot
                    yield False
                raw_read[slot] = True
                if c + slots < chunks and not refill_early and q == 0:
                    issue_w(gc + slots)
            while not empty[s].passed(kw.free_parity(g, stages)):
                yield False
            if q == 0:
                full[s].arrive()  # the elected thread's arrive.expect_tx ...
                tx_pending[s] += 1  # ... whose bytes arrive with the TMA write
                tma_queue.append((s, kt))
            assert not reading[s], f"producer {q} stores into stage {s} (tile {kt}) while wgmma reads it"
            a_tag[q][s] = kt
            yield True
            full[s].arrive(kw.WG)  # after fence.proxy.async
            yield True

    def tma():  # copies complete in any order, any time after they were issued
        while True:
            if tma_queue and rng.random() < 0.5:
                item = tma_queue.pop(rng.randrange(len(tma_queue)))
                if item[0] == "raw":
                    _, slot, chunk = item
                    assert raw_read[slot], f"W chunk {chunk} lands in slot {slot} before chunk {raw_tag[slot]} was read"
                    raw_tag[slot], raw_read[slot] = chunk, False
                    raw_tx[slot] -= 1
                    yield True
                    continue
                s, kt = item
                assert not reading[s], f"TMA writes stage {s} (tile {kt}) while wgmma reads it"
                b_tag[s] = kt
                tx_pending[s] -= 1
                yield True
            else:
                yield False

    def consumer(wg):
        for tile in range(tiles):
            done = tile * k_tiles
            for kt in range(k_tiles):
                g = done + kt
                s = g % stages
                # full's phase completes once all arrivals are in and no transaction bytes are pending
                while not (full[s].passed(kw.full_parity(g, stages)) and tx_pending[s] == 0):
                    yield False
                a = [a_tag[q][s] for q in range(producers)]
                assert a == [g] * producers and b_tag[s] == g, (
                    f"consumer {wg} reads K tile {g} from stage {s} holding A {a}, B {b_tag[s]}")
                reading[s].add(wg)  # wgmma issued
                yield True
                if kt > 0:  # wait_group(1): wgmma(g - 1) done, its stage released by the 4 warps
                    prev = (g - 1) % stages
                    reading[prev].discard(wg)
                    empty[prev].arrive(4)
                yield True
            last = (done + k_tiles - 1) % stages  # wait_group(0), then the tile's last stage is released
            reading[last].discard(wg)
            empty[last].arrive(4)
            yield True  # the epilogue

    actors = {f"producer{q}": producer(q) for q in range(producers)} | {"c1": consumer(1), "c2": consumer(2)}
    tma_actor = tma()
    idle = 0
    while actors:
        name = rng.choice(sorted(actors) + ["tma"])
        if name == "tma":
            progressed = next(tma_actor)
        else:
            try:
                progressed = next(actors[name])
            except StopIteration:
                del actors[name]
                progressed = True
        idle = 0 if progressed else idle + 1
        assert idle < 10_000, f"deadlock: k_tiles={k_tiles} stages={stages}, still running {sorted(actors)}"


@pytest.mark.parametrize("stages", [2, 3, 4, 5])
@pytest.mark.parametrize("tiles", [1, 3])
def test_pipeline_protocol(stages, tiles):
    rng = random.Random(stages)
    for k_tiles in (1, 2, 3, stages, stages + 1, 2 * stages + 1, 16):
        for _ in range(30):
            simulate(k_tiles, stages, rng, tiles)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("producers", [1, 2])
def test_pipeline_protocol_w_tma(stages, tiles, producers):
    """W by TMA: K tiles in pairs (k % 128 == 0), 1 to 10 chunks per tile, 1 or 3 tiles per CTA; one or two
    producer warpgroups (``NVFP4JAX_GEMM_WS_PRODUCERS=2``)."""
    rng = random.Random(100 + stages)
    for k_tiles in (2, 4, 6, 2 * stages, 20):
        for _ in range(30):
            simulate(k_tiles, stages, rng, tiles, w_tma=True, producers=producers)


def test_w_tma_protocol_check_can_fail():
    """A slot refilled before the producer has read it (the refill ahead of the wait, as if the named barrier
    were missing) is caught: a copy lands in a slot whose chunk was not read yet, or a read finds the wrong
    chunk."""
    for producers in (1, 2):
        with pytest.raises(AssertionError):
            for seed in range(20):
                simulate(8, 3, random.Random(seed), w_tma=True, refill_early=True, producers=producers)


def test_protocol_check_can_fail(monkeypatch):
    """A wrong parity (the consumers' for the producer) is caught: the producer then overwrites a stage
    before its tile was consumed, or the schedule hangs."""
    monkeypatch.setattr(kw, "free_parity", kw.full_parity)
    with pytest.raises(AssertionError):
        for seed in range(20):
            simulate(9, 3, random.Random(seed))

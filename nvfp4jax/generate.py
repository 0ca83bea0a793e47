"""Generation: jitted prefill and decode steps, sampling, the host loop, MTP speculative decoding.

Layers, from the bottom:

* :func:`filter_logits` / :func:`sample_tokens` -- temperature, top-k, top-p and greedy sampling of
  one token per row, inside jit. Every row carries its own parameters and its own key
  ``fold_in(fold_in(key(seed), request), position)`` (request = its slot), so a request's tokens do
  not depend on the other requests in the batch, nor on whether speculative decoding is on.
* :func:`step` (alias ``prefill_step`` / ``decode_step``) -- ``model.step`` plus sampling, wrapped in
  ``eqx.filter_jit(donate="all-except-first")``: the state is donated and updated in place. Decode is
  the chunk-1 case with fixed shapes for a given batch and pool, so it compiles once; a chunk-1
  prefill reuses that compilation. :func:`verify_step` (speculative decoding) does not donate: the
  caller may need the state it started from. :func:`draft_step` runs the MTP block.
* :func:`generate` -- the host loop: validation (all errors raised before anything is launched),
  chunked prefill of prompts of different lengths, decode with stop tokens and a token budget,
  streaming through a callback, and optionally MTP speculative decoding.

jaxtyping dimensions: ``batch chunk vocab streams dim`` (see ``model/layers.py``).
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt32

from nvfp4jax.state import DecodeState, check_capacity, init_state, release_slots

TokenCallback = Callable[[int, int], None]  # (request index, token id)


# ---------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    ``temperature == 0`` is greedy (argmax; lowest id on ties). Otherwise logits are divided by the
    temperature, then the ``top_k`` largest are kept (0 = all), then the smallest prefix of them whose
    probability mass reaches ``top_p`` (1 = all; the first token is always kept), and one token is
    drawn from the renormalised rest. ``seed`` fixes the draws.
    """

    temperature: numbers.Real = 0.0
    top_k: numbers.Integral = 0
    top_p: numbers.Real = 1.0
    seed: numbers.Integral = 0

    def __post_init__(self):
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        for name, v, kind in (("temperature", t, numbers.Real), ("top_k", k, numbers.Integral),
                              ("top_p", p, numbers.Real), ("seed", s, numbers.Integral)):
            if isinstance(v, bool) or not isinstance(v, kind):
                raise TypeError(f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}, got {v!r}")
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {k!r}")
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not 0 <= s < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingArrays(eqx.Module):
    """Per-row sampling parameters as device arrays (dynamic: changing them does not recompile)."""

    temperature: Float[Array, " batch"]
    top_k: Int[Array, " batch"]
    top_p: Float[Array, " batch"]
    seed: UInt32[Array, " batch"]
    request: Int[Array, " batch"]  # index of the request in the slot (part of its key)

    @staticmethod
    def of(sampling: Sampling, batch: int) -> "SamplingArrays":
        full = lambda v, dt: jnp.full((batch,), v, dt)  # noqa: E731
        return SamplingArrays(full(sampling.temperature, jnp.float32), full(sampling.top_k, jnp.int32),
                              full(sampling.top_p, jnp.float32), full(sampling.seed, jnp.uint32),
                              jnp.arange(batch, dtype=jnp.int32))


def filter_logits(logits: Float[Array, "batch vocab"], temperature: Float[Array, " batch"],
                  top_k: Int[Array, " batch"], top_p: Float[Array, " batch"]) -> Float[Array, "batch vocab"]:
    """``logits / temperature`` with everything outside the top-k / top-p set at ``-inf`` (rows with
    temperature > 0; see :class:`Sampling`). Ties are ranked by lower token id first."""

    def row(lg, t, k, p):
        v = lg.shape[-1]
        order = jnp.argsort(-lg, stable=True)
        scaled = lg[order] / jnp.maximum(t, jnp.float32(1e-30))
        rank = jnp.arange(v, dtype=jnp.int32)
        keep = (k <= 0) | (rank < k)
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf))
        mass_before = jnp.cumsum(probs) - probs
        keep = keep & ((mass_before < p) | (rank == 0))
        return jnp.full((v,), -jnp.inf, jnp.float32).at[order].set(jnp.where(keep, scaled, -jnp.inf))

    return jax.vmap(row)(logits.astype(jnp.float32), temperature, top_k, top_p)


def sample_tokens(logits: Float[Array, "batch vocab"], params: SamplingArrays, positions: Int[Array, " batch"],
                  *, greedy: bool) -> Int[Array, " batch"]:
    """One token per row; ``positions[b]`` is the position the new token will take (part of the key).

    ``greedy`` (static) skips the sort entirely when every row is greedy.
    """
    top1 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return top1

    def key(seed, request, position):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), request), position)

    keys = jax.vmap(key)(params.seed, params.request, positions)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(params.temperature > 0, drawn, top1)


# ---------------------------------------------------------------------------------------------- jitted steps
# The first argument (never donated) is ``(model, params)``: weights and sampling parameters are
# reused by every step; the state and the per-step inputs are donated.
def _take(x: Array, index: Int[Array, " batch"]) -> Array:
    """``x[b, index[b]]`` for ``x`` of shape ``[batch, chunk, ...]``."""
    return jnp.take_along_axis(x, index.reshape(-1, 1, *([1] * (x.ndim - 2))), axis=1)[:, 0]


def _step(fixed, state: DecodeState, tokens: Int[Array, "batch chunk"], num_new: Int[Array, " batch"], greedy: bool):
    """A chunk of tokens per slot (the first ``num_new[b]`` of row b are real; 0 leaves the slot
    untouched): prefill when ``chunk > 1``, decode when ``chunk == 1`` and ``num_new`` marks the active
    slots. Samples the token that follows each row's last real token.

    Returns ``(next_tokens, last_logits, last_hidden, hidden, state)``.
    """
    model, params = fixed
    lengths = state.lengths
    last = jnp.maximum(num_new - 1, 0)
    logits, hidden, state = model.step(state, tokens, num_new, logits_at=last[:, None])  # head at one position
    last_logits = logits[:, 0]
    nxt = sample_tokens(last_logits, params, lengths + num_new, greedy=greedy)
    return nxt, last_logits, _take(hidden, last), hidden, state


def _verify(fixed, state: DecodeState, tokens: Int[Array, "batch 2"], num_new: Int[Array, " batch"], greedy: bool):
    """Speculative check of ``tokens = [current, draft]``: samples after both positions.

    Returns ``(next_tokens [batch, 2], hidden, state)``; ``next_tokens[:, 0]`` is the token after
    ``current`` (the draft is right when it equals it), ``next_tokens[:, 1]`` the token after the draft.
    """
    model, params = fixed
    lengths = state.lengths
    logits, hidden, state = model.step(state, tokens, num_new)
    positions = lengths[:, None] + jnp.arange(1, 3, dtype=jnp.int32)[None, :]
    nxt = jax.vmap(lambda lg, pos: sample_tokens(lg, params, pos, greedy=greedy), in_axes=1, out_axes=1)(logits,
                                                                                                       positions)
    return nxt, hidden, state


def _draft(model, state: DecodeState, hidden: Float[Array, "batch chunk streams dim"],
           next_tokens: Int[Array, "batch chunk"], num_new: Int[Array, " batch"]):
    """MTP block over ``num_new[b]`` (hidden state, next token) pairs; returns the greedy draft of the
    token after the last pair, and the state."""
    logits, state = model.mtp_step(state, hidden, next_tokens, num_new)
    return jnp.argmax(_take(logits, jnp.maximum(num_new - 1, 0)), axis=-1).astype(jnp.int32), state


#: prefill (chunk > 1) and decode (chunk 1) share one wrapper, so a chunk-1 prefill reuses the decode
#: compilation; the state is donated and updated in place
step = eqx.filter_jit(_step, donate="all-except-first")
prefill_step = decode_step = step
#: not donated: the state it started from stays valid, so a rejected draft is redone from it
verify_step = eqx.filter_jit(_verify)
draft_step = eqx.filter_jit(_draft, donate="all-except-first")
release_step = eqx.filter_jit(release_slots, donate="all")


# ---------------------------------------------------------------------------------------------- host loop
@dataclasses.dataclass
class Generation:
    """Result of :func:`generate`. ``tokens[i]`` are request i's new tokens (a stop token that ended it
    included); ``finish[i]`` is ``"stop"`` or ``"length"``. Times are wall-clock seconds; the first
    decode step includes compilation, so :attr:`tokens_per_second` leaves it out when there are more."""

    tokens: list[list[int]]
    finish: list[str]
    state: DecodeState
    prompt_tokens: int
    prefill_seconds: float
    step_seconds: list[float]
    step_tokens: list[int]
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of MTP drafts the main model confirmed (nan without speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput (all requests), excluding the first, compiling step when there are others."""
        times, toks = self.step_seconds, self.step_tokens
        if len(times) > 1:
            times, toks = times[1:], toks[1:]
        return sum(toks) / sum(times) if times and sum(times) > 0 else float("nan")


def _check_ids(ids: Sequence[int], vocab: int, what: str) -> list[int]:
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{what}: token ids must be integers, got {t!r}")
        if not 0 <= int(t) < vocab:
            raise ValueError(f"{what}: token id {int(t)} is outside the vocabulary [0, {vocab})")
        out.append(int(t))
    return out


def _bucket(n: int) -> int:
    """Prefill chunk for a longest prompt of ``n`` tokens: the next power of two >= 16 (few compiles)."""
    return max(16, 1 << (n - 1).bit_length())


def _validate(model, prompts, max_new_tokens, sampling, stop_tokens, prefill_chunk, speculative):
    vocab = model.cfg.vocab_size
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    if speculative and model.mtp is None:
        raise ValueError("speculative decoding needs the MTP block, and this model has none")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        checked.append(_check_ids(p, vocab, f"prompt {i}"))
    return checked, frozenset(_check_ids(stop_tokens, vocab, "stop_tokens"))


def _prepare_state(model, state, lengths, max_new_tokens, max_len, page_size, num_pages):
    """The state to run in (given or new), after every capacity check; all slots free."""
    n = len(lengths)
    need = [s + max_new_tokens for s in lengths]
    if state is None:
        state = init_state(model, batch=n, max_len=max_len or max(need), page_size=page_size, num_pages=num_pages)
    if n > state.batch:
        raise ValueError(f"{n} prompts is a batch larger than the state's {state.batch} slots")
    for i, s in enumerate(lengths):
        if s > state.max_len:
            raise ValueError(f"prompt {i} has {s} tokens; the state holds at most {state.max_len} per slot")
        if need[i] > state.max_len:
            raise ValueError(f"prompt {i} ({s} tokens) + max_new_tokens {max_new_tokens} = {need[i]} positions; the "
                             f"state holds at most {state.max_len} per slot")
    if np.asarray(state.lengths).any():  # a state from an earlier call: free every slot
        state = release_step(state, jnp.ones((state.batch,), bool))
    check_capacity(state, np.array(need + [0] * (state.batch - n), np.int32))
    return state


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), on_token: TokenCallback | None = None, state: DecodeState | None = None,
             max_len: int | None = None, page_size: int = 16, num_pages: dict[int, int] | None = None,
             prefill_chunk: int | None = None, speculative: bool = False) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids), batched.

    Request i runs in slot i. ``state`` (from ``init_state``; donated, use ``result.state`` afterwards,
    which still holds the finished sequences; a later call frees every slot first) is created when not
    given, sized ``max_len`` (default: the longest prompt + ``max_new_tokens``).
    A request ends at its first token in ``stop_tokens`` (kept in its output) or after
    ``max_new_tokens``. ``on_token(i, token)`` is called for every new token as soon as it is known,
    in order within each request. Prompts are prefilled together in chunks of ``prefill_chunk``
    tokens (default: one power-of-two bucket). ``speculative`` drafts one token ahead with the MTP
    block and verifies it with the main model; the tokens are exactly those of plain decoding.

    Every problem (bad parameters or ids, a prompt longer than a slot, more prompts than slots, a
    page pool too small) raises ``ValueError``/``TypeError`` before anything is launched.
    """
    prompts, stops = _validate(model, prompts, max_new_tokens, sampling, stop_tokens, prefill_chunk, speculative)
    lengths = [len(p) for p in prompts]
    state = _prepare_state(model, state, lengths, max_new_tokens, max_len, page_size, num_pages)
    n, b = len(prompts), state.batch
    greedy = sampling.greedy
    fixed = (model, SamplingArrays.of(sampling, b))
    out: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    active = np.zeros(b, bool)
    active[:n] = True

    def emit(i: int, token: int) -> None:
        out[i].append(token)
        if on_token is not None:
            on_token(i, token)
        if token in stops:
            finish[i] = "stop"
            active[i] = False
        elif len(out[i]) >= max_new_tokens:
            active[i] = False

    # ---- prefill, chunk by chunk; with MTP, the MTP block follows the main model over the prompt
    t0 = time.perf_counter()
    lens = np.array(lengths + [0] * (b - n), np.int32)
    chunk = prefill_chunk or _bucket(int(lens.max()))
    width = -(-int(lens.max()) // chunk) * chunk
    padded = np.zeros((b, width + 1), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    first = np.zeros(b, np.int32)
    last_hidden = None
    for c in range(0, width, chunk):
        num = np.clip(lens - c, 0, chunk).astype(np.int32)
        nxt, _, h_last, hidden, state = prefill_step(fixed, state, jnp.asarray(padded[:, c: c + chunk]),
                                                     jnp.asarray(num), greedy)
        ends_here = (lens > c) & (lens <= c + chunk)
        first = np.where(ends_here, np.asarray(nxt), first)
        if speculative:
            last_hidden = h_last if last_hidden is None else jnp.where(jnp.asarray(ends_here)[:, None, None], h_last,
                                                                         last_hidden)
            num_mtp = np.clip(lens - 1 - c, 0, chunk).astype(np.int32)  # positions whose next token is in the prompt
            _, state = draft_step(model, state, hidden, jnp.asarray(padded[:, c + 1: c + chunk + 1]), jnp.asarray(num_mtp))
    for i in range(n):
        emit(i, int(first[i]))
    prefill_seconds = time.perf_counter() - t0

    result = Generation(out, finish, state, int(lens.sum()), prefill_seconds, [], [])
    token = first
    if speculative:
        pair = jnp.stack([last_hidden, jnp.zeros_like(last_hidden)], axis=1)
        draft, state = draft_step(model, state, pair, jnp.asarray(np.stack([first, first], 1)),
                                  jnp.asarray(active.astype(np.int32)))
        state = _speculate(fixed, state, token, np.asarray(draft), active, emit, greedy, result)
    else:
        while active.any():
            t = time.perf_counter()
            was = active.copy()
            nxt, _, _, _, state = decode_step(fixed, state, jnp.asarray(token[:, None]),
                                              jnp.asarray(active.astype(np.int32)), greedy)
            token = np.asarray(nxt)
            for i in np.nonzero(was)[0]:
                emit(int(i), int(token[i]))
            result.step_seconds.append(time.perf_counter() - t)
            result.step_tokens.append(int(was.sum()))
    result.state = state
    return result


def _speculate(fixed, state, token, draft, active, emit, greedy, result: Generation):
    """The speculative decode loop: verify ``[token, draft]`` per slot, keep what the main model agrees
    with, redo the chunk from the saved state when a draft is rejected, draft again with MTP."""
    model = fixed[0]
    while active.any():
        t = time.perf_counter()
        was = active.copy()
        act = was.astype(np.int32)
        pair = jnp.asarray(np.stack([token, draft], 1))
        nxt, hidden, new_state = verify_step(fixed, state, pair, jnp.asarray(2 * act), greedy)
        nxt = np.asarray(nxt)
        accepted = was & (nxt[:, 0] == draft)
        if not (accepted == was).all():  # redo from the state before: 2 tokens where accepted, 1 where rejected
            del new_state
            nxt, hidden, new_state = verify_step(fixed, state, pair, jnp.asarray(act * (1 + accepted)), greedy)
            nxt = np.asarray(nxt)
        state = new_state
        result.drafted += int(was.sum())
        result.accepted += int(accepted.sum())
        emitted = 0
        for i in np.nonzero(was)[0]:
            emit(int(i), int(nxt[i, 0]))
            emitted += 1
            if accepted[i] and active[i]:
                emit(int(i), int(nxt[i, 1]))
                emitted += 1
        used = act * (1 + accepted)
        token = nxt[np.arange(len(used)), np.maximum(used - 1, 0)].astype(np.int32)
        if active.any():
            draft, state = draft_step(model, state, hidden, jnp.asarray(nxt), jnp.asarray(used * active))
            draft = np.asarray(draft)
        result.step_seconds.append(time.perf_counter() - t)
        result.step_tokens.append(emitted)
    return state

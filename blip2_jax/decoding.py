"""Model-agnostic decoding loops (greedy search, sampling, beam search) and their score processors.

Each loop is one `lax.while_loop` over a pytree state, so the whole generation jits into one
program that compiles once per (batch, beams, max_new_tokens) shape. The rules (processor order,
beam bookkeeping, length penalty, early stopping, padding) follow transformers 5.x `generate`.

The caller owns the model. It prefills the prompt and hands over
  first_logits  f32 [B, V]   logits for the first new token,
  cache         pytree       the prefilled cache; every leaf has the batch on `cache_batch_axis`
                             (an int for all leaves, or a pytree of ints / None matching `cache`,
                             None = a leaf without batch that is carried unchanged),
  step_fn       (tokens int32 [B'], cache, step int32 scalar) -> (logits f32 [B', V], cache)
                runs one token at the next position; `step` = tokens generated before it.
  presence      bool [B, V]  tokens the repetition penalty already counts (`token_presence`).
Beam search repeats the cache, presence and logits per beam itself (rows ordered
[b0k0, b0k1, ..., b1k0, ...]); anything per-row inside the caller's `step_fn` closure (attention
masks, encoder states) must be repeated the same way, e.g. with `repeat_for_beams`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
StepFn = Callable[[Array, Any, Array], tuple[Array, Any]]

# The reference marks dead beams / blocked hypotheses by adding this (finite, so sums stay
# ordered the way the reference orders them).
DEAD_SCORE = -1.0e9


# ----------------------------------------------------------------------------------------------
# Score processors
# ----------------------------------------------------------------------------------------------
# Order (transformers 5.x `_get_logits_processor`): repetition penalty -> minimum new tokens
# (EOS suppressed) -> and, only when sampling, temperature -> top-k -> top-p. Greedy and sampling
# apply them to raw float32 logits; beam search applies the first two to float32 log-probs.
#
# The repetition penalty counts every distinct token id already in the sequence. Instead of
# re-scanning the history each step we carry a presence bitmap `[rows, vocab]` (bool) that the
# caller initialises from whatever history the reference counts, and set one bit per new token.


def eos_ids_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """Normalises an EOS spec (int, list of ints or None) to a tuple of ints."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def is_eos(tokens: Array, eos_ids: tuple[int, ...]) -> Array:
    """tokens: int [...] -> bool [...], True where the token is one of `eos_ids`."""
    hit = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        hit = hit | (tokens == e)
    return hit


def token_presence(ids: Array, vocab_size: int, mask: Array | None = None) -> Array:
    """Presence bitmap of a token history.

    ids: int [B, S]; mask: bool/int [B, S] or None (all counted). Returns bool [B, vocab_size].
    Ids outside [0, vocab_size) are ignored, like the reference does for ids the LM head cannot
    produce.
    """
    ids = jnp.asarray(ids)
    keep = (ids >= 0) & (ids < vocab_size)
    if mask is not None:
        keep = keep & (jnp.asarray(mask) != 0)
    ids = jnp.where(keep, ids, vocab_size)  # spare column, dropped below
    rows = jnp.arange(ids.shape[0])[:, None]
    bitmap = jnp.zeros((ids.shape[0], vocab_size + 1), bool).at[rows, ids].set(True)
    return bitmap[:, :vocab_size]


def repetition_counted_positions(attention_mask: Array) -> Array:
    """Which positions of `input_ids` the reference's repetition penalty counts.

    transformers 5.x skips the leading run of masked positions (left padding before the first
    attended token) and counts everything after it, pads in the middle included.
    attention_mask: [B, S] -> bool [B, S].
    """
    attention_mask = jnp.asarray(attention_mask) != 0
    first = jnp.argmax(attention_mask, axis=1)
    return jnp.arange(attention_mask.shape[1])[None, :] >= first[:, None]


def add_tokens(presence: Array, tokens: Array) -> Array:
    """presence: bool [B, V]; tokens: int [B] -> presence with each row's token set."""
    rows = jnp.arange(presence.shape[0])
    ids = jnp.where((tokens >= 0) & (tokens < presence.shape[1]), tokens, presence.shape[1])
    return presence.at[rows, ids].set(True, mode="drop")


def apply_repetition_penalty(scores: Array, presence: Array, penalty: float) -> Array:
    """CTRL repetition penalty (Keskar et al. 2019): s*p if s < 0 else s/p, on seen tokens only.

    scores: f32 [B, V]; presence: bool [B, V].
    """
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(presence, penalised, scores)


def suppress_eos_before_min(scores: Array, step: Array, min_new_tokens: int,
                            eos_ids: tuple[int, ...]) -> Array:
    """EOS gets -inf while fewer than `min_new_tokens` tokens have been generated.

    scores: [B, V]; step: int32 scalar, tokens generated before this one.
    """
    if min_new_tokens <= 0 or not eos_ids:
        return scores
    vocab = jnp.arange(scores.shape[-1])
    eos_mask = is_eos(vocab, eos_ids) & (step < min_new_tokens)
    return jnp.where(eos_mask[None, :], -jnp.inf, scores)


def top_k_filter(scores: Array, top_k: int) -> Array:
    """Keeps tokens scoring at least the k-th best score (ties at the boundary kept), -inf elsewhere."""
    k = min(top_k, scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: Array, top_p: float, min_tokens_to_keep: int = 1) -> Array:
    """Nucleus filtering (Holtzman et al. 2020) exactly as the reference words it.

    Sort ascending, drop tokens whose cumulative probability (from the least likely upwards) is
    <= 1 - top_p, never dropping the `min_tokens_to_keep` most likely ones. scores: [B, V].
    """
    order = jnp.argsort(scores, axis=-1)
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted = drop_sorted.at[..., -min_tokens_to_keep:].set(False)
    rows = jnp.arange(scores.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, scores)


def process_scores(scores: Array, presence: Array | None, step: Array, *,
                   repetition_penalty: float, min_new_tokens: int, eos_ids: tuple[int, ...]) -> Array:
    """The processors shared by every decoding method: repetition penalty, then min new tokens."""
    if repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, presence, repetition_penalty)
    return suppress_eos_before_min(scores, step, min_new_tokens, eos_ids)


def warp_for_sampling(scores: Array, *, temperature: float, top_k: int | None,
                      top_p: float) -> Array:
    """Sampling-only warpers in the reference order: temperature -> top-k -> top-p."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return scores


# ----------------------------------------------------------------------------------------------
# Cache plumbing
# ----------------------------------------------------------------------------------------------
def _map_cache(fn, cache, cache_batch_axis):
    """Applies fn(leaf, axis) to every cache leaf with a batch axis."""
    if isinstance(cache_batch_axis, int):
        return jax.tree.map(lambda x: fn(x, cache_batch_axis), cache)
    return jax.tree.map(lambda ax, x: x if ax is None else fn(x, ax), cache_batch_axis, cache,
                        is_leaf=lambda a: a is None)


def repeat_for_beams(x: Array, num_beams: int, axis: int = 0) -> Array:
    """[.., B, ..] -> [.., B*num_beams, ..] with each row repeated `num_beams` times in place."""
    return jnp.repeat(x, num_beams, axis=axis)


def reorder_cache(cache, rows: Array, cache_batch_axis=1):
    """Gathers cache rows (beam reordering): rows int32 [B'] indexes the flat batch axis."""
    # rows are in range by construction: clamp (free) rather than fill (a select over the cache)
    return _map_cache(lambda x, ax: jnp.take(x, rows, axis=ax, mode="clip"), cache,
                      cache_batch_axis)


def _check_common(first_logits, max_new_tokens, min_new_tokens, repetition_penalty, presence):
    if first_logits.ndim != 2:
        raise ValueError(f"first_logits must be [batch, vocab], got shape {first_logits.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if presence is not None and presence.shape != first_logits.shape:
        raise ValueError(f"presence shape {presence.shape} != first_logits shape {first_logits.shape}")


def _initial_presence(presence, first_logits, repetition_penalty):
    if repetition_penalty == 1.0:
        return None  # the penalty is off: carry nothing
    if presence is None:  # only generated tokens count
        return jnp.zeros(first_logits.shape, bool)
    return jnp.asarray(presence, bool)


# ----------------------------------------------------------------------------------------------
# Greedy search and sampling (one sequence per row)
# ----------------------------------------------------------------------------------------------
class _SampleState(NamedTuple):
    step: Array        # int32 scalar: tokens generated so far
    tokens: Array      # int32 [B, max_new], pad-filled
    finished: Array    # bool [B]
    cache: Any
    presence: Any      # bool [B, V] or None
    rng: Any


def _decode_one_per_row(first_logits, cache, step_fn, choose, *, rng, max_new_tokens,
                        min_new_tokens, eos_token_id, pad_token_id, repetition_penalty, presence):
    """Shared loop of greedy search and sampling; choose(scores, key) -> int32 [B]."""
    _check_common(first_logits, max_new_tokens, min_new_tokens, repetition_penalty, presence)
    eos_ids = eos_ids_tuple(eos_token_id)
    batch = first_logits.shape[0]

    def select(state: _SampleState, logits):
        t = state.step
        scores = process_scores(logits.astype(jnp.float32), state.presence, t,
                                   repetition_penalty=repetition_penalty,
                                   min_new_tokens=min_new_tokens, eos_ids=eos_ids)
        key = None if state.rng is None else jax.random.fold_in(state.rng, t)
        tok = choose(scores, key).astype(jnp.int32)
        if eos_ids:  # finished rows emit the pad id
            tok = jnp.where(state.finished, jnp.int32(pad_token_id), tok)
            finished = state.finished | is_eos(tok, eos_ids)
        else:
            finished = state.finished
        presence_ = None if state.presence is None else add_tokens(state.presence, tok)
        tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, t))
        return state._replace(step=t + 1, tokens=tokens, finished=finished, presence=presence_)

    state = _SampleState(
        step=jnp.int32(0),
        tokens=jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
        finished=jnp.zeros((batch,), bool),
        cache=cache,
        presence=_initial_presence(presence, first_logits, repetition_penalty),
        rng=rng,
    )
    state = select(state, first_logits)  # the prefill already produced step 0's logits

    def cond(s: _SampleState):
        return (s.step < max_new_tokens) & ~jnp.all(s.finished)

    def body(s: _SampleState):
        last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)
        logits, cache_ = step_fn(last, s.cache, s.step - 1)
        return select(s._replace(cache=cache_), logits)

    return jax.lax.while_loop(cond, body, state).tokens


def first_argmax(scores: Array) -> Array:
    """`jnp.argmax` over the last axis (the first index of the maximum; NaN counts as the
    maximum), as two plain reductions: XLA's CPU backend runs argmax's (value, index) reduction
    ~2x slower, which shows in the per-token cost of greedy decoding. -> int32 [...]."""
    nan = jnp.isnan(scores)
    best = jnp.max(scores, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, scores == best)
    idx = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, idx, scores.shape[-1] - 1), axis=-1)


def greedy_search(first_logits: Array, cache, step_fn: StepFn, *, max_new_tokens: int,
                  min_new_tokens: int = 0, eos_token_id: int | Sequence[int] | None,
                  pad_token_id: int, repetition_penalty: float = 1.0,
                  presence: Array | None = None) -> Array:
    """Greedy decoding. Returns int32 [B, max_new_tokens]: EOS kept, pad after it.

    Stops early once every row has emitted an EOS.
    """
    return _decode_one_per_row(
        first_logits, cache, step_fn, lambda scores, key: first_argmax(scores),
        rng=None, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        repetition_penalty=repetition_penalty, presence=presence)


def sample(first_logits: Array, cache, step_fn: StepFn, *, rng: Array, max_new_tokens: int,
           min_new_tokens: int = 0, eos_token_id: int | Sequence[int] | None, pad_token_id: int,
           temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
           repetition_penalty: float = 1.0, presence: Array | None = None) -> Array:
    """Multinomial sampling with the reference's defaults (top_k=50). Returns int32 [B, max_new].

    Scores: repetition penalty -> min new tokens -> temperature -> top-k -> top-p (top_k 0/None
    and top_p 1.0 disable those filters), then one categorical draw per row from
    `fold_in(rng, step)`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy_search for 0), got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")

    def choose(scores, key):
        scores = warp_for_sampling(scores, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(key, scores, axis=-1)

    return _decode_one_per_row(
        first_logits, cache, step_fn, choose, rng=rng, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        repetition_penalty=repetition_penalty, presence=presence)


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------
class _BeamState(NamedTuple):
    step: Array            # int32 scalar: tokens generated so far
    running: Array         # int32 [B, K, N] live beams' tokens
    running_scores: Array  # f32 [B, K] summed (processed) log-probs, best first
    src_rows: Array        # int32 [B*K] cache row each live beam continues from
    finished: Array        # int32 [B, K, N] kept hypotheses
    finished_scores: Array  # f32 [B, K] length-normalised scores, best first
    is_finished: Array     # bool [B, K] slot holds a real hypothesis
    improvable: Array      # bool [B] running beams may still beat the kept hypotheses (sticky)
    all_candidates_stopped: Array  # bool scalar: every candidate just hit EOS / the length limit
    cache: Any
    presence: Any          # bool [B*K, V] or None


def length_penalty_table(max_new_tokens: int, length_penalty: float) -> np.ndarray:
    """f32 [max_new+1]: gen_len ** length_penalty, in float64 then rounded like the reference."""
    lengths = np.arange(max_new_tokens + 1, dtype=np.float64)
    lengths[0] = 1.0  # unused
    return (lengths ** float(length_penalty)).astype(np.float32)


def _gather_beams(x: Array, idx: Array) -> Array:
    """x [B, M, ...], idx int [B, J] -> [B, J, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def beam_search(first_logits: Array, cache, step_fn: StepFn, *, num_beams: int,
                max_new_tokens: int, min_new_tokens: int = 0, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_token_id: int | Sequence[int] | None,
                pad_token_id: int | None, repetition_penalty: float = 1.0,
                num_return_sequences: int = 1, presence: Array | None = None,
                cache_batch_axis=1) -> tuple[Array, Array]:
    """Beam search with the reference's bookkeeping.

    first_logits f32 [B, V], cache with batch B (repeated per beam here), presence bool [B, V].
    Returns (tokens int32 [B, R, max_new], scores f32 [B, R]), best first, R =
    num_return_sequences; scores = sum of processed log-probs / gen_len ** length_penalty.
    Positions after a hypothesis' end hold `pad_token_id`, or the first EOS id when the pad id
    is 0/None (the reference's `pad_token_id or eos_token_id[0]`).
    early_stopping: False (heuristic: stop when the best live beam, normalised at the current
    length, cannot beat the worst kept hypothesis), True (stop when `num_beams` hypotheses are
    kept), or "never" (like False, but with length_penalty > 0 normalise at max_new_tokens).
    """
    _check_common(first_logits, max_new_tokens, min_new_tokens, repetition_penalty, presence)
    if early_stopping not in (False, True, "never"):
        raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be in [1, num_beams={num_beams}]")
    eos_ids = eos_ids_tuple(eos_token_id)
    batch, vocab = first_logits.shape
    k, n = num_beams, max_new_tokens
    # Enough candidates that `k` survive even if every beam's best continuations are EOS ids.
    n_cand = max(2, 1 + len(eos_ids)) * k
    if n_cand > k * vocab:
        raise ValueError(f"beam search needs {n_cand} candidates but only {k * vocab} exist")
    fill = -1 if not eos_ids else (pad_token_id if pad_token_id else eos_ids[0])
    penalty = jnp.asarray(length_penalty_table(n, length_penalty))
    may_finalize = jnp.arange(n_cand) < k  # only the first k ranks may become hypotheses
    row_offset = (jnp.arange(batch) * k)[:, None]

    def select(s: _BeamState, logits):
        t = s.step
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logprobs = process_scores(logprobs, s.presence, t, repetition_penalty=repetition_penalty,
                                     min_new_tokens=min_new_tokens, eos_ids=eos_ids)
        total = logprobs.reshape(batch, k, vocab) + s.running_scores[:, :, None]
        cand_scores, cand_idx = jax.lax.top_k(total.reshape(batch, k * vocab), n_cand)
        cand_beam, cand_tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
        cand_seqs = _gather_beams(s.running, cand_beam)
        cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_tok[:, :, None], (0, 0, t))
        stopped = is_eos(cand_tok, eos_ids) | (t + 1 >= n)

        # Live beams: the best k candidates that did not just stop.
        live_scores = cand_scores + stopped.astype(jnp.float32) * DEAD_SCORE
        pick = jax.lax.top_k(live_scores, k)[1]
        running = _gather_beams(cand_seqs, pick)
        running_scores = _gather_beams(live_scores, pick)
        src_rows = (_gather_beams(cand_beam, pick) + row_offset).reshape(-1).astype(jnp.int32)

        # Hypotheses: merge newly stopped top-k candidates with the kept ones, keep the best k.
        just_done = stopped & may_finalize[None, :]
        hyp = cand_scores / penalty[t + 1]
        full = jnp.all(s.is_finished, axis=1, keepdims=True) & (early_stopping is True)
        hyp = hyp + full.astype(jnp.float32) * DEAD_SCORE
        hyp = hyp + (~s.improvable[:, None]).astype(jnp.float32) * DEAD_SCORE
        hyp = hyp + (~just_done).astype(jnp.float32) * DEAD_SCORE
        merged_scores = jnp.concatenate([s.finished_scores, hyp], axis=1)
        keep = jax.lax.top_k(merged_scores, k)[1]
        finished = _gather_beams(jnp.concatenate([s.finished, cand_seqs], axis=1), keep)
        finished_scores = _gather_beams(merged_scores, keep)
        is_finished = _gather_beams(jnp.concatenate([s.is_finished, just_done], axis=1), keep)

        # Sticky early-stop heuristic, evaluated at the new length.
        gen_len = t + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_possible = running_scores[:, 0] / penalty[n]
        else:
            best_possible = running_scores[:, 0] / penalty[gen_len]
        worst_kept = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), DEAD_SCORE)
        improvable = s.improvable & jnp.any(best_possible[:, None] > worst_kept, axis=1)

        presence = s.presence
        if presence is not None:
            presence = add_tokens(presence[src_rows], running[:, :, t].reshape(-1))
        return s._replace(step=t + 1, running=running, running_scores=running_scores,
                          src_rows=src_rows, finished=finished, finished_scores=finished_scores,
                          is_finished=is_finished, improvable=improvable,
                          all_candidates_stopped=jnp.all(stopped), presence=presence)

    presence0 = _initial_presence(presence, first_logits, repetition_penalty)
    state = _BeamState(
        step=jnp.int32(0),
        running=jnp.full((batch, k, n), fill, jnp.int32),
        running_scores=jnp.tile(jnp.asarray([0.0] + [DEAD_SCORE] * (k - 1), jnp.float32), (batch, 1)),
        src_rows=jnp.arange(batch * k, dtype=jnp.int32),
        finished=jnp.full((batch, k, n), fill, jnp.int32),
        finished_scores=jnp.full((batch, k), DEAD_SCORE, jnp.float32),
        is_finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch,), bool),
        all_candidates_stopped=jnp.zeros((), bool),
        cache=_map_cache(lambda x, ax: repeat_for_beams(x, k, ax), cache, cache_batch_axis),
        presence=None if presence0 is None else repeat_for_beams(presence0, k),
    )
    state = select(state, repeat_for_beams(first_logits, k))  # step 0 from the prefill logits

    def cond(s: _BeamState):
        open_slots = ~(jnp.all(s.is_finished) & (early_stopping is True))
        return (s.step < n) & jnp.any(s.improvable) & open_slots & ~s.all_candidates_stopped

    def body(s: _BeamState):
        cache_ = reorder_cache(s.cache, s.src_rows, cache_batch_axis)
        last = jax.lax.dynamic_index_in_dim(s.running, s.step - 1, axis=2, keepdims=False)
        logits, cache_ = step_fn(last.reshape(-1), cache_, s.step - 1)
        return select(s._replace(cache=cache_), logits)

    state = jax.lax.while_loop(cond, body, state)
    return state.finished[:, :num_return_sequences], state.finished_scores[:, :num_return_sequences]

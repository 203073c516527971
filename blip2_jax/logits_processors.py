"""Score processors used while decoding, in the order transformers' `generate` applies them.

Order (transformers 5.x `_get_logits_processor`): repetition penalty -> minimum new tokens
(EOS suppressed) -> and, only when sampling, temperature -> top-k -> top-p. Greedy and sampling
apply them to raw float32 logits; beam search applies the first two to float32 log-probs.

The repetition penalty counts every distinct token id already in the sequence. Instead of
re-scanning the history each step we carry a presence bitmap `[rows, vocab]` (bool) that the
caller initialises from whatever history the reference counts, and set one bit per new token.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


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

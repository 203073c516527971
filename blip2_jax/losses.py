"""BLIP-2 training losses (paper §3.2 stage 1, §3.3 stage 2) as pure functions of arrays.

Every function works on one device and on global `jax.Array`s sharded over a mesh inside
`jax.jit`: the "gather across all GPUs" of the contrastive loss is simply computing on the global
batch, so nothing here needs a process group or a rank. Cross-entropies are computed in float32
and averaged over the non-ignored targets.

Label smoothing follows `torch.nn.functional.cross_entropy(label_smoothing=eps)`, which LAVIS uses:
per target, loss = (1 - eps) * nll + eps * mean over classes of -log p.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip2_jax.data.text import IGNORE_INDEX
from blip2_jax.models.qformer import itc_similarity

Array = jax.Array

# BLIP-2 (LAVIS blip2_qformer.py) draws hard negatives from the softmax over the negatives alone
# (positives set to -10000 first). BLIP (blip_pretrain.py) added 1e-4 to the softmax over all
# columns: once ITC puts nearly all the mass on the positive, that floor makes the draw uniform.
HARD_NEGATIVE_FLOOR = 0.0


# ----------------------------------------------------------------------------------------------
# Cross-entropy core
# ----------------------------------------------------------------------------------------------
def _token_cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.0) -> Array:
    """Per-position smoothed cross-entropy in float32.

    logits [..., V]; targets [...] int (out-of-range values, e.g. IGNORE_INDEX, are clipped to a
    real class and give a meaningless but finite number: the caller masks them). The target
    logit is a gather (one element per position), not a [..., V] one-hot product."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    index = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
    target_logit = jnp.take_along_axis(logits, index[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    if not label_smoothing:
        return nll
    smooth = lse - jnp.mean(logits, axis=-1)  # mean over classes of -log p
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth


def _masked_mean(values: Array, mask: Array) -> tuple[Array, Array]:
    """(sum(values * mask) / max(count, 1), count). An all-masked batch gives 0, not NaN."""
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.maximum(count, 1.0), count


def _soft_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean over rows of -sum_j targets[i, j] * log_softmax(logits)[i, j]. logits, targets [N, C]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(targets * logp, axis=-1))


# ----------------------------------------------------------------------------------------------
# Image-text contrastive learning (ITC)
# ----------------------------------------------------------------------------------------------
def itc_similarities(image_feats: Array, text_feats: Array, temp: Array | float
                     ) -> tuple[Array, Array]:
    """Query-max cosine similarities over the global batch.

    image_feats [B, Q, E] and text_feats [B, E], both L2-normalised; temp scalar (the caller
    clamps it, LAVIS keeps it in [0.001, 0.5]).
    Returns sim_i2t [B, B] with sim_i2t[i, j] = max_q image_feats[i, q] . text_feats[j] / temp,
    and sim_t2i [B, B] with sim_t2i[j, i] = max_q text_feats[j] . image_feats[i, q] / temp
    (rows are the "query" side of each direction, so sim_t2i == sim_i2t.T)."""
    sim_i2t = itc_similarity(image_feats, text_feats) / temp
    return sim_i2t, sim_i2t.T


def positive_pairs(batch_size: int, image_ids: Array | None = None) -> Array:
    """bool [B, B]: True where (row, column) is a matching image-text pair.

    Without ids only the diagonal; with image_ids [B] every pair showing the same image (retrieval
    fine-tuning, several captions per image in one batch)."""
    if image_ids is None:
        return jnp.eye(batch_size, dtype=bool)
    return image_ids[:, None] == image_ids[None, :]


def itc_loss(sim_i2t: Array, sim_t2i: Array, image_ids: Array | None = None,
             label_smoothing: float = 0.1) -> Array:
    """Image-text contrastive loss: cross-entropy in both directions, averaged.

    sim_i2t, sim_t2i [B, B] from `itc_similarities`; image_ids [B] or None. Targets are uniform
    over the positives of a row (one-hot without ids), then smoothed towards uniform over the
    batch: (1 - eps) * targets + eps / B, as LAVIS does in both cases."""
    b = sim_i2t.shape[0]
    pos = positive_pairs(b, image_ids).astype(jnp.float32)
    targets = pos / jnp.sum(pos, axis=1, keepdims=True)
    targets = (1.0 - label_smoothing) * targets + label_smoothing / b
    return (_soft_cross_entropy(sim_i2t, targets) + _soft_cross_entropy(sim_t2i, targets)) / 2


# ----------------------------------------------------------------------------------------------
# Image-text matching (ITM) with hard-negative mining
# ----------------------------------------------------------------------------------------------
def _hard_negative_logits(sim: Array, positives: Array, floor: float) -> Array:
    """Sampling logits: sim with positives at -inf (softmax over the negatives; with floor > 0,
    log(softmax over all columns + floor) instead). Rows with no negative become uniform (all
    zeros) so sampling stays finite — such a row (B = 1, one image per batch) has no true
    negative and its "negative" is an arbitrary pair."""
    logits = sim.astype(jnp.float32)
    if floor > 0:
        logits = jnp.logaddexp(jax.nn.log_softmax(logits, axis=-1), jnp.log(floor))
    logits = jnp.where(positives, -jnp.inf, logits)
    has_negative = jnp.any(~positives, axis=-1, keepdims=True)
    return jnp.where(has_negative, logits, 0.0)


def sample_hard_negatives(rng: Array, sim_i2t: Array, sim_t2i: Array,
                          image_ids: Array | None = None, floor: float = HARD_NEGATIVE_FLOOR
                          ) -> tuple[Array, Array]:
    """Hard negatives for ITM, drawn in proportion to the contrastive similarity.

    Per text j, one image from the softmax of sim_t2i[j] over the non-positive images; per image
    i, one text from the softmax of sim_i2t[i] over the non-positive texts (BLIP-2, LAVIS
    blip2_qformer.py). floor > 0 gives BLIP's variant: softmax over all columns + floor, the
    positives then zeroed. No gradient flows through.
    Returns neg_image_index [B] (for text j) and neg_text_index [B] (for image i), int32."""
    b = sim_i2t.shape[0]
    pos = positive_pairs(b, image_ids)
    sim_i2t, sim_t2i = jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i)
    rng_image, rng_text = jax.random.split(rng)
    neg_image = jax.random.categorical(rng_image, _hard_negative_logits(sim_t2i, pos, floor), axis=-1)
    neg_text = jax.random.categorical(rng_text, _hard_negative_logits(sim_i2t, pos, floor), axis=-1)
    return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itm_pairs(neg_image_index: Array, neg_text_index: Array) -> tuple[Array, Array, Array]:
    """The 3B ITM pairs in LAVIS's order: [positives; (neg image, text); (image, neg text)].

    Returns image_index [3B], text_index [3B] (rows of the global batch to gather) and
    labels [3B] int32 = [1] * B + [0] * 2B."""
    b = neg_image_index.shape[0]
    ar = jnp.arange(b, dtype=jnp.int32)
    image_index = jnp.concatenate([ar, neg_image_index.astype(jnp.int32), ar])
    text_index = jnp.concatenate([ar, ar, neg_text_index.astype(jnp.int32)])
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    return image_index, text_index, labels


def itm_loss(itm_logits: Array, labels: Array) -> Array:
    """Binary matched / not-matched cross-entropy. itm_logits [N, 2] (already averaged over the
    query outputs by the model), labels [N] in {0, 1}. Returns a float32 scalar."""
    return jnp.mean(_token_cross_entropy(itm_logits, labels))


# ----------------------------------------------------------------------------------------------
# Image-grounded text generation (ITG)
# ----------------------------------------------------------------------------------------------
def itg_loss(logits: Array, input_ids: Array, attention_mask: Array,
             label_smoothing: float = 0.1) -> Array:
    """Shifted next-token cross-entropy over the text (ITG, LAVIS's `BertLMHeadModel` loss).

    logits [B, T, V]: the Q-Former's LM-head outputs at the text positions only (query positions
    dropped), computed from the text with [DEC] in place of [CLS] (the pipeline's
    `qformer_dec_input_ids`); input_ids [B, T] (either form: the
    first token is never a target); attention_mask [B, T] (0 = padding, not a target).
    Position t predicts token t + 1. Mean over the real target tokens, float32 scalar."""
    per_token = _token_cross_entropy(logits[:, :-1], input_ids[:, 1:], label_smoothing)
    loss, _ = _masked_mean(per_token, attention_mask[:, 1:])
    return loss


# ----------------------------------------------------------------------------------------------
# Stage 2: language modelling through the frozen LLM
# ----------------------------------------------------------------------------------------------
def token_loss(logits: Array, targets: Array, label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Mean cross-entropy over the labelled positions, already aligned (logits[:, i] predicts
    targets[:, i]). logits [B, K, V]; targets [B, K] with IGNORE_INDEX where there is no loss.
    Returns (mean loss over counted tokens, number of counted tokens), float32."""
    per_token = _token_cross_entropy(logits, targets, label_smoothing)
    return _masked_mean(per_token, targets != IGNORE_INDEX)


def next_token_alignment(hidden: Array, labels: Array) -> tuple[Array, Array]:
    """Decoder-only LM: which outputs predict which labels, without the unlabelled prefix.

    hidden [B, P + T, ...]: the LLM outputs over [soft prompt (P positions, never labelled);
    text]; labels [B, T] on the text. Output P + j - 1 predicts text token j, so the result is
    (hidden[:, P-1 : P+T-1] [B, T, ...], labels [B, T]) — every label that can count, and
    no position that cannot. With P = 0 the first text token has no predictor and is dropped."""
    p = hidden.shape[1] - labels.shape[1]
    if p < 0:
        raise ValueError(f"{hidden.shape[1]} outputs for {labels.shape[1]} labels")
    if p == 0:
        return hidden[:, :-1], labels[:, 1:]
    return hidden[:, p - 1:-1], labels


def labelled_positions(targets: Array, num_positions: int) -> tuple[Array, Array]:
    """The first `num_positions` labelled positions of every row, in order (static shapes).

    targets [B, T] (IGNORE_INDEX = no loss). Returns positions [B, K] int32 into T and the
    targets there [B, K]; a row with fewer than K labels is filled with unlabelled positions
    (IGNORE_INDEX targets, so they do not count). Labels after a row's K-th are NOT covered:
    K must be at least the most labels a row can have for the loss to be unchanged; the number
    left out is `count(targets) - count(result)`."""
    unlabelled = targets == IGNORE_INDEX
    positions = jnp.argsort(unlabelled, axis=1, stable=True)[:, :num_positions].astype(jnp.int32)
    return positions, jnp.take_along_axis(targets, positions, axis=1)

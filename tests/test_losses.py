"""Losses against straightforward numpy re-implementations of LAVIS's formulas (written here,
independently of blip2_jax.losses), hand-checked values, and sharded == single-device."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from blip2_jax import losses
from blip2_jax.sharding import make_mesh


# ----------------------------------------------------------------------------------------------
# numpy references (torch semantics)
# ----------------------------------------------------------------------------------------------
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_cross_entropy(logits, targets, label_smoothing=0.0, ignore_index=-100):
    """torch.nn.functional.cross_entropy(logits [N, C], targets [N], reduction="mean")."""
    total, count = 0.0, 0
    for row, t in zip(np_log_softmax(logits), targets):
        if t == ignore_index:
            continue
        total += (1 - label_smoothing) * -row[t] + label_smoothing * np.mean(-row)
        count += 1
    return total / count


def np_itc_sims(image_feats, text_feats, temp):
    b, q, _ = image_feats.shape
    sim_i2t = np.zeros((b, b))
    sim_t2i = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            sim_i2t[i, j] = max(float(image_feats[i, k] @ text_feats[j]) for k in range(q)) / temp
            sim_t2i[j, i] = max(float(text_feats[j] @ image_feats[i, k]) for k in range(q)) / temp
    return sim_i2t, sim_t2i


def np_itc_loss(sim_i2t, sim_t2i, image_ids=None, eps=0.1):
    b = sim_i2t.shape[0]
    if image_ids is None:  # LAVIS pre-training branch
        targets = np.arange(b)
        return (np_cross_entropy(sim_i2t, targets, eps) + np_cross_entropy(sim_t2i, targets, eps)) / 2
    ids = np.asarray(image_ids).reshape(-1, 1)  # LAVIS retrieval fine-tuning branch
    pos = (ids == ids.T).astype(np.float64)
    t = pos / pos.sum(1, keepdims=True)
    t = (1 - eps) * t + eps * np.ones_like(t) / b
    l_t2i = -np.sum(np_log_softmax(sim_t2i) * t, axis=1).mean()
    l_i2t = -np.sum(np_log_softmax(sim_i2t) * t, axis=1).mean()
    return (l_t2i + l_i2t) / 2


def normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# ITC
# ----------------------------------------------------------------------------------------------
def test_itc_similarities_match_query_max():
    img = normalise(RNG.normal(size=(5, 3, 8))).astype(np.float32)
    txt = normalise(RNG.normal(size=(5, 8))).astype(np.float32)
    i2t, t2i = losses.itc_similarities(img, txt, 0.07)
    ref_i2t, ref_t2i = np_itc_sims(img, txt, 0.07)
    np.testing.assert_allclose(i2t, ref_i2t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t2i, ref_t2i, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_loss_matches_lavis(with_ids):
    b = 6
    sim_i2t = RNG.normal(size=(b, b)) * 3
    sim_t2i = RNG.normal(size=(b, b)) * 3  # deliberately not the transpose: directions must not mix
    ids = np.array([3, 1, 3, 7, 1, 2]) if with_ids else None
    got = losses.itc_loss(jnp.asarray(sim_i2t, jnp.float32), jnp.asarray(sim_t2i, jnp.float32),
                          None if ids is None else jnp.asarray(ids))
    np.testing.assert_allclose(got, np_itc_loss(sim_i2t, sim_t2i, ids), rtol=1e-5)


def test_itc_loss_hand_values():
    # equal similarities: every target distribution sums to 1, so the loss is log B
    b = 4
    flat = jnp.zeros((b, b))
    np.testing.assert_allclose(losses.itc_loss(flat, flat), math.log(b), rtol=1e-6)
    # no smoothing, one-hot targets: loss = -log softmax(diagonal)
    sim = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    expect = -math.log(math.exp(2) / (math.exp(2) + 1))
    np.testing.assert_allclose(losses.itc_loss(sim, sim, label_smoothing=0.0), expect, rtol=1e-6)


def test_itc_unique_ids_equal_no_ids():
    sim_i2t = jnp.asarray(RNG.normal(size=(4, 4)), jnp.float32)
    sim_t2i = jnp.asarray(RNG.normal(size=(4, 4)), jnp.float32)
    np.testing.assert_allclose(losses.itc_loss(sim_i2t, sim_t2i, jnp.arange(4) * 5),
                               losses.itc_loss(sim_i2t, sim_t2i), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# ITM
# ----------------------------------------------------------------------------------------------
def lavis_negative_weights(sim, image_ids=None, floor=1e-4):
    """LAVIS: softmax(sim) + 1e-4 with the positives zeroed, then normalised (multinomial)."""
    w = np.exp(np_log_softmax(sim)) + floor
    b = sim.shape[0]
    pos = np.eye(b, dtype=bool) if image_ids is None else image_ids[:, None] == image_ids[None, :]
    w[pos] = 0
    return w / w.sum(1, keepdims=True)


_sample = jax.jit(jax.vmap(losses.sample_hard_negatives, in_axes=(0, None, None, None)))


@pytest.mark.parametrize("with_ids", [False, True])
def test_hard_negative_distribution(with_ids):
    b, n = 5, 20000
    sim_i2t = RNG.normal(size=(b, b)) * 2
    sim_t2i = RNG.normal(size=(b, b)) * 2
    ids = np.array([0, 1, 0, 2, 3]) if with_ids else None
    keys = jax.random.split(jax.random.key(1), n)
    neg_img, neg_txt = _sample(keys, jnp.asarray(sim_i2t, jnp.float32),
                               jnp.asarray(sim_t2i, jnp.float32),
                               None if ids is None else jnp.asarray(ids))
    neg_img, neg_txt = np.asarray(neg_img), np.asarray(neg_txt)
    for draws, sim in ((neg_img, sim_t2i), (neg_txt, sim_i2t)):  # text -> image uses sim_t2i
        freq = np.stack([np.bincount(draws[:, r], minlength=b) for r in range(b)]) / n
        expect = lavis_negative_weights(sim, ids)
        assert np.all(freq[expect == 0] == 0), "a positive was drawn as a negative"
        np.testing.assert_allclose(freq, expect, atol=0.015)


def test_hard_negatives_without_any_negative_stay_in_range():
    sim = jnp.zeros((2, 2))
    neg_img, neg_txt = losses.sample_hard_negatives(jax.random.key(0), sim, sim, jnp.array([4, 4]))
    assert np.all((np.asarray(neg_img) >= 0) & (np.asarray(neg_img) < 2))
    assert np.all((np.asarray(neg_txt) >= 0) & (np.asarray(neg_txt) < 2))


def test_itm_pairs_layout():
    image_index, text_index, labels = losses.itm_pairs(jnp.array([2, 0, 1]), jnp.array([1, 2, 0]))
    np.testing.assert_array_equal(image_index, [0, 1, 2, 2, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(text_index, [0, 1, 2, 0, 1, 2, 1, 2, 0])
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_itm_loss():
    logits = RNG.normal(size=(9, 2))
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
    got = losses.itm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(losses.itm_loss(jnp.zeros((3, 2)), jnp.array([1, 0, 1])),
                               math.log(2), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# ITG and LM losses
# ----------------------------------------------------------------------------------------------
def lavis_itg_reference(logits, input_ids, attention_mask, eps=0.1, pad_id=0):
    """LAVIS: labels = ids with pads -> -100; loss over logits[:, :-1] vs labels[:, 1:]."""
    labels = np.where(input_ids == pad_id, -100, input_ids)
    v = logits.shape[-1]
    return np_cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), eps)


def test_itg_loss_matches_lavis():
    b, t, v = 3, 7, 11
    lengths = np.array([7, 4, 2])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, RNG.integers(1, v, size=(b, t)), 0)
    ids[:, 0] = 10  # [DEC]
    logits = RNG.normal(size=(b, t, v)) * 2
    got = losses.itg_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got, lavis_itg_reference(logits, ids, mask), rtol=1e-5)


def causal_lm_loss(logits, labels, label_smoothing=0.0):
    """Decoder-only LM loss as the trainer computes it (labels aligned with the inputs)."""
    aligned, targets = losses.next_token_alignment(logits, labels)
    return losses.token_loss(aligned, targets, label_smoothing)


def test_lm_loss_shift_and_ignore():
    b, t, v = 2, 6, 9
    logits = RNG.normal(size=(b, t, v)) * 2
    labels = RNG.integers(0, v, size=(b, t))
    labels[:, :2] = -100  # query/prompt positions
    labels[1, 4:] = -100  # padding
    loss, count = causal_lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    # transformers' ForCausalLMLoss: pad labels with -100 on the right, shift left by one
    shift = np.concatenate([labels[:, 1:], np.full((b, 1), -100)], axis=1)
    ref = np_cross_entropy(logits.reshape(-1, v), shift.reshape(-1))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert int(count) == int((shift != -100).sum()) == 6


def test_lm_loss_label_smoothing():
    logits = RNG.normal(size=(2, 5, 7))
    labels = RNG.integers(0, 7, size=(2, 5))
    loss, _ = causal_lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 0.1)
    ref = np_cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), 0.1)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_seq2seq_loss_no_shift():  # T5: decoder inputs are the labels shifted right
    b, t, v = 2, 5, 8
    logits = RNG.normal(size=(b, t, v))
    labels = RNG.integers(0, v, size=(b, t))
    labels[0, 3:] = -100
    loss, count = losses.token_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(loss, np_cross_entropy(logits.reshape(-1, v), labels.reshape(-1)),
                               rtol=1e-5)
    assert int(count) == 8


def test_losses_are_float32_from_bf16_logits():
    logits = jnp.asarray(RNG.normal(size=(2, 4, 6)), jnp.bfloat16)
    labels = jnp.asarray(RNG.integers(0, 6, size=(2, 4)))
    loss, _ = causal_lm_loss(logits, labels)
    assert loss.dtype == jnp.float32
    ref = np_cross_entropy(np.asarray(logits.astype(jnp.float32))[:, :-1].reshape(-1, 6),
                           np.asarray(labels)[:, 1:].reshape(-1))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_all_ignored_is_zero_not_nan():
    loss, count = causal_lm_loss(jnp.ones((1, 3, 4)), jnp.full((1, 3), -100))
    assert float(loss) == 0.0 and int(count) == 0


# ----------------------------------------------------------------------------------------------
# Sharded (8 fake devices) == single device
# ----------------------------------------------------------------------------------------------
@jax.jit
def _stage1_losses(img, txt, ids, itm_logits, qf_logits, qf_ids, qf_mask, lm_logits, lm_labels, key):
    i2t, t2i = losses.itc_similarities(img, txt, 0.07)
    itc = losses.itc_loss(i2t, t2i, ids)
    neg_img, neg_txt = losses.sample_hard_negatives(key, i2t, t2i, ids)
    image_index, text_index, labels = losses.itm_pairs(neg_img, neg_txt)
    itm = losses.itm_loss(itm_logits, labels)
    itg = losses.itg_loss(qf_logits, qf_ids, qf_mask)
    lm, _ = causal_lm_loss(lm_logits, lm_labels)
    return dict(itc=itc, itm=itm, itg=itg, lm=lm, image_index=image_index, text_index=text_index)


def test_sharded_equals_single_device():
    assert jax.device_count() == 8
    b, q, e, t, v = 16, 4, 8, 6, 32
    args = dict(
        img=normalise(RNG.normal(size=(b, q, e))).astype(np.float32),
        txt=normalise(RNG.normal(size=(b, e))).astype(np.float32),
        ids=RNG.integers(0, 10, size=b).astype(np.int32),
        itm_logits=RNG.normal(size=(3 * b, 2)).astype(np.float32),
        qf_logits=RNG.normal(size=(b, t, v)).astype(np.float32),
        qf_ids=RNG.integers(1, v, size=(b, t)).astype(np.int32),
        qf_mask=(np.arange(t)[None] < RNG.integers(2, t + 1, size=(b, 1))).astype(np.int32),
        lm_logits=RNG.normal(size=(b, t, v)).astype(np.float32),
        lm_labels=np.where(RNG.random((b, t)) < 0.3, -100, RNG.integers(0, v, (b, t))).astype(np.int32),
    )
    key = jax.random.key(3)
    single = jax.device_put(args, jax.devices()[0])
    ref = _stage1_losses(**single, key=key)

    mesh = make_mesh((2, 1, 4))  # data x fsdp x tensor: batch over 2, vocab over 4
    batch = ("data", "fsdp")
    specs = dict(img=P(batch), txt=P(batch), ids=P(batch), itm_logits=P(batch),
                 qf_logits=P(batch, None, "tensor"), qf_ids=P(batch), qf_mask=P(batch),
                 lm_logits=P(batch, None, "tensor"), lm_labels=P(batch))
    sharded = {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in args.items()}
    assert len(sharded["lm_logits"].sharding.device_set) == 8
    got = _stage1_losses(**sharded, key=key)
    for name in ("itc", "itm", "itg", "lm"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=name)
    for name in ("image_index", "text_index"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # and the single-device numbers are LAVIS's
    i2t, t2i = np_itc_sims(args["img"], args["txt"], 0.07)
    np.testing.assert_allclose(ref["itc"], np_itc_loss(i2t, t2i, args["ids"]), rtol=1e-5)

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
def lavis_negative_weights(sim, image_ids=None, floor=0.0):
    """BLIP-2 (LAVIS blip2_qformer.py): positives set to -10000, then softmax. With a floor,
    BLIP's (blip_pretrain.py): softmax over all columns + floor, positives zeroed, normalised."""
    b = sim.shape[0]
    pos = np.eye(b, dtype=bool) if image_ids is None else image_ids[:, None] == image_ids[None, :]
    if floor:
        w = np.exp(np_log_softmax(sim)) + floor
        w[pos] = 0
        return w / w.sum(1, keepdims=True)
    return np.exp(np_log_softmax(np.where(pos, -10000.0, sim)))


_sample = jax.jit(jax.vmap(losses.sample_hard_negatives, in_axes=(0, None, None, None, None)),
                  static_argnums=4)


@pytest.mark.parametrize("floor", [0.0, 1e-4])
@pytest.mark.parametrize("with_ids", [False, True])
def test_hard_negative_distribution(with_ids, floor):
    b, n = 5, 20000
    # the positives dominate the softmax, as after some ITC training (where BLIP's floor and
    # BLIP-2's masked softmax part ways)
    sim_i2t = RNG.normal(size=(b, b)) * 2 + np.eye(b) * 14
    sim_t2i = RNG.normal(size=(b, b)) * 2 + np.eye(b) * 14
    ids = np.array([0, 1, 0, 2, 3]) if with_ids else None
    keys = jax.random.split(jax.random.key(1), n)
    neg_img, neg_txt = _sample(keys, jnp.asarray(sim_i2t, jnp.float32),
                               jnp.asarray(sim_t2i, jnp.float32),
                               None if ids is None else jnp.asarray(ids), floor)
    neg_img, neg_txt = np.asarray(neg_img), np.asarray(neg_txt)
    for draws, sim in ((neg_img, sim_t2i), (neg_txt, sim_i2t)):  # text -> image uses sim_t2i
        freq = np.stack([np.bincount(draws[:, r], minlength=b) for r in range(b)]) / n
        expect = lavis_negative_weights(sim, ids, floor)
        if floor == 0.0:  # the default is BLIP-2's
            assert losses.HARD_NEGATIVE_FLOOR == 0.0
            assert np.abs(expect - lavis_negative_weights(sim, ids, 1e-4)).max() > 0.1
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


# ----------------------------------------------------------------------------------------------
# The stage-1 task (tasks.Stage1: which passes feed which loss) against LAVIS's formulation
# ----------------------------------------------------------------------------------------------
def _stage1_model(b: int, t: int, v: int = 40):
    from blip2_jax import config_lib, sharding
    from blip2_jax.miniature import tiny
    from blip2_jax.models import build
    c = tiny.tiny(config_lib.base(task="stage1", preset="pretrain_vitg"), text=None)
    c.model.qformer_lm_head = True
    c.model.num_query_tokens = 4
    c.model.qformer = dict(c.model.qformer, vocab_size=v)
    model, cfg = build.build_model(c.model)
    params = sharding.unbox(jax.jit(model.init)(jax.random.key(0), **build.init_inputs(cfg))["params"])
    # Features far apart (the 0.02 init leaves every text almost the same) and the smallest
    # temperature LAVIS allows: the softmax that draws hard negatives is then one-hot on the
    # hardest one, so the reference can name every ITM pair.
    params["qformer"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 16.0 if getattr(p[-1], "key", "") in ("kernel", "word_embeddings") else x,
        params["qformer"])
    params["qformer"]["temp"] = jnp.asarray(0.001, jnp.float32)
    r = np.random.default_rng(4)  # a draw whose hardest negatives are unambiguous (checked below)
    lengths = r.integers(3, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, r.integers(6, v, size=(b, t)), 0).astype(np.int32)
    ids[:, 0] = 2                                  # [CLS]
    dec = ids.copy()
    dec[:, 0] = 5                                  # [DEC]
    s = cfg.vision.image_size
    batch = {"image": r.normal(size=(b, s, s, 3)).astype(np.float32),
             "image_id": np.arange(b, dtype=np.int32), "qformer_input_ids": ids,
             "qformer_attention_mask": mask, "qformer_dec_input_ids": dec}
    return c, model, params, batch


def _forward(model, params, batch):
    """The Q-Former's passes (tested against transformers in test_qformer.py), as numpy."""
    v = {"params": params}
    ap = lambda fn, *a: np.asarray(model.apply(v, *a, method=fn), np.float64)  # noqa: E731
    image = model.apply(v, batch["image"], method="encode_image")
    img = ap(lambda m, e: m.qformer.image_embeds(m.qformer.query_features(e)), image)
    txt = ap(lambda m, i, a: m.qformer.text_embeds(m.qformer.text_features(i, a)),
             batch["qformer_input_ids"], batch["qformer_attention_mask"])

    def itm(images, texts):
        return ap(lambda m, e, i, a: m.qformer.itm_logits(m.qformer.multimodal_features(e, i, a)),
                  image[images], batch["qformer_input_ids"][texts], batch["qformer_attention_mask"][texts])

    def itg(ids):
        def run(m, e, i, a):
            _, cache = m.qformer.query_features(e, return_cache=True)
            return m.qformer.causal_lm(i, a, cache)
        return ap(run, image, ids, batch["qformer_attention_mask"])
    return img, txt, itm, itg


def _hardest(sim, positives, same):
    """Per row: the highest-similarity non-positive column, and its margin over the best column
    that is not the same input (`same[c, d]`: columns c and d hold the same image or text)."""
    masked = np.where(positives, -np.inf, sim)
    best = np.argmax(masked, axis=1)
    rows = np.arange(len(sim))
    rest = np.where(same[best], -np.inf, masked)
    return best, masked[rows, best] - rest.max(axis=1)


@pytest.mark.parametrize("same_image_positives", [False, True])
def test_stage1_task_matches_lavis(same_image_positives):
    """ITC (query max, both directions, label smoothing 0.1), ITM (hard negatives drawn from
    softmax(similarity) of the right direction with the positives masked out; LAVIS's
    [pos; (neg image, text); (image, neg text)] pairs and labels), ITG ([DEC] first, shifted,
    label smoothing 0.1): each loss of `tasks.Stage1` equals LAVIS's, computed here in numpy
    from the Q-Former's own passes."""
    from blip2_jax import tasks
    b, t = 6, 7
    c, model, params, batch = _stage1_model(b, t)
    if same_image_positives:  # retrieval fine-tuning: rows 0 and 1 show the same image
        c.losses.same_image_positives = True
        batch["image"][1] = batch["image"][0]
        batch["image_id"][1] = batch["image_id"][0]
    task = tasks.get("stage1", model, c)
    total, got = jax.jit(task.loss)(params, {k: jnp.asarray(x) for k, x in batch.items()}, jax.random.key(1))

    img, txt, itm, itg = _forward(model, params, batch)
    ids = batch["image_id"] if same_image_positives else None
    sim_i2t, sim_t2i = np_itc_sims(img, txt, 0.001)
    want_itc = np_itc_loss(sim_i2t, sim_t2i, ids, eps=0.1)

    pos = (batch["image_id"][:, None] == batch["image_id"][None]) if same_image_positives else np.eye(b, dtype=bool)
    same_image = batch["image_id"][:, None] == batch["image_id"][None]
    neg_image, gap_t = _hardest(sim_t2i, pos, same_image)    # for each text: an image
    neg_text, gap_i = _hardest(sim_i2t, pos, np.eye(b, dtype=bool))  # for each image: a text
    # exp(-12) is far below the 1e-4 floor LAVIS adds to every weight: one-hot in effect
    assert gap_t.min() > 12 and gap_i.min() > 12, "the hardest negatives must be unambiguous"
    ar = np.arange(b)
    logits = itm(np.concatenate([ar, neg_image, ar]), np.concatenate([ar, ar, neg_text]))
    want_itm = np_cross_entropy(logits, np.r_[np.ones(b, int), np.zeros(2 * b, int)])
    want_itg = lavis_itg_reference(itg(batch["qformer_dec_input_ids"]), batch["qformer_dec_input_ids"],
                                   batch["qformer_attention_mask"], eps=0.1)

    np.testing.assert_allclose(got["itc_loss"], want_itc, rtol=2e-4)
    np.testing.assert_allclose(got["itm_loss"], want_itm, rtol=2e-4)
    np.testing.assert_allclose(got["itg_loss"], want_itg, rtol=2e-4)
    np.testing.assert_allclose(total, want_itc + want_itm + want_itg, rtol=2e-4)
    # the hard negatives matter: drawing them from the other direction's rows changes the loss
    swapped = itm(np.concatenate([ar, neg_text, ar]), np.concatenate([ar, ar, neg_image]))
    other = np_cross_entropy(swapped, np.r_[np.ones(b, int), np.zeros(2 * b, int)])
    if not np.array_equal(neg_text, neg_image):
        assert abs(other - want_itm) > 1e-3

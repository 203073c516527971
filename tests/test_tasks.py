"""The stage-2 LM task computes logits only where labels are: its loss and gradients equal the
full-vocabulary, every-position loss (logits from `Blip2.lm_logits`, cross-entropy in numpy with
torch's semantics), with a prompt, padding, unlabelled rows and label smoothing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import config_lib, losses, tasks, train_state
from blip2_jax.miniature import tiny
from blip2_jax.models import build

B, T, TD, V = 4, 10, 6, 97


def np_cross_entropy(logits, targets, label_smoothing=0.0):
    """torch.nn.functional.cross_entropy(logits [N, C], targets [N], ignore_index=-100), float64."""
    x = np.asarray(logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = targets != -100
    nll = -logp[keep, targets[keep]]
    smooth = -logp[keep].mean(-1)
    return float(np.mean((1 - label_smoothing) * nll + label_smoothing * smooth)), int(keep.sum())


def _config(text: str, smoothing: float, loss_tokens: int):
    if text == "opt":
        c = tiny.tiny(config_lib.base(task="lm", preset="vitg_opt2.7b"), text="opt")
        c.model.text = dict(c.model.text, vocab_size=V)
    else:
        c = tiny.tiny(config_lib.base(task="lm", preset="vitg_flant5xl"), text=None)
        c.model.no_text = False
        c.model.qformer = dict(c.model.qformer, use_qformer_text_input=False)
        c.model.text = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                            num_heads=4, dropout_rate=0.0)
    c.model.num_query_tokens = 4
    c.losses.lm_label_smoothing = smoothing
    c.losses.lm_loss_tokens = loss_tokens
    return c


@functools.lru_cache(maxsize=None)
def _setup(text: str):
    model, cfg = build.build_model(_config(text, 0.0, 0).model)
    params = jax.jit(model.init)(jax.random.key(0), **build.init_inputs(cfg))["params"]
    return model, params


def _batch(text: str) -> dict:
    r = np.random.default_rng(1)
    lens = np.array([T, 6, 3, 8])  # right padding of different lengths
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    ids = r.integers(3, V, size=(B, T)).astype(np.int32) * mask
    batch = {"image": r.normal(size=(B, 64, 64, 3)).astype(np.float32),
             "llm_input_ids": ids, "llm_attention_mask": mask}
    if text == "opt":
        labels = np.where(mask == 1, ids, -100)
        labels[:, :2] = -100   # BOS + prompt
        labels[0, 0] = ids[0, 0]
        labels[2] = -100       # a row with no target at all
    else:
        dlens = np.array([TD, 2, 4, 1])
        dmask = (np.arange(TD)[None] < dlens[:, None]).astype(np.int32)
        labels = np.where(dmask == 1, r.integers(3, V, size=(B, TD)), -100)
        dec = np.concatenate([np.zeros((B, 1)), np.where(labels == -100, 0, labels)[:, :-1]], 1)
        batch.update(llm_decoder_input_ids=dec.astype(np.int32), llm_decoder_attention_mask=dmask)
    batch["llm_labels"] = labels.astype(np.int32)
    return batch


def _full_logits(model, params, batch, text):
    """The old way: LM head over the whole vocabulary at every position."""
    v = {"params": params}
    prompt = model.apply(v, batch["image"], method="soft_prompt")
    if text == "opt":
        return model.apply(v, prompt, batch["llm_input_ids"], batch["llm_attention_mask"], method="lm_logits")
    return model.apply(v, prompt, batch["llm_input_ids"], batch["llm_attention_mask"],
                       batch["llm_decoder_input_ids"], batch["llm_decoder_attention_mask"], method="lm_logits")


def _full_loss(model, params, batch, text, smoothing):
    logits = _full_logits(model, params, batch, text)
    if text == "opt":  # soft prompt unlabelled, then transformers' shift
        q = logits.shape[1] - batch["llm_labels"].shape[1]
        labels = jnp.concatenate([jnp.full((B, q), -100, jnp.int32), batch["llm_labels"]], 1)
        return losses.token_loss(logits[:, :-1], labels[:, 1:], smoothing)[0]
    return losses.token_loss(logits, batch["llm_labels"], smoothing)[0]


def _np_reference(model, params, batch, text, smoothing, keep_first=None):
    logits = np.asarray(_full_logits(model, params, batch, text), np.float64)
    labels = batch["llm_labels"]
    if text == "opt":
        q = logits.shape[1] - labels.shape[1]
        logits = logits[:, q - 1:-1]  # output q + j - 1 predicts text token j
    labels = np.array(labels)
    if keep_first is not None:  # only each row's first `keep_first` labels count
        labels[np.cumsum(labels != -100, axis=1) > keep_first] = -100
    return np_cross_entropy(logits.reshape(-1, V), labels.reshape(-1), smoothing)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["opt", "t5"])
def test_labelled_positions_loss_equals_full_logits_loss(text):
    model, params = _setup(text)
    batch = jax.tree.map(jnp.asarray, _batch(text))
    rng = jax.random.key(0)
    for smoothing in (0.0, 0.1):
        task = tasks.get("lm", model, _config(text, smoothing, 0))
        loss, metrics = jax.jit(task.loss)(params, batch, rng)
        ref, count = _np_reference(model, params, batch, text, smoothing)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
        assert int(metrics["lm_tokens"]) == count and count > 0

    # gradients w.r.t. the trainable parameters: the same as through the full logits (the
    # scale is the largest gradient: some are zero in exact arithmetic, e.g. the key biases)
    config = _config(text, 0.1, 0)
    task = tasks.get("lm", model, config)
    trainable, frozen = train_state.split_params(params, config.frozen_patterns)
    new = jax.jit(jax.grad(lambda p: task.loss(train_state.merge_params(p, frozen), batch, rng)[0]))(trainable)
    old = jax.jit(jax.grad(lambda p: _full_loss(model, train_state.merge_params(p, frozen), batch, text,
                                                0.1)))(trainable)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(old))
    for (path, g_new), g_old in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old)):
        np.testing.assert_allclose(g_new, g_old, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("text", ["opt", "t5"])
def test_first_k_labelled_positions(text):
    """K covering the longest target changes nothing; a smaller K counts each row's first K
    labels and reports how many were left out."""
    model, params = _setup(text)
    batch = jax.tree.map(jnp.asarray, _batch(text))
    labels = np.asarray(batch["llm_labels"])
    most = int((labels != -100).sum(1).max())
    full, _ = _np_reference(model, params, batch, text, 0.1)
    for k in (most, 2):
        task = tasks.get("lm", model, _config(text, 0.1, k))
        loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(0))
        ref, count = _np_reference(model, params, batch, text, 0.1, keep_first=k)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
        assert int(metrics["lm_tokens"]) == count
        assert int(metrics["lm_tokens_left_out"]) == int((labels != -100).sum()) - count
        if k == most:
            np.testing.assert_allclose(float(loss), full, rtol=1e-5)
            assert int(metrics["lm_tokens_left_out"]) == 0


def test_labelled_positions_order_and_fill():
    targets = jnp.array([[-100, 5, -100, 7, 8], [-100, -100, -100, -100, 4], [-100] * 5])
    pos, got = losses.labelled_positions(targets, 3)
    np.testing.assert_array_equal(pos[0], [1, 3, 4])
    np.testing.assert_array_equal(got, [[5, 7, 8], [4, -100, -100], [-100, -100, -100]])


def test_next_token_alignment():
    hidden = jnp.arange(2 * 7).reshape(2, 7)  # 3 prompt positions + 4 text positions
    labels = jnp.arange(8).reshape(2, 4)
    h, t = losses.next_token_alignment(hidden, labels)
    np.testing.assert_array_equal(h, [[2, 3, 4, 5], [9, 10, 11, 12]])
    np.testing.assert_array_equal(t, labels)
    h, t = losses.next_token_alignment(hidden[:, 3:], labels)  # no prefix: transformers' shift
    np.testing.assert_array_equal(h, hidden[:, 3:6])
    np.testing.assert_array_equal(t, labels[:, 1:])


@pytest.mark.parametrize("text", ["opt", pytest.param("t5", marks=pytest.mark.slow)])
def test_uint8_images_are_normalised_on_device(text):
    """`input.image_dtype="uint8"`: raw 0-255 pixels in the batch give the loss of the same
    pixels CLIP-normalised on the host (transforms.normalize, the float32 pipeline's)."""
    from PIL import Image

    from blip2_jax.data import transforms
    model, params = _setup(text)
    raw = np.random.default_rng(2).integers(0, 256, size=(B, 64, 64, 3), dtype=np.uint8)
    host = np.stack([transforms.normalize(Image.fromarray(x)) for x in raw])
    c = _config(text, 0.0, 0)
    c.input.image_dtype = "uint8"
    as_uint8 = tasks.get("lm", model, c).loss(params, dict(_batch(text), image=raw), jax.random.key(0))[0]
    c.input.image_dtype = "float32"
    as_float = tasks.get("lm", model, c).loss(params, dict(_batch(text), image=host), jax.random.key(0))[0]
    np.testing.assert_allclose(float(as_uint8), float(as_float), rtol=1e-5)
    # ... and not the loss of the unnormalised pixels: the difference is many times the
    # tolerance of the equality above (the tiny random LM barely reads its soft prompt, so the
    # difference itself is small)
    unnormalised = float(tasks.get("lm", model, c).loss(
        params, dict(_batch(text), image=raw.astype(np.float32)), jax.random.key(0))[0])
    assert abs(float(as_uint8) - unnormalised) > 10 * 1e-5 * abs(float(as_float))

"""Optimizer: schedule values, weight-decay mask, layer-wise LR decay (scanned and unrolled),
gradient accumulation == large batch. Expected numbers are worked out by hand in each test."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blip2_jax import optim
from blip2_jax.train_state import split_params


def cfg(**overrides):
    c = optim.default_config()
    for k, v in overrides.items():
        c[k] = v
    return c


def zeros(*shape):
    return jnp.zeros(shape, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def test_warmup_cosine_values():
    # float32 schedule arithmetic on values of size peak_lr: absolute tolerance 1e-6 * peak_lr
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9)
    s = optim.make_schedule(cfg(init_lr=1e-5, peak_lr=1e-3, min_lr=1e-4, warmup_steps=10,
                                total_steps=110))
    close(s(0), 1e-5)  # start of warmup
    close(s(5), (1e-5 + 1e-3) / 2)  # linear
    close(s(10), 1e-3)  # end of warmup: peak
    close(s(60), 1e-4 + (1e-3 - 1e-4) * 0.5)  # cosine half-way
    close(s(35), 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi / 4)))
    close(s(110), 1e-4)  # the end: min_lr
    close(s(500), 1e-4)


def test_warmup_constant_and_errors():
    s = optim.make_schedule(cfg(init_lr=0.0, peak_lr=2e-5, warmup_steps=4, schedule="warmup_constant"))
    np.testing.assert_allclose([s(0), s(2), s(4), s(10_000)], [0.0, 1e-5, 2e-5, 2e-5], rtol=1e-6,
                               atol=2e-11)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(cfg(schedule="cosine_restarts"))
    with pytest.raises(ValueError, match="unknown optim config fields"):
        optim.make_schedule(ml_collections.ConfigDict(dict(peak_lr=1e-4, lr_typo=1.0)))


def test_accepts_whole_config():
    whole = ml_collections.ConfigDict(dict(optim=dict(peak_lr=3e-4, warmup_steps=0, total_steps=10)))
    np.testing.assert_allclose(optim.make_schedule(whole)(0), 3e-4, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Weight decay mask
# ----------------------------------------------------------------------------------------------
L = 3
TREE = {
    "qformer": {
        "embeddings": {"word_embeddings": {"embedding": zeros(10, 4)},
                       "layer_norm": {"scale": zeros(4), "bias": zeros(4)}},
        "layers": {"attention": {"query": {"kernel": zeros(L, 4, 4), "bias": zeros(L, 4)},
                                 "q_bias": zeros(L, 4)},  # 1-D per layer, stacked on axis 0
                   "output_layer_norm": {"scale": zeros(L, 4), "bias": zeros(L, 4)}},
    },
    "query_tokens": zeros(1, 5, 4),
    "temp": zeros(),
    "vision_proj": {"kernel": zeros(4, 2), "bias": zeros(2)},
    "vision_model": {"post_layernorm": {"scale": zeros(4), "bias": zeros(4)}},
}
DECAYED = {"qformer/embeddings/word_embeddings/embedding", "qformer/layers/attention/query/kernel",
           "query_tokens", "vision_proj/kernel"}


def _flat(tree):
    return {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_mask():
    mask = _flat(optim.weight_decay_mask(TREE))
    assert {k for k, v in mask.items() if v} == DECAYED


def test_weight_decay_really_applies_only_to_mask():
    # zero gradients: Adam's step is 0, so the update is exactly -lr * wd * p on decayed leaves
    lr, wd = 1e-2, 0.5
    params = jax.tree.map(lambda x: jnp.full(x.shape, 2.0), TREE)
    tx = optim.make_optimizer(cfg(init_lr=lr, peak_lr=lr, warmup_steps=0, total_steps=10,
                                  min_lr=lr, weight_decay=wd), params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, u in _flat(updates).items():
        expect = -lr * wd * 2.0 if path in DECAYED else 0.0
        np.testing.assert_allclose(u, np.full(u.shape, expect), rtol=1e-6, err_msg=path)


# ----------------------------------------------------------------------------------------------
# Layer-wise LR decay
# ----------------------------------------------------------------------------------------------
def vit_tree(scanned: bool):
    block = {"fc1": {"kernel": zeros(2, 3), "bias": zeros(3)}, "layer_norm1": {"scale": zeros(2)}}
    vit = {"embeddings": {"patch_embedding": {"kernel": zeros(1, 1, 3, 2)},
                          "class_embedding": zeros(2)},
           "extra": {"kernel": zeros(2, 2)},  # a tower param outside blocks and embeddings
           "post_layernorm": {"scale": zeros(2)}}
    if scanned:
        vit["layers"] = jax.tree.map(lambda x: jnp.zeros((L,) + x.shape), block)
    else:
        vit.update({f"layers_{i}": block for i in range(L)})
    return {"vision_model": vit, "qformer": {"kernel": zeros(2, 2)},
            "language_model": {"kernel": zeros(2, 2)}}


@pytest.mark.parametrize("scanned", [True, False])
def test_layerwise_lr_decay_scales_updates(scanned):
    d, lr, wd = 0.5, 1e-3, 0.1
    params, _ = split_params(jax.tree.map(lambda x: jnp.full(x.shape, 1.0), vit_tree(scanned)),
                             [r"^language_model/"])  # fine-tuning: the ViT is trainable
    tx = optim.make_optimizer(cfg(init_lr=lr, peak_lr=lr, min_lr=lr, warmup_steps=0, total_steps=10,
                                  weight_decay=wd, layerwise_lr_decay=d), params)
    # unit gradients: Adam's first step is g / (|g| + eps) = 1 (to 1e-8) on every element
    grads = jax.tree.map(jnp.ones_like, params)
    updates = _flat(jax.jit(tx.update)(grads, tx.init(params), params)[0])
    decayed = _flat(optim.weight_decay_mask(params))

    def expect(path, scale):  # the layer scale multiplies both the Adam step and the decay term
        return -lr * scale * (1.0 + (wd * 1.0 if decayed[path] else 0.0))

    # LAVIS ids with L blocks: embeddings 0 -> d**(L+1), block i -> d**(L-i), others L -> d**1
    for path, u in updates.items():
        u = np.asarray(u)
        if path.startswith("vision_model/layers/"):
            for i in range(L):
                np.testing.assert_allclose(u[i], expect(path, d ** (L - i)), rtol=1e-6, err_msg=path)
            continue
        if path.startswith("vision_model/layers_"):
            scale = d ** (L - int(path.split("/")[1].split("_")[1]))
        elif path.startswith("vision_model/embeddings/"):
            scale = d ** (L + 1)
        elif path.startswith("vision_model/extra/"):
            scale = d
        else:  # post_layernorm (ln_vision, outside the ViT in LAVIS), qformer
            scale = 1.0
        np.testing.assert_allclose(u, np.full(u.shape, expect(path, scale)), rtol=1e-6, err_msg=path)
    # the ratio between consecutive blocks is d, the last block gets d**1
    first = "vision_model/layers/fc1/kernel" if scanned else "vision_model/layers_0/fc1/kernel"
    last = "vision_model/layers/fc1/kernel" if scanned else f"vision_model/layers_{L - 1}/fc1/kernel"
    u0 = np.asarray(updates[first])[0] if scanned else np.asarray(updates[first])
    u_last = np.asarray(updates[last])[L - 1] if scanned else np.asarray(updates[last])
    np.testing.assert_allclose(u0 / u_last, d ** (L - 1), rtol=1e-6)


def test_layerwise_scales_shapes_for_scanned_leaves():
    scales = optim.layerwise_lr_scales(vit_tree(True), 0.9, r"^vision_model/",
                                       r"^vision_model/post_layernorm", r"(^|/)embeddings(/|$)")
    s = scales["vision_model"]["layers"]["fc1"]["kernel"]
    assert s.shape == (L, 1, 1)
    np.testing.assert_allclose(s[:, 0, 0], [0.9 ** 3, 0.9 ** 2, 0.9], rtol=1e-6)
    assert scales["vision_model"]["layers"]["fc1"]["bias"].shape == (L, 1)
    assert scales["qformer"]["kernel"] == 1.0


# ----------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------
def test_trainer_accumulation_equals_large_batch():
    """`config.grad_accum_steps = 4` (main.make_train_step: mean of 4 micro-batch gradients,
    one update) takes the same optimizer steps as the whole batch at once."""
    from blip2_jax import main, train_state
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                        "bias": jnp.zeros(2)}}

    class Task:  # mean squared error; the metrics are averaged like the loss
        def loss(self, p, batch, r):
            err = jnp.mean((batch["x"] @ p["dense"]["kernel"] + p["dense"]["bias"] - batch["y"]) ** 2)
            return err, {"err": err}

    c = cfg(init_lr=1e-3, peak_lr=1e-2, warmup_steps=2, total_steps=6, min_lr=1e-3,
            weight_decay=0.1, grad_clip_norm=0.5)  # clipping active: grads norm > 0.5
    tx, schedule = optim.make_optimizer(c, params), optim.make_schedule(c)
    big = jax.jit(main.make_train_step(Task(), schedule, 1))
    acc = jax.jit(main.make_train_step(Task(), schedule, 4))
    s_big = s_acc = train_state.TrainState.create(params, tx)
    for _ in range(3):  # three optimizer steps, so the schedule counts must line up too
        s_big, m_big = big(s_big, {}, {"x": x, "y": y}, jax.random.key(0))
        s_acc, m_acc = acc(s_acc, {}, {"x": x, "y": y}, jax.random.key(0))
        assert m_big["grad_norm"] > 0.5
        np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     s_acc.params, s_big.params)
    assert int(s_acc.step) == int(s_big.step) == 3

def optax_global_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))


def test_sharded_update_equals_single_device():
    from jax.sharding import NamedSharding, PartitionSpec as P
    from blip2_jax.sharding import make_mesh

    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                          vit_tree(True))
    params["vision_model"]["layers"]["fc1"]["kernel"] = jnp.asarray(rng.normal(size=(L, 8, 4)),
                                                                    jnp.float32)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    tx = optim.make_optimizer(cfg(warmup_steps=1, total_steps=10, layerwise_lr_decay=0.8,
                                  grad_clip_norm=1.0), params)

    @jax.jit
    def two_steps(p, g):
        s = tx.init(p)
        for _ in range(2):
            u, s = tx.update(g, s, p)
            p = jax.tree.map(lambda a, b: a + b, p, u)
        return p

    ref = two_steps(jax.device_put(params, jax.devices()[0]), grads)
    mesh = make_mesh((1, 4, 2))
    stacked = NamedSharding(mesh, P(None, "fsdp", "tensor"))  # [L, 8, 4]: in over fsdp, out over tensor
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
    sharded["vision_model"]["layers"]["fc1"]["kernel"] = jax.device_put(
        params["vision_model"]["layers"]["fc1"]["kernel"], stacked)
    got = two_steps(sharded, grads)
    assert got["vision_model"]["layers"]["fc1"]["kernel"].sharding.is_equivalent_to(stacked, 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), got, ref)

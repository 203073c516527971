"""Trainable/frozen split, optimizer state only for the trainable tree, no gradients into frozen
params, and half-precision frozen weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import optim
from blip2_jax.train_state import (DEFAULT_FROZEN_PATTERNS, TrainState, cast_frozen, merge_params,
                                   split_params, tree_bytes)

L = 2


def blip2_like_tree():
    rng = np.random.default_rng(0)

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "vision_model": {
            "embeddings": {"patch_embedding": {"kernel": w(2, 2, 3, 4), "bias": w(4)}},
            "layers": {"fc1": {"kernel": w(L, 4, 4), "bias": w(L, 4)},
                       "layer_norm1": {"scale": w(L, 4), "bias": w(L, 4)}},
            "post_layernorm": {"scale": w(4), "bias": w(4)},
        },
        "qformer": {"layers_0": {"dense": {"kernel": w(4, 4), "bias": w(4)}},
                    "layers_1": {"dense": {"kernel": w(4, 4), "bias": w(4)}}},
        "query_tokens": w(1, 3, 4),
        "language_projection": {"kernel": w(4, 6), "bias": w(6)},
        "language_model": {"embed_tokens": {"embedding": w(9, 6)},
                           "final_layer_norm": {"scale": w(6)},
                           "step_count": jnp.arange(3, dtype=jnp.int32)},
    }


def paths(tree):
    return {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------------------------
# split / merge
# ----------------------------------------------------------------------------------------------
def test_split_default_patterns():
    params = blip2_like_tree()
    trainable, frozen = split_params(params, DEFAULT_FROZEN_PATTERNS)
    assert paths(frozen) == {
        "vision_model/embeddings/patch_embedding/kernel", "vision_model/embeddings/patch_embedding/bias",
        "vision_model/layers/fc1/kernel", "vision_model/layers/fc1/bias",
        "vision_model/layers/layer_norm1/scale", "vision_model/layers/layer_norm1/bias",
        "language_model/embed_tokens/embedding", "language_model/final_layer_norm/scale",
        "language_model/step_count"}
    assert paths(trainable) == paths(params) - paths(frozen)
    assert "post_layernorm" in trainable["vision_model"]  # ln_vision is trained


def test_merge_is_exact_inverse():
    params = blip2_like_tree()
    for patterns in (DEFAULT_FROZEN_PATTERNS, [r"^language_model/"], [], [r"."]):
        trainable, frozen = split_params(params, patterns)
        merged = merge_params(trainable, frozen)
        assert jax.tree.structure(merged) == jax.tree.structure(params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), merged, params)
        for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
            assert a is b  # no copies
    with pytest.raises(ValueError, match="both trainable and frozen"):
        merge_params(params, {"query_tokens": params["query_tokens"]})


# ----------------------------------------------------------------------------------------------
# optimizer state exists for the trainable tree only
# ----------------------------------------------------------------------------------------------
def _tx(trainable, **overrides):
    c = optim.default_config()
    c.warmup_steps, c.total_steps = 1, 10
    for k, v in overrides.items():
        c[k] = v
    return optim.make_optimizer(c, trainable)


def test_optimizer_state_bytes():
    copies = 2  # Adam mu + nu (gradient accumulation happens inside the step: no accumulator)
    trainable, frozen = split_params(blip2_like_tree(), DEFAULT_FROZEN_PATTERNS)
    state = TrainState.create(trainable, _tx(trainable, layerwise_lr_decay=0.9, grad_clip_norm=1.0))
    extra = tree_bytes(state.opt_state) - copies * tree_bytes(trainable)
    assert 0 <= extra <= 64, extra  # only step counters (int32 scalars) besides the moments
    # every array of the optimizer state is shaped like a trainable leaf, none like a frozen one
    big = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(big) == copies * len(jax.tree.leaves(trainable))
    assert tree_bytes(frozen) > 0 and tree_bytes(trainable) > 0


def test_tree_bytes():
    tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros(5, jnp.bfloat16),
            "c": jax.ShapeDtypeStruct((2, 2), jnp.int8)}
    assert tree_bytes(tree) == 48 + 10 + 4


# ----------------------------------------------------------------------------------------------
# gradients only for trainable params
# ----------------------------------------------------------------------------------------------
def _loss(trainable, frozen, x):
    p = merge_params(trainable, frozen)
    h = x @ p["vision_model"]["layers"]["fc1"]["kernel"][0] * p["vision_model"]["post_layernorm"]["scale"]
    h = h @ p["qformer"]["layers_0"]["dense"]["kernel"] @ p["language_projection"]["kernel"]
    return jnp.sum((h @ p["language_model"]["embed_tokens"]["embedding"].T) ** 2)


@jax.jit
def _grads(trainable, frozen, x):
    return jax.grad(_loss)(trainable, frozen, x)


def _train_step(state, frozen, x):
    grads = jax.grad(_loss)(state.params, frozen, x)
    return state.apply_gradients(grads), grads


_train_step_jit = jax.jit(_train_step, donate_argnums=0)


def test_gradients_never_reach_frozen():
    trainable, frozen = split_params(blip2_like_tree(), DEFAULT_FROZEN_PATTERNS)
    frozen_before = jax.tree.map(np.array, frozen)
    x = jnp.ones((2, 4))
    grads = _grads(trainable, frozen, x)
    assert paths(grads) == paths(trainable)  # no gradient leaves for frozen params at all
    assert float(jnp.abs(grads["qformer"]["layers_0"]["dense"]["kernel"]).sum()) > 0

    state = TrainState.create(trainable, _tx(trainable))
    trainable_before = jax.tree.map(np.array, trainable)
    for _ in range(2):  # the documented step: jit, state donated, frozen passed and reused
        state, _ = _train_step_jit(state, frozen, x)
    assert int(state.step) == 2
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        assert not a.is_deleted()
        np.testing.assert_array_equal(a, b)
    new_kernel = state.params["qformer"]["layers_0"]["dense"]["kernel"]
    assert not np.array_equal(new_kernel, trainable_before["qformer"]["layers_0"]["dense"]["kernel"])
    # the merged tree after an update: trainable parts new, frozen parts the very same arrays
    merged = merge_params(state.params, frozen)
    assert merged["language_model"]["embed_tokens"]["embedding"] is frozen["language_model"]["embed_tokens"]["embedding"]


# ----------------------------------------------------------------------------------------------
# half-precision frozen weights
# ----------------------------------------------------------------------------------------------
def test_cast_frozen_keeps_norms_float32():
    _, frozen = split_params(blip2_like_tree(), DEFAULT_FROZEN_PATTERNS)
    cast = cast_frozen(frozen)
    dtypes = {p: str(x.dtype) for p, x in zip(sorted(paths(cast)), [
        v for _, v in sorted(((("/".join(str(k.key) for k in p)), x)
                              for p, x in jax.tree_util.tree_flatten_with_path(cast)[0]))])}
    assert dtypes == {
        "language_model/embed_tokens/embedding": "bfloat16",
        "language_model/final_layer_norm/scale": "float32",
        "language_model/step_count": "int32",
        "vision_model/embeddings/patch_embedding/bias": "bfloat16",
        "vision_model/embeddings/patch_embedding/kernel": "bfloat16",
        "vision_model/layers/fc1/bias": "bfloat16",
        "vision_model/layers/fc1/kernel": "bfloat16",
        "vision_model/layers/layer_norm1/bias": "float32",
        "vision_model/layers/layer_norm1/scale": "float32",
    }
    assert tree_bytes(cast_frozen(frozen, keep_float32=None)) < tree_bytes(cast) < tree_bytes(frozen)

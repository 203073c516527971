"""Trainable state (optimised, donated) versus frozen params (never differentiated, never donated).

BLIP-2 freezes the image encoder and the LLM; only the Q-Former side is trained. The params tree
is split by regexes on '/'-joined paths, so a fine-tuning config unfreezes the ViT by changing
patterns, not code. The optimizer only ever sees the trainable tree, so frozen weights carry no
optimizer state and get no gradients.

How the trainer's step is meant to look:

    def train_step(state, frozen, batch, rng):
        def loss_fn(trainable):
            params = merge_params(trainable, frozen)
            out = model.apply({"params": params}, batch, rngs={"dropout": rng})
            return out.loss, out.metrics
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads), metrics

    train_step = jax.jit(train_step, donate_argnums=0)

Gradients are taken w.r.t. `state.params` only; `frozen` is an argument (not a closure, which
would embed the weights as constants) and is not donated because it is reused every step.
Gradient accumulation (`config.grad_accum_steps = k`) happens inside the step (`main.make_train_step`:
a scan over k micro-batches, one optimizer update), so `state.step` always counts updates.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import traverse_util

# The one table of what is frozen lives in frozen.py (re-exported here for the trainer).
from blip2_jax import quant
from blip2_jax.frozen import FROZEN_TOWERS, NORM_PATTERN, TRAINED_IN_TOWERS, frozen_patterns  # noqa: F401


def trained_in_towers_pattern() -> str:
    """Regex of the `TRAINED_IN_TOWERS` parameters ('/'-joined paths)."""
    return "^(" + "|".join(map(re.escape, TRAINED_IN_TOWERS)) + ")(/|$)"


# Stages 1 and 2: the ViT (but not ln_vision) and the LLM.
DEFAULT_FROZEN_PATTERNS = tuple(frozen_patterns())


# ----------------------------------------------------------------------------------------------
# Splitting the params tree
# ----------------------------------------------------------------------------------------------
def _flatten(tree: Mapping) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(tree, keep_empty_nodes=True)


def split_params(params: Mapping, frozen_patterns: Sequence[str] = DEFAULT_FROZEN_PATTERNS
                 ) -> tuple[dict, dict]:
    """Nested dict -> (trainable, frozen) nested dicts holding disjoint subsets of the leaves.

    A leaf is frozen when any pattern `re.search`es its '/'-joined path (e.g.
    "vision_model/layers/fc1/kernel"). Empty subtrees stay with the trainable part."""
    regexes = [re.compile(p) for p in frozen_patterns]
    trainable, frozen = {}, {}
    for path, leaf in _flatten(params).items():
        name = "/".join(map(str, path))
        is_frozen = leaf is not traverse_util.empty_node and any(r.search(name) for r in regexes)
        (frozen if is_frozen else trainable)[path] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
    """Exact inverse of `split_params`; raises if a path is in both."""
    flat_t, flat_f = _flatten(trainable), _flatten(frozen)
    overlap = sorted("/".join(map(str, p)) for p in set(flat_t) & set(flat_f)
                     if flat_t[p] is not traverse_util.empty_node)
    if overlap:
        raise ValueError(f"params both trainable and frozen: {overlap[:5]}")
    return traverse_util.unflatten_dict({**flat_f, **flat_t})


def cast_frozen(frozen: Mapping, dtype=jnp.bfloat16, keep_float32: str | None = NORM_PATTERN
                ) -> dict:
    """Frozen weights in half precision (the paper keeps the frozen ViT/LLM in fp16/bf16).

    Floating leaves whose path matches `keep_float32` (norm scales/biases by default: tiny, and
    LAVIS's fp16 conversion of the ViT also leaves its LayerNorms in float32) stay float32;
    integer leaves are untouched. Works on arrays (sharding kept) and under jit."""
    keep = re.compile(keep_float32) if keep_float32 else None
    out = {}
    for path, leaf in _flatten(frozen).items():
        if isinstance(leaf, qwix.QArray):  # quantized kernels keep their int8 values and float32 scales
            pass
        elif leaf is not traverse_util.empty_node and jnp.issubdtype(leaf.dtype, jnp.floating):
            if not (keep and keep.search("/".join(map(str, path)))) and leaf.dtype != jnp.dtype(dtype):
                leaf = leaf.astype(dtype)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def final_dtypes(abstract: Mapping, config) -> dict:
    """`abstract` (ShapeDtypeStructs) with each frozen leaf in the dtype `split_and_cast` gives
    it (`cast_frozen`, traced): what the initialiser places directly, so a frozen tower never
    exists in float32."""
    trainable, frozen = split_params(abstract, list(config.frozen_patterns))
    frozen = jax.eval_shape(lambda f: cast_frozen(f, config.model.frozen_param_dtype), frozen)
    return merge_params(trainable, frozen)


def split_and_cast(params: Mapping, config) -> tuple[dict, dict]:
    """The trainer's set-up of a freshly initialised tree: (trainable, frozen) by
    `config.frozen_patterns`, the frozen part cast to `config.model.frozen_param_dtype` and its
    kernels quantized by `config.model.quantize_frozen` ("int8": `blip2_jax/quant.py`; the
    frozen tree then holds int8 values and float32 scales, never differentiated)."""
    trainable, frozen = split_params(params, list(config.frozen_patterns))
    frozen = cast_frozen(frozen, config.model.frozen_param_dtype)
    return trainable, quant.quantize_params(frozen, config.model.get("quantize_frozen", "none"))


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves (arrays or ShapeDtypeStructs)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        else:
            total += np.asarray(leaf).nbytes
    return total


# ----------------------------------------------------------------------------------------------
# The trained state
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    """step (int32 scalar), params (the trainable tree only), opt_state (for those params).

    `tx` is static (part of the tree structure, not a leaf), so the state can be donated and
    checkpointed as a plain pytree."""
    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, trainable, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                   tx=tx)

    def apply_gradients(self, grads) -> "TrainState":
        """One optimizer call with grads shaped like `params` (w.r.t. the trainable tree)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)

"""The optimizer and learning-rate schedule, chosen by name from the `config.optim` section.

Paper (§4, appendix): AdamW, betas (0.9, 0.98), weight decay 0.05, linear warmup (2k steps) to a
peak LR of 1e-4 then cosine decay (stage-2 minimum 5e-5); fine-tuning uses layer-wise LR decay
0.95 on the unfrozen ViT. Everything here is step-based (LAVIS decays per epoch).

`config.optim` fields (defaults in `default_config()`):
  name                  "adamw" (the only one)
  peak_lr               LR at the end of warmup (1e-4)
  init_lr               LR at step 0, warmup starts here (LAVIS `warmup_lr` 1e-6)
  min_lr                LR at `total_steps` (LAVIS stage 1: 1e-5; paper stage 2: 5e-5)
  schedule              "warmup_cosine" (linear warmup, cosine to min_lr at total_steps) or
                        "warmup_constant" (linear warmup, then peak_lr)
  warmup_steps          2000
  total_steps           optimizer steps of the run (stage 1: 250k, stage 2: 80k)
  b1, b2, eps           0.9, 0.98, 1e-8 (torch AdamW placement: lr * m / (sqrt(v) + eps))
  weight_decay          0.05, decoupled (lr * wd * p), masked by `weight_decay_mask`
  grad_clip_norm        global-norm clipping of the (accumulated) gradient; 0 = off
  layerwise_lr_decay    1.0 = off; e.g. 0.95: per-layer LR scales of the tower below
  layerwise_lr_decay_prefix      regex selecting the tower's params ("^vision_model/")
  layerwise_lr_decay_exclude     regex of params inside the prefix that keep scale 1
                        (post_layernorm is BLIP-2's ln_vision, outside the ViT in LAVIS)
  layerwise_lr_decay_embeddings  regex of the tower's embedding params (layer id 0)

Paths are the '/'-joined keys of the trainable params tree, e.g. "vision_model/layers/fc1/kernel".
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from blip2_jax import train_state

# names of parameters never decayed (besides everything with < 2 dims per layer)
NO_DECAY_LEAVES = ("bias",)
STACKED_AXIS_NAME = "layers"  # scanned stacks keep their layers on axis 0 under this key
_UNROLLED_LAYER = re.compile(r"^layers_(\d+)$")


def default_config() -> ml_collections.ConfigDict:
    """The paper's stage-1 recipe; configs override fields of this."""
    return ml_collections.ConfigDict(dict(
        name="adamw",
        peak_lr=1e-4,
        init_lr=1e-6,
        min_lr=1e-5,
        schedule="warmup_cosine",
        warmup_steps=2000,
        total_steps=250_000,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        weight_decay=0.05,
        grad_clip_norm=0.0,
        layerwise_lr_decay=1.0,
        layerwise_lr_decay_prefix=r"^vision_model/",
        layerwise_lr_decay_exclude=train_state.trained_in_towers_pattern(),
        layerwise_lr_decay_embeddings=r"(^|/)(embeddings|pre_layernorm)(/|$)",
    ))


def _resolve(config) -> ml_collections.ConfigDict:
    """Accept the whole config (uses `.optim`) or the section; fill defaults, reject unknown keys."""
    if "optim" in config:
        config = config.optim
    merged = default_config()
    unknown = sorted(set(config.keys()) - set(merged.keys()))
    if unknown:
        raise ValueError(f"unknown optim config fields {unknown} (known: {sorted(merged.keys())})")
    for k in config.keys():
        merged[k] = config[k]
    return merged


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _paths_and_leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(_key_name(k) for k in path) for path, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def make_schedule(config) -> optax.Schedule:
    """step (optimizer updates, not micro-batches) -> learning rate."""
    c = _resolve(config)
    if c.schedule == "warmup_cosine":
        if c.total_steps <= c.warmup_steps:
            raise ValueError(f"total_steps {c.total_steps} must exceed warmup_steps {c.warmup_steps}")
        return optax.warmup_cosine_decay_schedule(
            init_value=c.init_lr, peak_value=c.peak_lr, warmup_steps=c.warmup_steps,
            decay_steps=c.total_steps, end_value=c.min_lr)  # decay_steps counts the warmup too
    if c.schedule == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(c.init_lr, c.peak_lr, c.warmup_steps),
             optax.constant_schedule(c.peak_lr)], [c.warmup_steps])
    raise ValueError(f"unknown schedule {c.schedule!r} (warmup_cosine, warmup_constant)")


# ----------------------------------------------------------------------------------------------
# Weight-decay mask
# ----------------------------------------------------------------------------------------------
def _stacked_axes(path: str) -> int:
    return path.split("/").count(STACKED_AXIS_NAME)


def weight_decay_mask(params) -> Any:
    """Tree of bools (True = decayed) like `params` (arrays or ShapeDtypeStructs).

    LAVIS's rule: no decay for 1-D params and biases (LayerNorm scales/biases, linear biases);
    every matrix is decayed, including the 3-D query_tokens (1, 32, 768) and embedding tables.
    Dims are counted per layer (a scanned stack's leading "layers" axis does not count), and norm
    params are also caught by name since a stacked norm scale is 2-D. Scalars (the ITC temp) are
    not decayed: LAVIS's `len(shape) == 1` test happens to decay the 0-d temp, its base
    model's `ndim < 2` does not; we take the latter."""
    paths, leaves, treedef = _paths_and_leaves(params)
    norm = re.compile(train_state.NORM_PATTERN)
    mask = []
    for path, leaf in zip(paths, leaves):
        per_layer_ndim = len(leaf.shape) - _stacked_axes(path)
        exempt = path.split("/")[-1] in NO_DECAY_LEAVES or norm.search(path) is not None
        mask.append(per_layer_ndim >= 2 and not exempt)
    return jax.tree_util.tree_unflatten(treedef, mask)


# ----------------------------------------------------------------------------------------------
# Layer-wise LR decay
# ----------------------------------------------------------------------------------------------
def layerwise_lr_scales(params, decay: float, prefix: str, exclude: str, embeddings: str) -> Any:
    """Per-leaf LR multipliers, LAVIS/BEiT's `get_num_layer` convention.

    With L blocks in the tower selected by `prefix`: embeddings get decay**(L + 1), block i
    (0-based) decay**(L - i), the tower's other params decay**1, everything else (and `exclude`)
    1. Leaves of a scanned stack (key "layers", block index on axis 0) get an array of shape
    [L, 1, ..., 1] that broadcasts along axis 0; unrolled blocks are keys "layers_{i}".
    L is read from the tree. Returns a tree of floats / numpy arrays like `params`."""
    paths, leaves, treedef = _paths_and_leaves(params)
    pre, exc, emb = re.compile(prefix), re.compile(exclude), re.compile(embeddings)
    in_tower = [bool(pre.search(p)) and not exc.search(p) for p in paths]

    def block_key(path):  # the first "layers" / "layers_{i}" key
        for k in path.split("/"):
            if k == STACKED_AXIS_NAME or _UNROLLED_LAYER.match(k):
                return k
        return None

    counts = set()
    for path, leaf, tower in zip(paths, leaves, in_tower):
        key = tower and block_key(path)
        if key == STACKED_AXIS_NAME:
            counts.add(int(leaf.shape[0]))
        elif key:
            counts.add(int(_UNROLLED_LAYER.match(key).group(1)) + 1)
    stacked = any(tower and block_key(p) == STACKED_AXIS_NAME for p, tower in zip(paths, in_tower))
    if stacked and len(counts) > 1:
        raise ValueError(f"layer-wise LR decay: stacked layers of different lengths {sorted(counts)}")
    num_layers = max(counts, default=0)

    scales = []
    for path, leaf, tower in zip(paths, leaves, in_tower):
        key = tower and block_key(path)
        if not tower:
            scales.append(1.0)
        elif key == STACKED_AXIS_NAME:
            per_layer = decay ** (num_layers - np.arange(leaf.shape[0], dtype=np.float64))
            scales.append(per_layer.astype(np.float32).reshape((-1,) + (1,) * (len(leaf.shape) - 1)))
        elif key:
            scales.append(float(decay ** (num_layers - int(_UNROLLED_LAYER.match(key).group(1)))))
        elif emb.search(path):
            scales.append(float(decay ** (num_layers + 1)))
        else:
            scales.append(float(decay))
    return jax.tree_util.tree_unflatten(treedef, scales)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiply each update by its (broadcastable) scale; stateless."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
def make_optimizer(config, trainable_params) -> optax.GradientTransformation:
    """AdamW (+ clipping, weight-decay mask, layer-wise LR decay, accumulation) for the trainable
    tree only. `config` is the `optim` section (or a config holding one); `trainable_params` may be
    arrays or ShapeDtypeStructs (only paths and shapes are read). Frozen params are never given to
    the optimizer, so they carry no optimizer state.

    Order per update: clip(g) -> adam -> + wd * p (masked) -> x layer scale -> x -lr(step).
    The layer scale multiplies the decay term too, like a torch param group's lr.
    """
    c = _resolve(config)
    if c.name != "adamw":
        raise ValueError(f"unknown optimizer {c.name!r} (adamw)")
    parts = []
    if c.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
    parts.append(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps))
    if c.weight_decay:
        parts.append(optax.add_decayed_weights(c.weight_decay, mask=weight_decay_mask))
    if c.layerwise_lr_decay != 1.0:
        parts.append(scale_by_tree(layerwise_lr_scales(
            trainable_params, c.layerwise_lr_decay, c.layerwise_lr_decay_prefix,
            c.layerwise_lr_decay_exclude, c.layerwise_lr_decay_embeddings)))
    parts.append(optax.scale_by_learning_rate(make_schedule(c)))
    return optax.chain(*parts)

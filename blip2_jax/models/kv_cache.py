"""The preallocated key/value cache of the frozen language models, and the masks that go with it.

A cache holds every layer's keys and values in one buffer per kind:
`{"k": [L, B, H, S, Dh], "v": [L, B, H, S, Dh]}` with S the maximum length. Heads come before
slots so that one layer's [B, H, S, Dh] slab is already in the (batch, head)-major layout of the
attention matmuls (a [B, S, H, Dh] slab is transposed into a copy per layer and token). A call
that brings T new tokens writes their keys/values at slots `cache_index .. cache_index + T - 1`
(one scalar index for the whole batch: rows are left-padded, and the padding mask hides the
unused slots).

The layer stack carries the whole buffer from layer to layer (a scan *carry*, not scanned xs/ys)
and each layer writes its slice with one `dynamic_update_slice` on it: XLA then updates the
buffer in place, whereas slicing it as scan xs and restacking the ys copies all L layers per
generated token.
Batch is axis 1 of every leaf, so beam search can reorder any cache with one gather on axis 1.

For decoding, a cache may also hold a read-only prefix (`with_prefix`): the prefilled prompt's
keys/values at the batch of the prompts, while the cache's own slots hold the generated tokens
at the batch of the beams; beams attend to their prompt's prefix without copies of it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from blip2_jax.models import layers
from blip2_jax.sharding import constrain

Array = jax.Array
Cache = dict[str, Array]

# the stacked buffer [L, B, H, S, Dh]
CACHE_AXES = (None, "act_batch", "act_heads", "act_length", None)


def init_kv(num_layers: int, batch: int, max_length: int, num_heads: int, head_dim: int,
            dtype: Any = jnp.float32) -> Cache:
    """Zero keys and values, `{"k", "v"}` each [L, B, H, S, Dh]."""
    shape = (num_layers, batch, num_heads, max_length, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def update_layer(cache: Cache, layer: Array | int, k: Array, v: Array,
                 cache_index: Array | int) -> tuple[Cache, Array, Array]:
    """Writes layer `layer`'s T new keys/values [B, T, H, Dh] at slot `cache_index` of the
    stacked cache [L, B, H, S, Dh] (in place when the cache is a loop carry).

    Returns (updated cache, this layer's keys [B, H, S, Dh], values [B, H, S, Dh])."""
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
    out = {}
    for name, new in (("k", k), ("v", v)):
        buf = cache[name]
        new = head_major(new)[None].astype(buf.dtype)
        buf = jax.lax.dynamic_update_slice(buf, new, start)
        out[name] = constrain(buf, CACHE_AXES)
    layer_k = jax.lax.dynamic_index_in_dim(out["k"], start[0], axis=0, keepdims=False)
    layer_v = jax.lax.dynamic_index_in_dim(out["v"], start[0], axis=0, keepdims=False)
    return dict(cache, **out), layer_k, layer_v


def head_major(x: Array) -> Array:
    """[B, S, H, Dh] -> [B, H, S, Dh], the cache layout."""
    return jnp.swapaxes(x, 1, 2)


def _group_logits(q: Array, k: Array, prec) -> Array:
    """q [G*B, Tq, H, D] against k [B, H, S, D] -> float32 logits [G*B, H, Tq, S]: consecutive
    groups of G query rows share one row of keys (beams of one image share its prompt)."""
    bq, tq, h, d = q.shape
    b, s = k.shape[0], k.shape[2]
    g = bq // b
    logits = jnp.einsum("bqhd,bhkd->bhqk", q.reshape(b, g * tq, h, d), k, precision=prec,
                        preferred_element_type=jnp.float32)
    if g == 1:
        return logits
    return jnp.swapaxes(logits.reshape(b, h, g, tq, s), 1, 2).reshape(bq, h, tq, s)


def _group_weighted(probs: Array, v: Array, prec) -> Array:
    """probs [G*B, H, Tq, S] over values v [B, H, S, D] -> float32 [G*B, Tq, H, D]."""
    bq, h, tq, s = probs.shape
    b, d = v.shape[0], v.shape[-1]
    g = bq // b
    if g > 1:
        probs = jnp.swapaxes(probs.reshape(b, g, h, tq, s), 1, 2).reshape(b, h, g * tq, s)
    out = jnp.einsum("bhqk,bhkd->bqhd", probs, v, precision=prec, preferred_element_type=jnp.float32)
    return out.reshape(bq, tq, h, d)


def attend(q: Array, k: Array, v: Array, mask: Array | None = None, bias: Array | None = None,
           scale: float | None = None, prefix: tuple[Array, Array] | None = None) -> Array:
    """`layers.attention` over head-major keys/values (the cache layout): the same float32
    logits and softmax. q [B', Tq, H, D]; k, v [B, H, S, D] with B' a multiple of B (groups of
    B'/B consecutive query rows share a row of keys: beams or samples of one prompt need no
    copies of it); `prefix` = (keys, values) [B'', H, P, D] placed before k, v (B' a multiple
    of B''). mask bool / bias additive, broadcastable to [B', H, Tq, P + S].
    Returns [B', Tq, H, D] in q's dtype."""
    prec = layers.precision(q.dtype)
    logits = _group_logits(q, k, prec)
    if prefix is not None:
        logits = jnp.concatenate([_group_logits(q, prefix[0], prec), logits], axis=-1)
    probs = layers.attention_probs(logits, q.shape[-1], mask, bias, scale).astype(v.dtype)
    if prefix is None:
        return _group_weighted(probs, v, prec).astype(q.dtype)
    p = prefix[1].shape[2]
    out = _group_weighted(probs[..., :p], prefix[1], prec) + _group_weighted(probs[..., p:], v, prec)
    return out.astype(q.dtype)


def layer_slice(cache: Cache, name: str, layer: Array | int) -> Array:
    """One layer of a stacked cache entry: [L, B, ...] -> [B, ...]."""
    return jax.lax.dynamic_index_in_dim(cache[name], jnp.asarray(layer, jnp.int32), axis=0,
                                        keepdims=False)


def causal_attention_mask(num_queries: int, key_mask: Array | None, num_keys: int,
                          cache_index: Array | int | None = None) -> Array:
    """bool [B|1, 1, T, S]: query i (absolute position cache_index + i) sees key slot j iff
    j <= cache_index + i and key_mask[b, j] (1 = real token). Without a cache S = T, offset 0."""
    offset = 0 if cache_index is None else jnp.asarray(cache_index, jnp.int32)
    mask = layers.causal_mask(num_queries, num_keys, offset)
    if key_mask is not None:
        if key_mask.shape[-1] != num_keys:
            raise ValueError(f"attention_mask covers {key_mask.shape[-1]} keys, expected {num_keys} "
                             "(the input length without a cache, the cache length with one)")
        mask = mask & layers.padding_mask(key_mask)
    return mask


def prefix_length(cache: Cache) -> int:
    """P, the number of shared prompt slots before the cache's own (0 without a prefix)."""
    return cache["prefix_k"].shape[3] if "prefix_k" in cache else 0


def cache_length(cache: Cache) -> int:
    """The number of key slots a query sees: P (shared prefix, if any) + S."""
    return prefix_length(cache) + cache["k"].shape[3]


def with_prefix(cache: Cache, prefix: Cache) -> Cache:
    """A decoding cache whose queries also see a prefilled prompt's cache `prefix` {"k", "v"}
    [L, B, H, P, Dh], shared by groups of rows and never copied or reordered (beam search
    reorders only the generated tokens' slots). Slot indices (`cache_index`, masks) count the
    prefix first: slot P + j is the cache's own slot j."""
    return dict(cache, prefix_k=prefix["k"], prefix_v=prefix["v"])


def without_prefix(cache: Cache) -> Cache:
    """The cache's own entries (what a decoding loop carries)."""
    return {k: v for k, v in cache.items() if not k.startswith("prefix_")}

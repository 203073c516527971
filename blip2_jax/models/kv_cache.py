"""The preallocated key/value cache of the frozen language models, and the masks that go with it.

A cache holds every layer's keys and values, stacked so that `nn.scan` can slice it per layer:
`{"k": [L, B, S, H, Dh], "v": [L, B, S, H, Dh]}` with S the maximum length. A call that brings T
new tokens writes their keys/values at slots `cache_index .. cache_index + T - 1` (one scalar index
for the whole batch: rows are left-padded, and the padding mask hides the unused slots).
Batch is axis 1 of every leaf, so beam search can reorder any cache with one gather on axis 1.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from blip2_jax.models import layers
from blip2_jax.sharding import constrain

Array = jax.Array
Cache = dict[str, Array]

# per-layer cache slice [B, S, H, Dh]
CACHE_AXES = ("act_batch", "act_length", "act_heads", None)


def init_kv(num_layers: int, batch: int, max_length: int, num_heads: int, head_dim: int,
            dtype: Any = jnp.float32) -> Cache:
    """Zero keys and values, `{"k", "v"}` each [L, B, S, H, Dh]."""
    shape = (num_layers, batch, max_length, num_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write(layer_cache: Cache, k: Array, v: Array, cache_index: Array) -> Cache:
    """Write T new keys/values [B, T, H, Dh] into one layer's cache [B, S, H, Dh] at `cache_index`."""
    idx = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, idx, zero, zero)
    new_k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
    new_v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
    return {"k": constrain(new_k, CACHE_AXES), "v": constrain(new_v, CACHE_AXES)}


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


def cache_length(cache: Cache) -> int:
    """S, the number of key slots."""
    return cache["k"].shape[2]

"""T5 / FlanT5, the frozen encoder-decoder language model of BLIP-2 (arXiv 1910.10683, 2210.11416;
HF `T5ForConditionalGeneration`).

Pre-norm blocks with RMS norm (no mean, no bias), no 1/sqrt(d) attention scaling, relative
position buckets owned by each stack (HF keeps the table in block 0 and hands the bias to the
others; every layer is identical here, so the stack can be scanned), gated-GELU (tanh) FFN for
FlanT5, ReLU for original T5. BLIP-2 feeds the encoder `[projected queries; prompt embeddings]`.

Decoding cache: `init_cache` gives the self-attention keys/values `{"k", "v"}` [L, B, H, S, Dh],
carried through the layer stack and updated in place (`models/kv_cache.py`). The first `decode`
call with a cache (the prefill) also projects the encoder output once into
`"cross_k"`/`"cross_v"` [L, B, H, Te, Dh] and returns them in the new cache; later calls read
them and may pass `encoder_hidden=None`.

Param tree (scan_layers=True; with False, `layers_0`, ... without the leading axis):
  shared/embedding [V, D]                         lm_head/kernel [V, D] (untied only)
  encoder/relative_attention_bias/embedding [buckets, H]     encoder/final_layer_norm/scale [D]
  encoder/layers/{self_attn_norm, ff_norm}/scale [L, D]
  encoder/layers/self_attn/{q, k, v}/kernel [L, H*Dh, D], .../o/kernel [L, D, H*Dh]
  encoder/layers/ff/{wi_0, wi_1}/kernel [L, F, D] (gated) or ff/wi/kernel, ff/wo/kernel [L, D, F]
  decoder/...: the same plus layers/cross_attn_norm/scale and layers/cross_attn/{q, k, v, o}
Kernels are stored [out, in] as in the checkpoints (`layers.Dense(transposed=True)`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models import kv_cache, layers
from blip2_jax.models.configs import T5Config
from blip2_jax.models.layers import remat
from blip2_jax.sharding import constrain

Array = jax.Array
Dtype = Any

ACT = ("act_batch", "act_length", "act_embed")


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of (key - query) distances: exact buckets for small distances, log-spaced
    ones up to `max_distance`, one bucket beyond. The encoder splits the buckets between the two
    directions; the decoder only sees the past."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # float32 like the reference; distances below max_exact never use this branch
    far = jnp.maximum(distance, max_exact).astype(jnp.float32)
    large = max_exact + (jnp.log(far / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class T5LayerNorm(layers.CheapParams, nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""
    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", layers.logical(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.epsilon)).astype(self.dtype) * scale.astype(self.dtype)


class T5Attention(nn.Module):
    """Projections of one T5 attention (self or cross); the block wires the cache around them."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        inner, f = cfg.num_heads * cfg.d_kv, cfg.initializer_factor
        dense = functools.partial(layers.Dense, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, transposed=True)
        init = nn.initializers.normal
        self.q = dense(inner, ("embed", "heads"), kernel_init=init(f * (cfg.d_model * cfg.d_kv) ** -0.5))
        self.k = dense(inner, ("embed", "heads"), kernel_init=init(f * cfg.d_model ** -0.5))
        self.v = dense(inner, ("embed", "heads"), kernel_init=init(f * cfg.d_model ** -0.5))
        self.o = dense(cfg.d_model, ("heads", "embed"), kernel_init=init(f * inner ** -0.5))

    def query(self, x: Array) -> Array:
        """[B, T, D] -> [B, T, H, Dh]."""
        return layers.split_heads(self.q(x), self.config.num_heads)

    def key_value(self, x: Array) -> tuple[Array, Array]:
        """[B, S, D] -> keys, values [B, S, H, Dh]."""
        h = self.config.num_heads
        return layers.split_heads(self.k(x), h), layers.split_heads(self.v(x), h)

    def __call__(self, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None,
                 cached: bool = False) -> Array:
        """Attention without 1/sqrt(d) scaling (T5 folds it into the init) -> [B, T, D].
        k, v [B, S, H, Dh], or with `cached` the cache's head-major [B, H, S, Dh]."""
        attend = kv_cache.attend if cached else layers.attention
        out = attend(q, k.astype(self.dtype), v.astype(self.dtype), mask=mask, bias=bias, scale=1.0)
        return self.o(layers.merge_heads(out))


class T5FeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) for gated activations (FlanT5), wo(act(wi x)) otherwise."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        dense = functools.partial(layers.Dense, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, transposed=True)
        wi_init = nn.initializers.normal(cfg.initializer_factor * cfg.d_model ** -0.5)
        act = layers.activation(cfg.dense_act_fn)
        if cfg.is_gated_act:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), kernel_init=wi_init, name="wi_0")(x))
            h = h * dense(cfg.d_ff, ("embed", "mlp"), kernel_init=wi_init, name="wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), kernel_init=wi_init, name="wi")(x))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        wo_init = nn.initializers.normal(cfg.initializer_factor * cfg.d_ff ** -0.5)
        return dense(cfg.d_model, ("mlp", "embed"), kernel_init=wo_init, name="wo")(h)


class T5Block(nn.Module):
    """Self-attention (+ cross-attention in the decoder) + FFN, each pre-normed and residual."""
    config: T5Config
    is_decoder: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple, mask: Array | None, bias: Array, encoder_hidden: Array | None,
                 encoder_mask: Array | None, cache_index, deterministic: bool):
        """carry = (x [B, T, D], stacked cache {"k", "v"(, "cross_k", "cross_v")} or None, layer
        index int32); mask bool [B|1, 1, T, S]; bias [1, H, T, S].
        -> (next carry, this layer's new cross-attention keys/values {"cross_k", "cross_v"}
        [B, H, Te, Dh] when a cache without them is being filled (the prefill), else None)."""
        x, cache, layer = carry
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(T5LayerNorm, cfg.layer_norm_epsilon, **kw)
        drop = nn.Dropout(cfg.dropout_rate)

        attn = T5Attention(cfg, name="self_attn", **kw)
        h = norm(name="self_attn_norm")(x)
        q, (k, v) = attn.query(h), attn.key_value(h)
        if cache is not None:
            cache, k, v = kv_cache.update_layer(cache, layer, k, v, cache_index)
        x = x + drop(attn(q, k, v, mask, bias, cached=cache is not None), deterministic=deterministic)

        new_cross = None
        if self.is_decoder:
            cross = T5Attention(cfg, name="cross_attn", **kw)
            h = norm(name="cross_attn_norm")(x)
            if cache is not None and "cross_k" in cache:
                k = kv_cache.layer_slice(cache, "cross_k", layer)
                v = kv_cache.layer_slice(cache, "cross_v", layer)
            else:
                if encoder_hidden is None:
                    raise ValueError("the decoder needs encoder_hidden (or a cache holding the "
                                     "cross-attention keys/values from a previous call)")
                k, v = cross.key_value(encoder_hidden)
                if cache is not None:
                    dt = cache["k"].dtype
                    k, v = kv_cache.head_major(k).astype(dt), kv_cache.head_major(v).astype(dt)
                    new_cross = {"cross_k": k, "cross_v": v}
            x = x + drop(cross(cross.query(h), k, v, encoder_mask, None, cached=cache is not None),
                         deterministic=deterministic)

        h = norm(name="ff_norm")(x)
        x = x + drop(T5FeedForward(cfg, name="ff", **kw)(h, deterministic), deterministic=deterministic)
        return (constrain(x, ACT), cache, layer + 1), new_cross


class T5Stack(nn.Module):
    """The encoder (bidirectional buckets) or the decoder (causal buckets, cross-attention)."""
    config: T5Config
    is_decoder: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    @property
    def num_layers(self) -> int:
        return self.config.num_decoder_layers if self.is_decoder else self.config.num_layers

    def setup(self):
        cfg = self.config
        bias_init = nn.initializers.normal(cfg.initializer_factor * cfg.d_model ** -0.5)
        self.relative_attention_bias = layers.Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads, dtype=self.dtype,
            param_dtype=self.param_dtype, embedding_init=layers.logical(bias_init, ("relpos", "heads")))
        self.final_layer_norm = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        block = remat(T5Block, self.remat_policy, self.scan_layers, static_argnums=(7,))
        if self.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 6, length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.is_decoder, self.dtype, self.param_dtype)
        else:
            self.layers = [block(cfg, self.is_decoder, self.dtype, self.param_dtype)
                           for _ in range(self.num_layers)]

    def position_bias(self, num_queries: int, num_keys: int, offset) -> Array:
        """[1, H, T, S] learned bias of each (query at offset + i, key at j) distance bucket."""
        cfg = self.config
        query_pos = jnp.arange(num_queries)[:, None] + offset
        rel = jnp.arange(num_keys)[None, :] - query_pos
        buckets = relative_position_bucket(rel, not self.is_decoder,
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x: Array, attention_mask: Array | None, encoder_hidden: Array | None = None,
                 encoder_mask: Array | None = None, cache: dict | None = None,
                 cache_index: Array | None = None, deterministic: bool = True):
        """x [B, T, D] embeddings; attention_mask [B, T] (decoder with a cache: [B, S]) or None.
        -> (final hidden [B, T, D], new_cache or None)."""
        t = x.shape[1]
        if self.is_decoder:
            if cache is not None and cache_index is None:
                raise ValueError("a cache needs cache_index (the slot of the first new token)")
            num_keys = t if cache is None else kv_cache.cache_length(cache)
            mask = kv_cache.causal_attention_mask(t, attention_mask, num_keys, cache_index)
            bias = self.position_bias(t, num_keys, 0 if cache_index is None else cache_index)
            enc_mask = None if encoder_mask is None else layers.padding_mask(encoder_mask)
        else:
            mask = None if attention_mask is None else layers.padding_mask(attention_mask)
            bias = self.position_bias(t, t, 0)
            enc_mask = None
        x = constrain(self.dropout(x, deterministic=deterministic), ACT)
        carry = (x, cache, jnp.int32(0))
        if self.scan_layers:
            carry, cross = self.layers(carry, mask, bias, encoder_hidden, enc_mask, cache_index,
                                       deterministic)
        else:
            per_layer = []
            for layer in self.layers:
                carry, c = layer(carry, mask, bias, encoder_hidden, enc_mask, cache_index,
                                 deterministic)
                per_layer.append(c)
            cross = None if per_layer[0] is None else jax.tree.map(lambda *c: jnp.stack(c), *per_layer)
        x, new_cache, _ = carry
        if cross is not None:  # the prefill: keep each layer's cross-attention keys/values
            new_cache = dict(new_cache, **cross)
        x = self.dropout(self.final_layer_norm(x), deterministic=deterministic)
        return x, new_cache


def init_cache(config: T5Config, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> dict:
    """Zero decoder self-attention cache {"k", "v"}: [num_decoder_layers, batch, H, max_length, d_kv]
    (the prefill call adds "cross_k"/"cross_v")."""
    return kv_cache.init_kv(config.num_decoder_layers, batch, max_length, config.num_heads,
                            config.d_kv, dtype)


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder + LM head.

    `embed(input_ids)` -> [B, T, D];  `encode(inputs_embeds, attention_mask)` -> [B, Te, D];
    `decode(decoder_input_ids, encoder_hidden, encoder_mask, cache=None, cache_index=None,
            decoder_attention_mask=None, deterministic=True, return_hidden=False)`
      -> (logits [B, T, V] float32 or hidden [B, T, D], new_cache);
    `__call__(inputs_embeds, attention_mask, decoder_input_ids, ...)` -> logits (full forward).
    """
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    init_cache = staticmethod(init_cache)

    def setup(self):
        cfg = self.config
        if cfg.num_decoder_layers < 1 or cfg.num_layers < 1:
            raise ValueError("T5 needs at least one encoder and one decoder layer")
        emb_init = nn.initializers.normal(cfg.initializer_factor)
        self.shared = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               embedding_init=layers.logical(emb_init, ("vocab", "embed")))
        stack = functools.partial(T5Stack, cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                                  scan_layers=self.scan_layers, remat_policy=self.remat_policy)
        self.encoder = stack(is_decoder=False)
        self.decoder = stack(is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Dense(cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype,
                                        kernel_init=emb_init, transposed=True)

    def embed(self, input_ids: Array) -> Array:
        """[B, T] int -> [B, T, D] (the shared token embeddings)."""
        return self.shared(input_ids)

    def encode(self, inputs_embeds: Array, attention_mask: Array | None,
               deterministic: bool = True) -> Array:
        """inputs_embeds [B, Te, D], attention_mask [B, Te] (1 = real) -> encoder output [B, Te, D]."""
        out, _ = self.encoder(inputs_embeds.astype(self.dtype), attention_mask,
                              deterministic=deterministic)
        return out

    def logits(self, hidden: Array) -> Array:
        """Decoder output [..., D] -> float32 [..., V]. `scale_decoder_outputs` (original T5,
        tied) multiplies by d_model**-0.5 first; FlanT5 has its own untied head and no rescale."""
        cfg = self.config
        hidden = hidden.astype(self.dtype)
        if cfg.scale_decoder_outputs:
            hidden = hidden * cfg.d_model ** -0.5
        if cfg.tie_word_embeddings:
            out = layers.linear(hidden, self.shared.embedding, self.dtype, transposed=True,
                                out_dtype=jnp.float32)
        else:
            out = self.lm_head(hidden).astype(jnp.float32)
        if out.ndim == 3:
            out = constrain(out, ("act_batch", "act_length", "act_vocab"))
        return out

    def decode(self, decoder_input_ids: Array, encoder_hidden: Array | None,
               encoder_mask: Array | None, cache: dict | None = None,
               cache_index: Array | None = None, decoder_attention_mask: Array | None = None,
               deterministic: bool = True, return_hidden: bool = False):
        """decoder_input_ids [B, T] (starting with decoder_start_token_id); encoder_hidden
        [B, Te, D] (None once the cache holds cross_k/cross_v); encoder_mask [B, Te];
        cache from `init_cache` with cache_index the slot of the first new token;
        decoder_attention_mask [B, T] (cached: [B, S]) optional, causal masking always applies.
        -> (logits [B, T, V] float32, or the final hidden [B, T, D] if return_hidden; new_cache)."""
        x = self.shared(decoder_input_ids)
        hidden, new_cache = self.decoder(x, decoder_attention_mask, encoder_hidden, encoder_mask,
                                         cache, cache_index, deterministic)
        if return_hidden:
            return hidden, new_cache
        return self.logits(hidden), new_cache

    def __call__(self, inputs_embeds: Array, attention_mask: Array | None,
                 decoder_input_ids: Array, decoder_attention_mask: Array | None = None,
                 deterministic: bool = True) -> Array:
        """Full forward (teacher forcing) -> logits [B, Td, V] float32."""
        enc = self.encode(inputs_embeds, attention_mask, deterministic)
        logits, _ = self.decode(decoder_input_ids, enc, attention_mask,
                                decoder_attention_mask=decoder_attention_mask,
                                deterministic=deterministic)
        return logits

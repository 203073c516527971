"""OPT, the frozen decoder-only language model of BLIP-2 (arXiv 2205.01068; HF `OPTForCausalLM`).

Pre-LN transformer decoder (post-LN when `do_layer_norm_before=False`, as OPT-350m), ReLU FFN,
learned absolute positions with OPT's offset of 2, lm_head tied to the token embeddings.
BLIP-2 feeds it `[projected queries; text embeddings]` via `inputs_embeds`, so `embed` (tokens
only) and `__call__` (embeddings in) are separate. Decoding uses a preallocated KV cache
(`models/kv_cache.py`).

Param tree (scan_layers=True; with False, `layers_0`, `layers_1`, ... without the leading axis):
  embed_tokens/embedding [V, Dw]        embed_positions/embedding [P + 2, D]
  project_in/kernel [D, Dw], project_out/kernel [Dw, D]   (only when Dw != D)
  layers/{self_attn_layer_norm, final_layer_norm}/{scale, bias} [L, D]
  layers/self_attn/{q_proj, k_proj, v_proj, out_proj}/{kernel [L, D, D], bias [L, D]}
  layers/fc1/{kernel [L, F, D], bias}   layers/fc2/{kernel [L, D, F], bias}
  final_layer_norm/{scale, bias} (pre-LN only)     lm_head/kernel [V, Dw] (untied only)
Kernels are stored [out, in] as in the checkpoints (`layers.Dense(transposed=True)`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models import kv_cache, layers, streaming
from blip2_jax.models.layers import remat
from blip2_jax.models.configs import OPTConfig
from blip2_jax.sharding import constrain

Array = jax.Array
Dtype = Any

# OPT's learned position table has 2 extra leading rows (fairseq's padding_idx + 1): position p
# reads row p + 2. Callers pass plain positions (cumsum(mask) - 1); the module adds the offset.
POSITION_OFFSET = 2

ACT = ("act_batch", "act_length", "act_embed")

def _dense(cfg: OPTConfig, features: int, axes, name: str, dtype, param_dtype, bias: bool = True):
    return layers.Dense(features, axes=axes, use_bias=bias and cfg.enable_bias, dtype=dtype,
                        param_dtype=param_dtype, kernel_init=nn.initializers.normal(cfg.init_std),
                        transposed=True, name=name)


def _layer_norm(cfg: OPTConfig, name: str, dtype, param_dtype):
    affine = cfg.layer_norm_elementwise_affine
    return layers.layer_norm(cfg.layer_norm_eps, dtype, param_dtype, name=name,
                             use_bias=affine, use_scale=affine)


class OPTAttention(nn.Module):
    """Causal multi-head self-attention; writes the new keys/values into the cache if given."""
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, cache: dict | None, layer: Array | int, cache_index):
        """x [B, T, D]; mask bool [B|1, 1, T, S]; cache: the stacked {"k","v"} [L, B, H, S, Dh]
        or None; layer: this layer's index in it. -> ([B, T, D], updated cache)."""
        cfg = self.config
        d, h = cfg.hidden_size, cfg.num_attention_heads
        if d % h:
            raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {h}")
        proj = functools.partial(_dense, cfg, d, dtype=self.dtype, param_dtype=self.param_dtype)
        # OPT scales q before the dot product (not the logits); same maths, same rounding as HF.
        q = proj(("embed", "heads"), "q_proj")(x) * (d // h) ** -0.5
        k = proj(("embed", "heads"), "k_proj")(x)
        v = proj(("embed", "heads"), "v_proj")(x)
        q, k, v = (layers.split_heads(t, h) for t in (q, k, v))
        if cache is None:
            out = layers.attention(q, k, v, mask=mask, scale=1.0)
        else:
            p = kv_cache.prefix_length(cache)
            cache, k, v = kv_cache.update_layer(cache, layer, k, v, cache_index - p)
            prefix = None
            if p:
                prefix = tuple(kv_cache.layer_slice(cache, n, layer).astype(self.dtype)
                               for n in ("prefix_k", "prefix_v"))
            out = kv_cache.attend(q, k.astype(self.dtype), v.astype(self.dtype), mask=mask,
                                  scale=1.0, prefix=prefix)
        return proj(("heads", "embed"), "out_proj")(layers.merge_heads(out)), cache


class OPTDecoderLayer(nn.Module):
    """One OPT block: (LN) -> self-attention -> +residual -> (LN) -> fc1 -> act -> fc2 -> +residual."""
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple, mask: Array, cache_index, deterministic: bool):
        """carry = (x [B, T, D], stacked cache or None, layer index int32) -> (next carry, None).
        The cache rides in the carry so that nn.scan updates it in place (see kv_cache)."""
        x, cache, layer = carry
        cfg = self.config
        pre = cfg.do_layer_norm_before
        ln1 = _layer_norm(cfg, "self_attn_layer_norm", self.dtype, self.param_dtype)
        ln2 = _layer_norm(cfg, "final_layer_norm", self.dtype, self.param_dtype)
        drop = nn.Dropout(cfg.dropout)

        h = ln1(x) if pre else x
        h, cache = OPTAttention(cfg, self.dtype, self.param_dtype, name="self_attn")(
            h, mask, cache, layer, cache_index)
        x = x + drop(h, deterministic=deterministic)
        if not pre:
            x = ln1(x)

        h = ln2(x) if pre else x
        h = _dense(cfg, cfg.ffn_dim, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(h)
        h = layers.activation(cfg.activation_function)(h)
        h = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(h)
        x = x + drop(h, deterministic=deterministic)
        if not pre:
            x = ln2(x)
        return (constrain(x, ACT), cache, layer + 1), None


def init_cache(config: OPTConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> dict:
    """Zero KV cache {"k", "v"}: [num_layers, batch, heads, max_length, head_dim]."""
    if max_length > config.max_position_embeddings:
        raise ValueError(f"cache length {max_length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    h = config.num_attention_heads
    return kv_cache.init_kv(config.num_hidden_layers, batch, max_length, h,
                            config.hidden_size // h, dtype)


class OPTForCausalLM(nn.Module):
    """OPT decoder + tied LM head.

    `embed(input_ids)` -> token embeddings [B, T, Dw] (no positions).
    `__call__(inputs_embeds, attention_mask, position_ids, cache=None, cache_index=None,
              deterministic=True, return_hidden=False)` -> (logits [B, T, V] float32, new_cache);
      with return_hidden=True the first output is the final hidden state [B, T, Dw] instead
      (apply `logits(hidden)` to the positions you need).
    """
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    init_cache = staticmethod(init_cache)

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        self.embed_tokens = layers.Embed(
            cfg.vocab_size, cfg.word_embed_proj_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=layers.logical(init, ("vocab", "embed")))
        self.embed_positions = layers.Embed(
            cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, dtype=self.dtype,
            param_dtype=self.param_dtype, embedding_init=layers.logical(init, ("position", "embed")))
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            self.project_in = _dense(cfg, cfg.hidden_size, (None, "embed"), None, self.dtype,
                                     self.param_dtype, bias=False)
            self.project_out = _dense(cfg, cfg.word_embed_proj_dim, ("embed", None), None,
                                      self.dtype, self.param_dtype, bias=False)
        # final_layer_norm exists only in pre-LN checkpoints (HF drops it for OPT-350m)
        if cfg.do_layer_norm_before:
            self.final_layer_norm = _layer_norm(cfg, None, self.dtype, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Dense(cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype,
                                        kernel_init=init, transposed=True)
        block = remat(OPTDecoderLayer, self.remat_policy, self.scan_layers, static_argnums=(4,))
        if self.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype)
        else:
            self.layers = [block(cfg, self.dtype, self.param_dtype)
                           for _ in range(cfg.num_hidden_layers)]

    def embed(self, input_ids: Array) -> Array:
        """[B, T] int -> [B, T, Dw] token embeddings."""
        return self.embed_tokens(input_ids)

    def hidden_states(self, inputs_embeds: Array, attention_mask: Array | None, position_ids: Array,
                      cache: dict | None = None, cache_index: Array | None = None,
                      deterministic: bool = True) -> tuple[Array, dict | None]:
        """The decoder without the LM head: -> (final hidden [B, T, Dw], new_cache)."""
        cfg = self.config
        t = inputs_embeds.shape[1]
        if cache is not None and cache_index is None:
            raise ValueError("a cache needs cache_index (the slot of the first new token)")
        num_keys = t if cache is None else kv_cache.cache_length(cache)
        mask = kv_cache.causal_attention_mask(t, attention_mask, num_keys, cache_index)

        x = inputs_embeds.astype(self.dtype)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)
        x = constrain(x, ACT)

        carry = (x, cache, jnp.int32(0))
        if self.scan_layers and cache is not None and streaming.enabled() and not self.is_initializing():
            carry = self._layers_in_place(carry, mask, cache_index)
        elif self.scan_layers:
            carry, _ = self.layers(carry, mask, cache_index, deterministic)
        else:
            for layer in self.layers:
                carry, _ = layer(carry, mask, cache_index, deterministic)
        x, new_cache, _ = carry

        if cfg.do_layer_norm_before:
            x = self.final_layer_norm(x)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_out(x)
        return x, new_cache

    def _layers_in_place(self, carry: tuple, mask: Array, cache_index) -> tuple:
        """The scanned layers when decoding on CPU: a loop over the layer index in which each
        kernel is `streaming.LayerOf` its stack, read in place (`nn.scan` hands every layer a
        slice of each stack, which XLA's CPU backend copies before using it)."""
        stacked = nn.meta.unbox(self.variables["params"]["layers"])
        block = OPTDecoderLayer(self.config, self.dtype, self.param_dtype, parent=None)

        def body(i, carry):
            x, cache, _ = carry
            params = layers.layer_params(stacked, i)
            (x, cache, _), _ = block.apply({"params": params}, (x, cache, i), mask, cache_index, True)
            return x, cache, i + 1

        return jax.lax.fori_loop(0, self.config.num_hidden_layers, body, carry)

    def logits(self, hidden: Array) -> Array:
        """LM head: [..., Dw] -> float32 [..., V] (tied to embed_tokens unless configured not to)."""
        if self.config.tie_word_embeddings:
            out = layers.linear(hidden, self.embed_tokens.embedding, self.dtype, transposed=True,
                                out_dtype=jnp.float32)
        else:
            out = self.lm_head(hidden).astype(jnp.float32)
        if out.ndim == 3:
            out = constrain(out, ("act_batch", "act_length", "act_vocab"))
        return out

    def __call__(self, inputs_embeds: Array, attention_mask: Array | None, position_ids: Array,
                 cache: dict | None = None, cache_index: Array | None = None,
                 deterministic: bool = True, return_hidden: bool = False):
        """inputs_embeds [B, T, Dw]; attention_mask [B, S] (1 = real key; S = T without a cache,
        the cache length with one); position_ids [B, T] WITHOUT OPT's +2 offset (left pads may
        be -1 or 0, their rows are never read); cache from `init_cache` (optionally with a shared
        prompt prefix, `kv_cache.with_prefix`: then slots and the mask count the prefix first),
        cache_index: scalar int, the slot of the first of the T new tokens.
        Returns (logits [B, T, V] float32 — or the hidden state if return_hidden — , new_cache)."""
        hidden, new_cache = self.hidden_states(inputs_embeds, attention_mask, position_ids, cache,
                                               cache_index, deterministic)
        if return_hidden:
            return hidden, new_cache
        return self.logits(hidden), new_cache

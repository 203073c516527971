"""The Querying Transformer (Q-Former, paper §3.1) and its stage-1 heads.

A BERT encoder whose first `num_query_tokens` positions are learned queries. Every
`cross_attention_frequency`-th layer (i % freq == 0) lets the queries cross-attend to the frozen
image features; queries and text tokens share the self-attention but have separate FFNs
(`query_ffn` / `text_ffn`). One method per attention pattern of the paper's Figure 2:

- `query_features`   queries only (+ cross-attention): what stage 2 feeds the LLM; ITC image side.
- `text_features`    text only, bi-directional: ITC text side (uni-modal mask).
- `multimodal_features`  [queries; text], everything sees everything: ITM (bi-directional mask).
- `causal_lm`        ITG (multimodal causal mask): queries see only queries, text token t sees all
                     queries and text tokens <= t. The text pass reuses the per-layer keys/values
                     cached by the query pass (`query_features(..., return_cache=True)`), as LAVIS
                     does with `past_key_values`; since the queries never see the text, this is
                     exactly one pass over [queries; text] with that mask.

Heads (present when `config.use_qformer_text_input`): `vision_proj`, `text_proj`, `itm_head`,
learnable `temp`, and (with `with_lm_head`) the BERT LM head `lm_head` (LAVIS `cls.predictions`:
dense + act + LayerNorm, then the word embeddings (tied) or an own `decoder`, plus a bias).
ITC/ITM scoring follows transformers' `Blip2ForImageTextRetrieval`: ITM = itm_head on the query
positions, averaged over queries; ITC similarity = max over queries of cosine similarities.

Params: `query_tokens` (1, Q, D), `embeddings` {word_embeddings (V, D), position_embeddings (P, D)},
`layernorm` (HF `qformer.layernorm` = LAVIS `embeddings.LayerNorm`, applied to queries and text),
`layer_{i}` {attention, crossattention (i % freq == 0), query_ffn, text_ffn}, `vision_proj`,
`text_proj`, `itm_head`, `temp`, `lm_head` {transform, transform_norm, bias, decoder (untied only)}.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models.configs import QFormerConfig
from blip2_jax.models.layers import (Dense, activation, attention, attention_probs, causal_mask, layer_norm,
                                     logical, merge_heads, padding_mask, precision, remat, split_heads)
from blip2_jax.sharding import constrain

Dtype = Any
KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (k, v), each [B, Q, H, Dh]

TEMP_INIT = 0.07          # paper / LAVIS initial ITC temperature
TEMP_RANGE = (0.001, 0.5)  # LAVIS clamps temp to this range before every use
NORM_EPS = 1e-12           # torch.nn.functional.normalize's epsilon
ACT = ("act_batch", "act_length", "act_embed")


def itc_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """ITC similarity (paper §3.2): for each (image, text), the best-matching query's cosine.

    image_embeds [Bi, Q, E] and text_embeds [Bt, E], both L2-normalised -> float32 [Bi, Bt]
    (divide by the temperature for the ITC loss)."""
    dtype = jnp.promote_types(image_embeds.dtype, text_embeds.dtype)
    sim = jnp.einsum("iqe,te->itq", image_embeds, text_embeds, precision=precision(dtype),
                     preferred_element_type=jnp.float32)
    return sim.max(axis=-1)


def l2_normalize(x: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, NORM_EPS)).astype(x.dtype)


class QFormerAttention(nn.Module):
    """BERT attention block: multi-head attention, output dense, dropout, residual, post-LN.

    x [B, T, D]; `kv_source` [B, S, Dkv] for cross-attention (else x); `mask` bool broadcastable to
    [B, H, T, S(+P)]; `prefix_kv` (k, v) [B, P, H, Dh] prepended to the keys/values.
    Returns (out [B, T, D], (k, v) of this call's own keys/values [B, S, H, Dh])."""
    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_source=None, mask=None, prefix_kv=None, deterministic=True):
        cfg = self.config
        heads = cfg.num_attention_heads
        dense = functools.partial(Dense, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        src = x if kv_source is None else kv_source.astype(self.dtype)
        q = split_heads(dense(axes=("embed", "heads"), name="query")(x), heads)
        k = split_heads(dense(axes=("embed", "heads"), name="key")(src), heads)
        v = split_heads(dense(axes=("embed", "heads"), name="value")(src), heads)
        own_kv = (k, v)
        if prefix_kv is not None:
            k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
        rate = cfg.attention_probs_dropout_prob
        if deterministic or rate == 0.0:
            ctx = attention(q, k, v, mask)
        else:  # BERT drops attention probabilities (whole keys per query)
            prec = precision(q.dtype)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec, preferred_element_type=jnp.float32)
            probs = nn.Dropout(rate)(attention_probs(logits, q.shape[-1], mask), deterministic=False)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=prec)
        out = dense(axes=("heads", "embed"), name="dense")(merge_heads(ctx))
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        out = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name="layer_norm")(out + x)
        return out, own_kv


class QFormerFFN(nn.Module):
    """BERT feed-forward block: dense, act, dense, dropout, residual, post-LN. [B,T,D] -> [B,T,D]."""
    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.config
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="intermediate")(x)
        h = activation(cfg.hidden_act)(h)
        h = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="output")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name="layer_norm")(h + x)


class QFormerLayer(nn.Module):
    """One Q-Former layer. The first `query_length` positions are queries: they (alone) cross-attend
    to the image in cross-attention layers and use `query_ffn`; the rest are text (`text_ffn`)."""
    config: QFormerConfig
    index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        sub = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = QFormerAttention(**sub)
        if cfg.has_cross_attention(self.index):
            self.crossattention = QFormerAttention(**sub)
        self.query_ffn = QFormerFFN(**sub)
        if cfg.use_qformer_text_input:
            self.text_ffn = QFormerFFN(**sub)

    def __call__(self, x, query_length: int, mask=None, image_embeds=None, image_mask=None,
                 prefix_kv=None, deterministic=True):
        """x [B, T, D] -> ([B, T, D], this layer's self-attention (k, v) [B, T, H, Dh])."""
        h, kv = self.attention(x, mask=mask, prefix_kv=prefix_kv, deterministic=deterministic)
        parts = []
        if query_length > 0:
            q = h[:, :query_length]
            if self.config.has_cross_attention(self.index):
                if image_embeds is None:
                    raise ValueError(f"layer {self.index} cross-attends: image_embeds are required")
                q, _ = self.crossattention(q, kv_source=image_embeds, mask=image_mask,
                                           deterministic=deterministic)
            parts.append(self.query_ffn(q, deterministic))
        if h.shape[1] > query_length:
            if not self.config.use_qformer_text_input:
                raise ValueError("text tokens need config.use_qformer_text_input=True (text FFN)")
            parts.append(self.text_ffn(h[:, query_length:], deterministic))
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return constrain(out, ACT), kv


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types; the LayerNorm is the Q-Former's)."""
    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        # The vocabulary axis is not sharded: BERT's 30522 + [DEC] = 30523 rows divide by no mesh
        # size, and the table is small.
        self.word_embeddings = self.param("word_embeddings", logical(init, (None, "embed")),
                                          (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        self.position_embeddings = self.param("position_embeddings", logical(init, ("position", "embed")),
                                              (cfg.max_position_embeddings, cfg.hidden_size), self.param_dtype)

    def __call__(self, input_ids):
        """[B, T] int -> [B, T, D]; positions start at 0 for the first text token."""
        t = input_ids.shape[1]
        x = jnp.take(self.word_embeddings, input_ids, axis=0) + self.position_embeddings[None, :t]
        return x.astype(self.dtype)

    def attend(self, h):
        """Tied output projection: [..., D] -> [..., V]."""
        return jnp.dot(h, self.word_embeddings.astype(self.dtype).T, precision=precision(self.dtype))


class LMHead(nn.Module):
    """BERT `cls.predictions`: transform (dense, act, LayerNorm), then vocab projection + bias."""
    config: QFormerConfig
    tie: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, embeddings: TextEmbeddings):
        cfg = self.config
        h = Dense(cfg.hidden_size, ("embed", None), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="transform")(h)
        h = activation(cfg.hidden_act)(h)
        h = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name="transform_norm")(h)
        if self.tie:
            logits = embeddings.attend(h)
        else:
            logits = Dense(cfg.vocab_size, ("embed", None), use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="decoder")(h)
        bias = self.param("bias", logical(nn.initializers.zeros, (None,)), (cfg.vocab_size,),
                          self.param_dtype)
        return logits + bias.astype(self.dtype)


class QFormer(nn.Module):
    """The Q-Former with learned queries and (with text input) the stage-1 heads.

    Shapes: image_embeds [B, N, Dv] (ViT output after ln_vision), image_mask [B, N] (1 = real),
    input_ids / attention_mask [B, T]. Q = num_query_tokens, D = hidden, E = image_text_hidden_size.
    """
    config: QFormerConfig
    num_query_tokens: int
    image_text_hidden_size: int = 256
    with_lm_head: bool = False
    tie_lm_head: bool = True
    temp_init: float = TEMP_INIT
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"  # per layer, as the towers' (stage 1 keeps only Q-Former activations)

    def setup(self):
        cfg = self.config
        sub = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.query_tokens = self.param(
            "query_tokens", logical(nn.initializers.normal(0.02), (None, "queries", "embed")),
            (1, self.num_query_tokens, cfg.hidden_size), self.param_dtype)
        if cfg.use_qformer_text_input:
            self.embeddings = TextEmbeddings(cfg, **sub)
        self.layernorm = layer_norm(cfg.layer_norm_eps, **sub)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # static: query_length and deterministic (argument numbers count `self`)
        layer = remat(QFormerLayer, self.remat_policy, scan_layers=False, static_argnums=(2, 7))
        self.layer = [layer(cfg, i, **sub) for i in range(cfg.num_hidden_layers)]
        if cfg.use_qformer_text_input:
            e = self.image_text_hidden_size
            self.vision_proj = Dense(e, ("embed", None), **sub)
            self.text_proj = Dense(e, ("embed", None), **sub)
            self.itm_head = Dense(2, ("embed", None), **sub)
            self.temp = self.param("temp", lambda key, shape, dt: jnp.full(shape, self.temp_init, dt),
                                   (), self.param_dtype)
            if self.with_lm_head:
                self.lm_head = LMHead(cfg, self.tie_lm_head, **sub)

    # -- the shared encoder ------------------------------------------------------------------
    def _encode(self, embeds, query_length: int, mask=None, image_embeds=None, image_mask=None,
                prefix_kvs: KVCache | None = None, deterministic=True):
        x = self.dropout(self.layernorm(embeds), deterministic=deterministic)
        x = constrain(x, ACT)
        cross_mask = None if image_mask is None else padding_mask(image_mask)
        kvs = []
        for i, layer in enumerate(self.layer):
            x, kv = layer(x, query_length, mask, image_embeds, cross_mask,
                          None if prefix_kvs is None else prefix_kvs[i], deterministic)
            kvs.append(kv)
        return x, tuple(kvs)

    def _queries(self, batch: int):
        q = self.query_tokens.astype(self.dtype)
        return jnp.broadcast_to(q, (batch,) + q.shape[1:])

    def _require_text(self):
        if not self.config.use_qformer_text_input:
            raise ValueError("this Q-Former has no text input (config.use_qformer_text_input=False)")

    # -- the four attention patterns ---------------------------------------------------------
    def query_features(self, image_embeds, image_mask=None, *, deterministic=True, return_cache=False):
        """Queries cross-attending to the image -> [B, Q, D] (HF `Blip2QFormerModel` output for
        `query_embeds=query_tokens`). With `return_cache`, also the per-layer self-attention
        (k, v) [B, Q, H, Dh] for `causal_lm`."""
        x, kvs = self._encode(self._queries(image_embeds.shape[0]), self.num_query_tokens,
                              image_embeds=image_embeds, image_mask=image_mask,
                              deterministic=deterministic)
        return (x, kvs) if return_cache else x

    def text_features(self, input_ids, attention_mask, *, deterministic=True):
        """Uni-modal text pass (ITC text side): [B, T] -> [B, T, D]; [:, 0] is the [CLS] feature."""
        self._require_text()
        x, _ = self._encode(self.embeddings(input_ids), 0, padding_mask(attention_mask),
                            deterministic=deterministic)
        return x

    def multimodal_features(self, image_embeds, input_ids, attention_mask, image_mask=None, *,
                            deterministic=True):
        """Bi-directional pass over [queries; text] (ITM) -> [B, Q + T, D]."""
        self._require_text()
        b = input_ids.shape[0]
        q = self._queries(b)
        mask = jnp.concatenate([jnp.ones((b, self.num_query_tokens), bool), attention_mask.astype(bool)], 1)
        x, _ = self._encode(jnp.concatenate([q, self.embeddings(input_ids)], axis=1), self.num_query_tokens,
                            padding_mask(mask), image_embeds=image_embeds, image_mask=image_mask,
                            deterministic=deterministic)
        return x

    def causal_lm(self, input_ids, attention_mask, query_cache: KVCache, *, deterministic=True):
        """ITG: multimodal causal text pass reusing the query pass's keys/values.

        input_ids / attention_mask [B, T] (LAVIS replaces [CLS] by [DEC] as the first token);
        query_cache from `query_features(..., return_cache=True)`. Returns logits [B, T, V] where
        position t predicts token t + 1."""
        self._require_text()
        if not self.with_lm_head:
            raise ValueError("causal_lm needs the LM head (QFormer(..., with_lm_head=True))")
        b, t = input_ids.shape
        n_q = query_cache[0][0].shape[1]
        to_queries = jnp.ones((b, 1, t, n_q), bool)
        to_text = causal_mask(t, t) & padding_mask(attention_mask)
        mask = jnp.concatenate([to_queries, jnp.broadcast_to(to_text, (b, 1, t, t))], axis=-1)
        x, _ = self._encode(self.embeddings(input_ids), 0, mask, prefix_kvs=query_cache,
                            deterministic=deterministic)
        return self.lm_head(x, self.embeddings)

    # -- heads ---------------------------------------------------------------------------------
    def image_embeds(self, query_output):
        """[B, Q, D] query features -> L2-normalised projections [B, Q, E] (ITC image side)."""
        return l2_normalize(self.vision_proj(query_output))

    def text_embeds(self, text_output):
        """[B, T, D] text features -> L2-normalised projection of [CLS] [B, E] (ITC text side)."""
        return l2_normalize(self.text_proj(text_output[:, 0]))

    def itc_similarity(self, image_embeds, text_embeds):
        """`itc_similarity` below (HF `logits_per_image`)."""
        return itc_similarity(image_embeds, text_embeds)

    def itm_logits(self, multimodal_output):
        """[B, Q + T, D] from `multimodal_features` -> [B, 2] (no-match, match), averaged over queries."""
        return self.itm_head(multimodal_output[:, :self.num_query_tokens]).mean(axis=1)

    def temperature(self):
        """The learnable ITC temperature, clipped to LAVIS's range."""
        return jnp.clip(self.temp, *TEMP_RANGE)

    def __call__(self, image_embeds, input_ids=None, attention_mask=None, image_mask=None, *,
                 deterministic=True):
        """Query features [B, Q, D]; with text also runs every pass and head (used by `init` to
        create all parameters) and returns a dict of their outputs."""
        if input_ids is None:
            return self.query_features(image_embeds, image_mask, deterministic=deterministic)
        q, cache = self.query_features(image_embeds, image_mask, deterministic=deterministic,
                                       return_cache=True)
        text = self.text_features(input_ids, attention_mask, deterministic=deterministic)
        mm = self.multimodal_features(image_embeds, input_ids, attention_mask, image_mask,
                                      deterministic=deterministic)
        img, txt = self.image_embeds(q), self.text_embeds(text)
        out = {"query_output": q, "text_output": text, "image_embeds": img, "text_embeds": txt,
               "itc_similarity": self.itc_similarity(img, txt), "itm_logits": self.itm_logits(mm),
               "temperature": self.temperature()}
        if self.with_lm_head:
            out["lm_logits"] = self.causal_lm(input_ids, attention_mask, cache, deterministic=deterministic)
        return out

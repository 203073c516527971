"""Initialise the Q-Former from a pre-trained BERT (paper §3.1: "initialized with the pre-trained
weights of BERT-base, whereas the cross-attention layers are randomly initialized").

From BERT: word and position embeddings, the embedding LayerNorm (our `layernorm`, which LAVIS
also applies to the queries), every layer's self-attention and FFN (the text FFN; the query FFN is
a copy of it, as LAVIS does), and the MLM head's transform and bias when the checkpoint has them
(`BertForPreTraining`/`BertForMaskedLM`). Fresh (normal 0.02, zero biases, unit LayerNorms):
cross-attention, query tokens, projections, ITM head, rows of added tokens (e.g. `[DEC]`).

One deliberate difference from LAVIS: BERT adds `token_type_embeddings[0]` to every token; the
Q-Former has no token types, so LAVIS silently drops it. We fold it into the position table so the
text path computes exactly BERT's function at initialisation.
"""
from __future__ import annotations

import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models.configs import Blip2Config
from blip2_jax.models.qformer import QFormer
from blip2_jax.weights.convert_vision import Reader


def normalize_bert_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept `BertModel` ("embeddings.…") and `BertFor*` ("bert.embeddings.…", "cls.…") names,
    and the old TF-style LayerNorm names (gamma/beta)."""
    out = {}
    for k, v in state_dict.items():
        k = k[len("bert."):] if k.startswith("bert.") else k
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = np.asarray(v)
    return out


def num_bert_layers(state_dict: Mapping[str, np.ndarray]) -> int:
    idx = [int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _create_every_param(module: QFormer, image, ids, mask):
    """One pass that touches every parameter (cheaper to compile than `__call__`'s four passes)."""
    if not module.config.use_qformer_text_input:
        return module.query_features(image)
    x = module.multimodal_features(image, ids, mask)
    q, t = x[:, :module.num_query_tokens], x[:, module.num_query_tokens:]
    out = (module.itm_logits(x), module.image_embeds(q), module.text_embeds(t), module.temperature())
    if module.with_lm_head:
        out += (module.lm_head(t, module.embeddings),)
    return out


def fresh_qformer_params(cfg: Blip2Config, rng, *, with_lm_head: bool = True, tie_lm_head: bool = True) -> dict:
    """Randomly initialised Q-Former params (numpy), the starting point the BERT weights overwrite."""
    qf = cfg.qformer
    model = QFormer(qf, cfg.num_query_tokens, cfg.image_text_hidden_size, with_lm_head=with_lm_head,
                    tie_lm_head=tie_lm_head)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    image = jnp.zeros((1, 1, qf.encoder_hidden_size), jnp.float32)
    ids, mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)
    init = jax.jit(lambda k: model.init(k, image, ids, mask, method=_create_every_param))
    return jax.tree.map(np.asarray, nn.unbox(init(key)["params"]))


def _pad_rows(bert: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """BERT's rows, then the fresh rows for tokens BERT does not have."""
    return np.concatenate([bert, fresh[bert.shape[0]:]], axis=0).astype(fresh.dtype)


def qformer_from_bert(bert_state_dict: Mapping[str, np.ndarray], cfg: Blip2Config, rng=0, *,
                      with_lm_head: bool = True, tie_lm_head: bool = True) -> dict:
    """BERT state dict (transformers names, numpy) -> `QFormer` params for `cfg`.

    The BERT must be at least as deep as the Q-Former (its first `num_hidden_layers` layers are
    used), have the same width/FFN size, no more vocabulary rows than `qformer.vocab_size` and at
    least `max_position_embeddings` positions. `rng`: int seed or PRNG key for the fresh parts.
    """
    qf = cfg.qformer
    sd = normalize_bert_names(bert_state_dict)
    n_bert = num_bert_layers(sd)
    if n_bert < qf.num_hidden_layers:
        raise ValueError(f"the BERT checkpoint has {n_bert} layers, fewer than the Q-Former's "
                         f"num_hidden_layers={qf.num_hidden_layers}")
    d, f = qf.hidden_size, qf.intermediate_size
    params = fresh_qformer_params(cfg, rng, with_lm_head=with_lm_head, tie_lm_head=tie_lm_head)
    r = Reader(sd)

    # Embeddings; BERT's token type 0 is folded into the positions (see the module docstring).
    word = sd.get("embeddings.word_embeddings.weight")
    if word is not None and (word.ndim != 2 or word.shape[1] != d or word.shape[0] > qf.vocab_size):
        raise ValueError(f"embeddings.word_embeddings.weight: checkpoint shape {word.shape} does not fit "
                         f"the Q-Former's ({qf.vocab_size}, {d})")
    pos = sd.get("embeddings.position_embeddings.weight")
    if pos is not None and (pos.ndim != 2 or pos.shape[1] != d or pos.shape[0] < qf.max_position_embeddings):
        raise ValueError(f"embeddings.position_embeddings.weight: checkpoint shape {pos.shape} has fewer "
                         f"than max_position_embeddings={qf.max_position_embeddings} rows of width {d}")
    if word is None or pos is None:
        r.get("embeddings.word_embeddings.weight", (qf.vocab_size, d))
        r.get("embeddings.position_embeddings.weight", (qf.max_position_embeddings, d))
        r.check()
    pos = pos[:qf.max_position_embeddings]
    if "embeddings.token_type_embeddings.weight" in sd:
        pos = pos + sd["embeddings.token_type_embeddings.weight"][0]
    params["layernorm"] = r.norm("embeddings.LayerNorm", d)
    if qf.use_qformer_text_input:
        params["embeddings"] = {"word_embeddings": _pad_rows(word, params["embeddings"]["word_embeddings"]),
                                "position_embeddings": pos.astype(np.float32)}

    for i in range(qf.num_hidden_layers):
        p, layer = f"encoder.layer.{i}.", params[f"layer_{i}"]
        layer["attention"] = {
            "query": r.dense(p + "attention.self.query", d, d),
            "key": r.dense(p + "attention.self.key", d, d),
            "value": r.dense(p + "attention.self.value", d, d),
            "dense": r.dense(p + "attention.output.dense", d, d),
            "layer_norm": r.norm(p + "attention.output.LayerNorm", d),
        }
        ffn = {"intermediate": r.dense(p + "intermediate.dense", d, f),
               "output": r.dense(p + "output.dense", f, d),
               "layer_norm": r.norm(p + "output.LayerNorm", d)}
        layer["query_ffn"] = jax.tree.map(np.copy, ffn)
        if qf.use_qformer_text_input:
            layer["text_ffn"] = ffn

    if "lm_head" in params and r.has("cls.predictions.transform.dense.weight"):
        head = params["lm_head"]
        head["transform"] = r.dense("cls.predictions.transform.dense", d, d)
        head["transform_norm"] = r.norm("cls.predictions.transform.LayerNorm", d)
        if r.has("cls.predictions.bias"):
            head["bias"] = _pad_rows(sd["cls.predictions.bias"], head["bias"])
        if "decoder" in head:  # untied: start from BERT's (tied) output embeddings
            dec = sd.get("cls.predictions.decoder.weight", word)
            head["decoder"] = {"kernel": _pad_rows(dec, head["decoder"]["kernel"].T).T}
    r.check()
    return params

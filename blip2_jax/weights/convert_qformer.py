"""transformers <-> blip2_jax weights for the Q-Former (`models/qformer.py`).

Names (relative to `prefix`), as in `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`:
`query_tokens` (1,Q,D); `qformer.layernorm`; `qformer.encoder.layer.N.{attention,crossattention}.
{attention.{query,key,value}, output.{dense,LayerNorm}}`, `...intermediate_query.dense`,
`...output_query.{dense,LayerNorm}` and, with text input, `...intermediate.dense`,
`...output.{dense,LayerNorm}`. With `use_qformer_text_input` also the retrieval model's
`embeddings.{word_embeddings,position_embeddings}.weight`, `vision_projection`, `text_projection`
and `itm_head`. `language_projection` belongs to the composite model, not here.

Two stage-1 parameters have no transformers name (HF's retrieval model drops them); they use LAVIS's:
`temp` (read when present, else `temp_init`; written by `to_hf(..., extras=True)`) and, with
`with_lm_head`, `cls.predictions.{transform.dense, transform.LayerNorm, bias, decoder.weight
(untied only)}` (required then; written with `extras=True`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from blip2_jax.models.configs import Blip2Config
from blip2_jax.models.qformer import TEMP_INIT
from blip2_jax.weights.convert_vision import Reader, dense_to_hf, norm_to_hf

ATTENTIONS = ("attention", "crossattention")
FFNS = (("query_ffn", "intermediate_query", "output_query"), ("text_ffn", "intermediate", "output"))


def _attention_to_flax(r: Reader, p: str, d: int, d_kv: int) -> dict:
    return {"query": r.dense(p + "attention.query", d, d), "key": r.dense(p + "attention.key", d_kv, d),
            "value": r.dense(p + "attention.value", d_kv, d), "dense": r.dense(p + "output.dense", d, d),
            "layer_norm": r.norm(p + "output.LayerNorm", d)}


def _layer_to_flax(r: Reader, p: str, i: int, cfg: Blip2Config) -> dict:
    qf = cfg.qformer
    d, f = qf.hidden_size, qf.intermediate_size
    layer = {"attention": _attention_to_flax(r, p + "attention.", d, d)}
    if qf.has_cross_attention(i):
        layer["crossattention"] = _attention_to_flax(r, p + "crossattention.", d, qf.encoder_hidden_size)
    for ours, inter, outp in FFNS:
        if ours == "text_ffn" and not qf.use_qformer_text_input:
            continue
        layer[ours] = {"intermediate": r.dense(p + inter + ".dense", d, f),
                       "output": r.dense(p + outp + ".dense", f, d),
                       "layer_norm": r.norm(p + outp + ".LayerNorm", d)}
    return layer


def to_flax(state_dict: Mapping[str, np.ndarray], cfg: Blip2Config, *, prefix: str = "",
            scan_layers: bool = True, with_lm_head: bool = False, tie_lm_head: bool = True,
            temp_init: float = TEMP_INIT) -> dict:
    """transformers state dict -> `QFormer` params. `scan_layers` is accepted for a uniform
    signature; the Q-Former's layers are always unrolled (`layer_{i}`): they are not identical."""
    del scan_layers
    qf = cfg.qformer
    d, q = qf.hidden_size, cfg.num_query_tokens
    r = Reader(state_dict, prefix)
    params = {"query_tokens": r.get("query_tokens", (1, q, d)),
              "layernorm": r.norm("qformer.layernorm", d)}
    for i in range(qf.num_hidden_layers):
        params[f"layer_{i}"] = _layer_to_flax(r, f"qformer.encoder.layer.{i}.", i, cfg)
    if qf.use_qformer_text_input:
        e = cfg.image_text_hidden_size
        params["embeddings"] = {
            "word_embeddings": r.get("embeddings.word_embeddings.weight", (qf.vocab_size, d)),
            "position_embeddings": r.get("embeddings.position_embeddings.weight", (qf.max_position_embeddings, d)),
        }
        params["vision_proj"] = r.dense("vision_projection", d, e)
        params["text_proj"] = r.dense("text_projection", d, e)
        params["itm_head"] = r.dense("itm_head", d, 2)
        params["temp"] = r.get("temp", ()) if r.has("temp") else np.asarray(temp_init, np.float32)
        if with_lm_head:
            head = {"transform": r.dense("cls.predictions.transform.dense", d, d),
                    "transform_norm": r.norm("cls.predictions.transform.LayerNorm", d),
                    "bias": r.get("cls.predictions.bias", (qf.vocab_size,))}
            if not tie_lm_head:
                head["decoder"] = {"kernel": r.get("cls.predictions.decoder.weight", (qf.vocab_size, d)).T}
            params["lm_head"] = head
    r.check()
    return params


def _attention_to_hf(a: Mapping, p: str, out: dict) -> None:
    for name in ("query", "key", "value"):
        dense_to_hf(a[name], f"{p}attention.{name}", out)
    dense_to_hf(a["dense"], p + "output.dense", out)
    norm_to_hf(a["layer_norm"], p + "output.LayerNorm", out)


def to_hf(params: Mapping, cfg: Blip2Config, *, prefix: str = "", extras: bool = False) -> dict[str, np.ndarray]:
    """`QFormer` params -> transformers state dict (exact inverse of `to_flax`). `extras` also
    writes `temp` and the LM head under their LAVIS names."""
    qf = cfg.qformer
    out: dict[str, np.ndarray] = {"query_tokens": np.asarray(params["query_tokens"])}
    norm_to_hf(params["layernorm"], "qformer.layernorm", out)
    for i in range(qf.num_hidden_layers):
        layer, p = params[f"layer_{i}"], f"qformer.encoder.layer.{i}."
        for name in ATTENTIONS:
            if name in layer:
                _attention_to_hf(layer[name], f"{p}{name}.", out)
        for ours, inter, outp in FFNS:
            if ours in layer:
                dense_to_hf(layer[ours]["intermediate"], p + inter + ".dense", out)
                dense_to_hf(layer[ours]["output"], p + outp + ".dense", out)
                norm_to_hf(layer[ours]["layer_norm"], p + outp + ".LayerNorm", out)
    if qf.use_qformer_text_input:
        out["embeddings.word_embeddings.weight"] = np.asarray(params["embeddings"]["word_embeddings"])
        out["embeddings.position_embeddings.weight"] = np.asarray(params["embeddings"]["position_embeddings"])
        dense_to_hf(params["vision_proj"], "vision_projection", out)
        dense_to_hf(params["text_proj"], "text_projection", out)
        dense_to_hf(params["itm_head"], "itm_head", out)
        if extras:
            out["temp"] = np.asarray(params["temp"])
            if "lm_head" in params:
                head = params["lm_head"]
                dense_to_hf(head["transform"], "cls.predictions.transform.dense", out)
                norm_to_hf(head["transform_norm"], "cls.predictions.transform.LayerNorm", out)
                out["cls.predictions.bias"] = np.asarray(head["bias"])
                if "decoder" in head:
                    out["cls.predictions.decoder.weight"] = np.asarray(head["decoder"]["kernel"]).T
    return {prefix + k: v for k, v in out.items()}

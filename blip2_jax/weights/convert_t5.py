"""transformers <-> blip2_jax weights for T5 / FlanT5 (`models/t5.py`).

transformers names (under `prefix`: "" for `T5ForConditionalGeneration`, "language_model."
inside `Blip2ForConditionalGeneration`; checked on transformers 5.23 files):
  shared.weight [V, D]           lm_head.weight [V, D] (untied checkpoints only)
  {encoder,decoder}.block.N.layer.0.SelfAttention.{q,k,v}.weight [H*Dh, D], .o.weight [D, H*Dh]
  {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, H]
  {encoder,decoder}.block.N.layer.0.layer_norm.weight
  decoder.block.N.layer.1.EncDecAttention.{q,k,v,o}.weight, decoder.block.N.layer.1.layer_norm.weight
  {encoder,decoder}.block.N.layer.{1 enc | 2 dec}.DenseReluDense.{wi_0, wi_1 | wi, wo}.weight
  {encoder,decoder}.block.N.layer.{1|2}.layer_norm.weight, {encoder,decoder}.final_layer_norm.weight
`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` (old files store copies of `shared`)
must equal `shared.weight`; `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`
(unused, some old files have it) is ignored, as transformers does. transformers 5 ties the head to `shared` when the file has no `lm_head.weight`, and
unties it when the file has one that differs: `resolve_tied_head` mirrors that on the config.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from blip2_jax.models.configs import T5Config
from blip2_jax.weights.common import Reader, same_values, stack_layers, unstack_layers

_QKVO = ("q", "k", "v", "o")
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def resolve_tied_head(state_dict: Mapping[str, np.ndarray], cfg: T5Config, *,
                      prefix: str = "") -> T5Config:
    """The config as transformers would load this file: an `lm_head.weight` that differs from
    `shared.weight` makes the head untied, a missing one ties it."""
    head, shared = state_dict.get(prefix + "lm_head.weight"), state_dict.get(prefix + "shared.weight")
    untied = head is not None and (shared is None or not same_values(np.asarray(head), np.asarray(shared)))
    return dataclasses.replace(cfg, tie_word_embeddings=not untied)


def _attn_to_flax(r: Reader, p: str, cfg: T5Config) -> dict:
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    out = {n: {"kernel": r.get(f"{p}{n}.weight", (inner, d))} for n in ("q", "k", "v")}
    out["o"] = {"kernel": r.get(p + "o.weight", (d, inner))}
    return out


def _ff_to_flax(r: Reader, p: str, cfg: T5Config) -> dict:
    d, f = cfg.d_model, cfg.d_ff
    names = ("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)
    out = {n: {"kernel": r.get(f"{p}{n}.weight", (f, d))} for n in names}
    out["wo"] = {"kernel": r.get(p + "wo.weight", (d, f))}
    return out


def _norm(r: Reader, name: str, cfg: T5Config) -> dict:
    return {"scale": r.get(name + ".weight", (cfg.d_model,))}


def _stack_to_flax(r: Reader, stack: str, cfg: T5Config, scan_layers: bool) -> dict:
    decoder = stack == "decoder"
    n = cfg.num_decoder_layers if decoder else cfg.num_layers
    layers = []
    for i in range(n):
        p = f"{stack}.block.{i}.layer."
        layer = {"self_attn_norm": _norm(r, p + "0.layer_norm", cfg),
                 "self_attn": _attn_to_flax(r, p + "0.SelfAttention.", cfg)}
        if decoder:
            layer["cross_attn_norm"] = _norm(r, p + "1.layer_norm", cfg)
            layer["cross_attn"] = _attn_to_flax(r, p + "1.EncDecAttention.", cfg)
        ff = p + ("2." if decoder else "1.")
        layer["ff_norm"] = _norm(r, ff + "layer_norm", cfg)
        layer["ff"] = _ff_to_flax(r, ff + "DenseReluDense.", cfg)
        layers.append(layer)
    out = {
        "relative_attention_bias": {"embedding": r.get(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg.relative_attention_num_buckets, cfg.num_heads))},
        "final_layer_norm": _norm(r, stack + ".final_layer_norm", cfg),
    }
    if scan_layers:
        out["layers"] = stack_layers(layers)
    else:
        out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return out


def to_flax(state_dict: Mapping[str, np.ndarray], cfg: T5Config, *, prefix: str = "",
            scan_layers: bool = True) -> dict:
    """transformers T5 state dict -> `T5ForConditionalGeneration` params (the tree under "params").

    `cfg.tie_word_embeddings` decides whether an `lm_head` is read (see `resolve_tied_head`)."""
    r = Reader(state_dict, prefix)
    v, d = cfg.vocab_size, cfg.d_model
    params = {
        "shared": {"embedding": r.get("shared.weight", (v, d))},
        "encoder": _stack_to_flax(r, "encoder", cfg, scan_layers),
        "decoder": _stack_to_flax(r, "decoder", cfg, scan_layers),
    }
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if r.has(alias) and not same_values(r.get(alias, (v, d)), params["shared"]["embedding"]):
            raise ValueError(f"{prefix}{alias} differs from {prefix}shared.weight (tied in T5)")
    if r.has(_UNUSED):
        r.get(_UNUSED, (cfg.relative_attention_num_buckets, cfg.num_heads))
    if cfg.tie_word_embeddings:
        if r.has("lm_head.weight") and not same_values(
                np.asarray(r.get("lm_head.weight", (v, d))), np.asarray(params["shared"]["embedding"])):
            raise ValueError(f"{prefix}lm_head.weight differs from {prefix}shared.weight but the config "
                             "ties them; use resolve_tied_head (or tie_word_embeddings=False)")
    else:
        params["lm_head"] = {"kernel": r.get("lm_head.weight", (v, d))}
    r.check()
    return params


def _attn_to_hf(params: Mapping, p: str, out: dict) -> None:
    for n in _QKVO:
        out[f"{p}{n}.weight"] = np.asarray(params[n]["kernel"])


def _stack_to_hf(params: Mapping, stack: str, cfg: T5Config, out: dict) -> None:
    decoder = stack == "decoder"
    n = cfg.num_decoder_layers if decoder else cfg.num_layers
    if "layers" in params:
        layers = unstack_layers(params["layers"], n)
    else:
        layers = [params[f"layers_{i}"] for i in range(n)]
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.asarray(
        params["relative_attention_bias"]["embedding"])
    out[f"{stack}.final_layer_norm.weight"] = np.asarray(params["final_layer_norm"]["scale"])
    for i, layer in enumerate(layers):
        p = f"{stack}.block.{i}.layer."
        out[p + "0.layer_norm.weight"] = np.asarray(layer["self_attn_norm"]["scale"])
        _attn_to_hf(layer["self_attn"], p + "0.SelfAttention.", out)
        if decoder:
            out[p + "1.layer_norm.weight"] = np.asarray(layer["cross_attn_norm"]["scale"])
            _attn_to_hf(layer["cross_attn"], p + "1.EncDecAttention.", out)
        ff = p + ("2." if decoder else "1.")
        out[ff + "layer_norm.weight"] = np.asarray(layer["ff_norm"]["scale"])
        for name, w in layer["ff"].items():
            out[f"{ff}DenseReluDense.{name}.weight"] = np.asarray(w["kernel"])


def to_hf(params: Mapping, cfg: T5Config, *, prefix: str = "") -> dict[str, np.ndarray]:
    """`T5ForConditionalGeneration` params (scanned or not) -> transformers state dict (inverse
    of `to_flax`; `lm_head.weight` only when untied, as transformers 5 saves)."""
    out = {"shared.weight": np.asarray(params["shared"]["embedding"])}
    if "lm_head" in params:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"])
    _stack_to_hf(params["encoder"], "encoder", cfg, out)
    _stack_to_hf(params["decoder"], "decoder", cfg, out)
    return {prefix + k: v for k, v in out.items()}

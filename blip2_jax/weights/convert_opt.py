"""transformers <-> blip2_jax weights for OPT (`models/opt.py`).

transformers names (under `prefix`: "" for `OPTForCausalLM`, "language_model." inside
`Blip2ForConditionalGeneration`, both checked on transformers 5.23 files):
  model.decoder.embed_tokens.weight [V, Dw]      model.decoder.embed_positions.weight [P + 2, D]
  model.decoder.project_in.weight [D, Dw], model.decoder.project_out.weight [Dw, D] (Dw != D only)
  model.decoder.layers.N.{self_attn.{q,k,v,out}_proj, fc1, fc2}.{weight [out, in], bias}
  model.decoder.layers.N.{self_attn_layer_norm, final_layer_norm}.{weight, bias}
  model.decoder.final_layer_norm.{weight, bias} (pre-LN only)
  lm_head.weight [V, Dw]: absent from tied checkpoints (save_pretrained drops it); read only when
  `tie_word_embeddings` is False.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from blip2_jax.models.configs import OPTConfig
from blip2_jax.weights.common import Reader, linear_to_hf, norm_to_hf, same_values, stack_layers, unstack_layers

_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _layer_to_flax(r: Reader, p: str, cfg: OPTConfig) -> dict:
    d, f = cfg.hidden_size, cfg.ffn_dim
    bias = cfg.enable_bias
    out = {
        "self_attn": {n: r.linear(f"{p}self_attn.{n}", d, d, bias) for n in _ATTN},
        "fc1": r.linear(p + "fc1", d, f, bias),
        "fc2": r.linear(p + "fc2", f, d, bias),
    }
    if cfg.layer_norm_elementwise_affine:
        out["self_attn_layer_norm"] = r.norm(p + "self_attn_layer_norm", d)
        out["final_layer_norm"] = r.norm(p + "final_layer_norm", d)
    return out


def to_flax(state_dict: Mapping[str, np.ndarray], cfg: OPTConfig, *, prefix: str = "",
            scan_layers: bool = True) -> dict:
    """transformers OPT state dict -> `OPTForCausalLM` params (the tree under "params")."""
    r = Reader(state_dict, prefix)
    p = "model.decoder."
    d, dw, v = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size
    params = {
        "embed_tokens": {"embedding": r.get(p + "embed_tokens.weight", (v, dw))},
        "embed_positions": {"embedding": r.get(p + "embed_positions.weight",
                                               (cfg.max_position_embeddings + 2, d))},
    }
    if dw != d:
        params["project_in"] = r.linear(p + "project_in", dw, d, False)
        params["project_out"] = r.linear(p + "project_out", d, dw, False)
    if cfg.do_layer_norm_before and cfg.layer_norm_elementwise_affine:
        params["final_layer_norm"] = r.norm(p + "final_layer_norm", d)
    if cfg.tie_word_embeddings:
        if r.has("lm_head.weight") and not same_values(
                np.asarray(r.get("lm_head.weight", (v, dw))), np.asarray(params["embed_tokens"]["embedding"])):
            raise ValueError(f"{prefix}lm_head.weight differs from the token embeddings but the config "
                             "ties them; set tie_word_embeddings=False to load an untied head")
    else:
        params["lm_head"] = r.linear("lm_head", dw, v, False)
    layers = [_layer_to_flax(r, f"{p}layers.{i}.", cfg) for i in range(cfg.num_hidden_layers)]
    if scan_layers:
        params["layers"] = stack_layers(layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    r.check()
    return params


def to_hf(params: Mapping, cfg: OPTConfig, *, prefix: str = "") -> dict[str, np.ndarray]:
    """`OPTForCausalLM` params (scanned or not) -> transformers state dict (inverse of `to_flax`;
    like `save_pretrained`, no `lm_head.weight` when it is tied)."""
    out: dict[str, np.ndarray] = {}
    p = "model.decoder."
    out[p + "embed_tokens.weight"] = np.asarray(params["embed_tokens"]["embedding"])
    out[p + "embed_positions.weight"] = np.asarray(params["embed_positions"]["embedding"])
    if "project_in" in params:
        linear_to_hf(params["project_in"], p + "project_in", out)
        linear_to_hf(params["project_out"], p + "project_out", out)
    if "final_layer_norm" in params:
        norm_to_hf(params["final_layer_norm"], p + "final_layer_norm", out)
    if "lm_head" in params:
        linear_to_hf(params["lm_head"], "lm_head", out)
    if "layers" in params:
        layers = unstack_layers(params["layers"], cfg.num_hidden_layers)
    else:
        layers = [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
    for i, layer in enumerate(layers):
        lp = f"{p}layers.{i}."
        for n in _ATTN:
            linear_to_hf(layer["self_attn"][n], f"{lp}self_attn.{n}", out)
        linear_to_hf(layer["fc1"], lp + "fc1", out)
        linear_to_hf(layer["fc2"], lp + "fc2", out)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            if n in layer:
                norm_to_hf(layer[n], lp + n, out)
    return {prefix + k: v for k, v in out.items()}

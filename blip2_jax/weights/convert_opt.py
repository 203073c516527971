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

import jax
import numpy as np

from blip2_jax.models.configs import OPTConfig

_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


class Reader:
    """Reads `prefix + name` tensors as numpy, naming missing keys and shape mismatches."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str = ""):
        self.state_dict, self.prefix = state_dict, prefix

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state_dict

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = self.prefix + name
        if key not in self.state_dict:
            near = sorted(k for k in self.state_dict if k.startswith(key.rsplit(".", 1)[0]))[:5]
            raise KeyError(f"missing tensor {key!r}" + (f" (present nearby: {near})" if near else ""))
        x = np.asarray(self.state_dict[key])
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(x.shape)}, the config expects {tuple(shape)}")
        return x

    def linear(self, name: str, d_in: int, d_out: int, bias: bool = True) -> dict:
        """torch Linear (weight [out, in]) -> Dense {"kernel" [in, out], "bias"}."""
        out = {"kernel": self.get(name + ".weight", (d_out, d_in)).T}
        if bias:
            out["bias"] = self.get(name + ".bias", (d_out,))
        return out

    def layer_norm(self, name: str, d: int) -> dict:
        return {"scale": self.get(name + ".weight", (d,)), "bias": self.get(name + ".bias", (d,))}


def stack_layers(layers: list[dict]) -> dict:
    """Per-layer trees -> one tree with a leading layer axis (the nn.scan layout)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def unstack_layers(stacked: Mapping, num_layers: int) -> list[dict]:
    return [jax.tree.map(lambda x: np.asarray(x)[i], stacked) for i in range(num_layers)]


def _layer_to_flax(r: Reader, p: str, cfg: OPTConfig) -> dict:
    d, f = cfg.hidden_size, cfg.ffn_dim
    bias = cfg.enable_bias
    out = {
        "self_attn": {n: r.linear(f"{p}self_attn.{n}", d, d, bias) for n in _ATTN},
        "fc1": r.linear(p + "fc1", d, f, bias),
        "fc2": r.linear(p + "fc2", f, d, bias),
    }
    if cfg.layer_norm_elementwise_affine:
        out["self_attn_layer_norm"] = r.layer_norm(p + "self_attn_layer_norm", d)
        out["final_layer_norm"] = r.layer_norm(p + "final_layer_norm", d)
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
        params["final_layer_norm"] = r.layer_norm(p + "final_layer_norm", d)
    if cfg.tie_word_embeddings:
        if r.has("lm_head.weight") and not np.array_equal(
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
    return params


def _linear_to_hf(params: Mapping, name: str, out: dict) -> None:
    out[name + ".weight"] = np.asarray(params["kernel"]).T
    if "bias" in params:
        out[name + ".bias"] = np.asarray(params["bias"])


def _norm_to_hf(params: Mapping, name: str, out: dict) -> None:
    out[name + ".weight"] = np.asarray(params["scale"])
    out[name + ".bias"] = np.asarray(params["bias"])


def to_hf(params: Mapping, cfg: OPTConfig, *, prefix: str = "") -> dict[str, np.ndarray]:
    """`OPTForCausalLM` params (scanned or not) -> transformers state dict (inverse of `to_flax`;
    like `save_pretrained`, no `lm_head.weight` when it is tied)."""
    out: dict[str, np.ndarray] = {}
    p = "model.decoder."
    out[p + "embed_tokens.weight"] = np.asarray(params["embed_tokens"]["embedding"])
    out[p + "embed_positions.weight"] = np.asarray(params["embed_positions"]["embedding"])
    if "project_in" in params:
        _linear_to_hf(params["project_in"], p + "project_in", out)
        _linear_to_hf(params["project_out"], p + "project_out", out)
    if "final_layer_norm" in params:
        _norm_to_hf(params["final_layer_norm"], p + "final_layer_norm", out)
    if "lm_head" in params:
        _linear_to_hf(params["lm_head"], "lm_head", out)
    if "layers" in params:
        layers = unstack_layers(params["layers"], cfg.num_hidden_layers)
    else:
        layers = [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
    for i, layer in enumerate(layers):
        lp = f"{p}layers.{i}."
        for n in _ATTN:
            _linear_to_hf(layer["self_attn"][n], f"{lp}self_attn.{n}", out)
        _linear_to_hf(layer["fc1"], lp + "fc1", out)
        _linear_to_hf(layer["fc2"], lp + "fc2", out)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            if n in layer:
                _norm_to_hf(layer[n], lp + n, out)
    return {prefix + k: v for k, v in out.items()}

"""transformers <-> blip2_jax weights for the vision towers (`models/vit.py`).

EVA (`kind="eva"`): `Blip2VisionModel` names under `prefix` (e.g. "vision_model." inside
`Blip2ForConditionalGeneration`): `embeddings.{class_embedding (1,1,D), position_embedding (1,N+1,D),
patch_embedding (D,3,p,p) + bias}`, `encoder.layers.N.{layer_norm1, self_attn.qkv (3D,D) with
qkv.bias = cat(q_bias, k_bias, v_bias), self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}`,
`post_layernorm`. The k-bias part of `qkv.bias` (zero in LAVIS and the released checkpoints; it
adds q.b_k, the same for every key, which the softmax cancels) is kept, so round trips are exact.

CLIP (`kind="clip"`): `CLIPVisionModel` names (prefix "vision_model." in `CLIPModel` checkpoints such
as openai/clip-vit-large-patch14; transformers 5 saves a bare `CLIPVisionModel` without it): `embeddings.{
class_embedding (D,), position_embedding.weight (N+1,D), patch_embedding.weight}` (no bias),
`pre_layrnorm`, `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1,
mlp.fc2}`. Layers at or beyond `num_hidden_layers` and CLIP's own `post_layernorm` (it normalises the
pooled CLS of the last layer) are not used and ignored. BLIP-2's `ln_vision` has no CLIP name: it is
read from `{prefix}ln_vision.{weight,bias}` when present, else set to identity (its initial value);
`to_hf(..., include_ln_vision=True)` writes it back.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from blip2_jax.models.configs import VisionConfig


from blip2_jax.weights.common import Reader, dense_to_hf, linear_to_hf, norm_to_hf, stack_layers, unstack_layers  # noqa: F401

# ----------------------------------------------------------------------------------------------
# Vision towers
# ----------------------------------------------------------------------------------------------


def _block_to_flax(r: Reader, p: str, cfg: VisionConfig) -> dict:
    d = cfg.hidden_size
    if cfg.kind == "eva":
        qkv = r.get(p + "self_attn.qkv.weight", (3 * d, d))
        attn = {"query": {"kernel": qkv[:d]}, "key": {"kernel": qkv[d:2 * d]},
                "value": {"kernel": qkv[2 * d:]}, "out": r.linear(p + "self_attn.projection", d, d)}
        if cfg.qkv_bias:
            bias = r.get(p + "self_attn.qkv.bias", (3 * d,))
            attn["query"]["bias"], attn["key"]["bias"], attn["value"]["bias"] = bias[:d], bias[d:2 * d], bias[2 * d:]
    else:
        attn = {name: r.linear(f"{p}self_attn.{hf}", d, d)
                for name, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                                 ("out", "out_proj"))}
    return {
        "layer_norm1": r.norm(p + "layer_norm1", d),
        "self_attn": attn,
        "layer_norm2": r.norm(p + "layer_norm2", d),
        "fc1": r.linear(p + "mlp.fc1", d, cfg.intermediate_size),
        "fc2": r.linear(p + "mlp.fc2", cfg.intermediate_size, d),
    }


def to_flax(state_dict: Mapping[str, np.ndarray], cfg: VisionConfig, *, prefix: str = "",
            scan_layers: bool = True) -> dict:
    """transformers state dict -> `VisionTransformer` params (see the module docstring)."""
    r = Reader(state_dict, prefix)
    d, p = cfg.hidden_size, cfg.patch_size
    n = cfg.num_patches + 1
    emb = "embeddings."
    if cfg.kind == "eva":
        embeddings = {
            "class_embedding": r.get(emb + "class_embedding", (1, 1, d)).reshape(d),
            "position_embedding": r.get(emb + "position_embedding", (1, n, d)).reshape(n, d),
            "patch_embedding": {"kernel": r.get(emb + "patch_embedding.weight", (d, 3, p, p)).transpose(2, 3, 1, 0),
                                "bias": r.get(emb + "patch_embedding.bias", (d,))},
        }
    elif cfg.kind == "clip":
        embeddings = {
            "class_embedding": r.get(emb + "class_embedding", (d,)),
            "position_embedding": r.get(emb + "position_embedding.weight", (n, d)),
            "patch_embedding": {"kernel": r.get(emb + "patch_embedding.weight", (d, 3, p, p)).transpose(2, 3, 1, 0)},
        }
    else:
        raise ValueError(f"unknown vision tower kind {cfg.kind!r}")
    layers = [_block_to_flax(r, f"encoder.layers.{i}.", cfg) for i in range(cfg.num_hidden_layers)]
    params = {"embeddings": embeddings}
    if cfg.kind == "clip":
        params["pre_layernorm"] = r.norm("pre_layrnorm", d)
        if r.has("ln_vision.weight"):
            params["post_layernorm"] = r.norm("ln_vision", d)
        else:
            params["post_layernorm"] = {"scale": np.ones((d,), np.float32), "bias": np.zeros((d,), np.float32)}
    else:
        params["post_layernorm"] = r.norm("post_layernorm", d)
    if scan_layers:
        params["layers"] = stack_layers(layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    r.check()
    return params


def _block_to_hf(layer: dict, p: str, cfg: VisionConfig, out: dict) -> None:
    attn = layer["self_attn"]
    if cfg.kind == "eva":
        out[p + "self_attn.qkv.weight"] = np.concatenate(
            [np.asarray(attn[n]["kernel"]) for n in ("query", "key", "value")], axis=0)
        if cfg.qkv_bias:
            out[p + "self_attn.qkv.bias"] = np.concatenate(
                [np.asarray(attn[n]["bias"]) for n in ("query", "key", "value")])
        linear_to_hf(attn["out"], p + "self_attn.projection", out)
    else:
        for name, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
            linear_to_hf(attn[name], f"{p}self_attn.{hf}", out)
    norm_to_hf(layer["layer_norm1"], p + "layer_norm1", out)
    norm_to_hf(layer["layer_norm2"], p + "layer_norm2", out)
    linear_to_hf(layer["fc1"], p + "mlp.fc1", out)
    linear_to_hf(layer["fc2"], p + "mlp.fc2", out)


def to_hf(params: Mapping, cfg: VisionConfig, *, prefix: str = "",
          include_ln_vision: bool = False) -> dict[str, np.ndarray]:
    """`VisionTransformer` params (scanned or not) -> transformers state dict (exact inverse of
    `to_flax`; for CLIP the `ln_vision` tensors are written only with `include_ln_vision`)."""
    out: dict[str, np.ndarray] = {}
    d = cfg.hidden_size
    emb = params["embeddings"]
    kernel = np.asarray(emb["patch_embedding"]["kernel"]).transpose(3, 2, 0, 1)
    if cfg.kind == "eva":
        out["embeddings.class_embedding"] = np.asarray(emb["class_embedding"]).reshape(1, 1, d)
        out["embeddings.position_embedding"] = np.asarray(emb["position_embedding"])[None]
        out["embeddings.patch_embedding.weight"] = kernel
        out["embeddings.patch_embedding.bias"] = np.asarray(emb["patch_embedding"]["bias"])
        norm_to_hf(params["post_layernorm"], "post_layernorm", out)
    else:
        out["embeddings.class_embedding"] = np.asarray(emb["class_embedding"])
        out["embeddings.position_embedding.weight"] = np.asarray(emb["position_embedding"])
        out["embeddings.patch_embedding.weight"] = kernel
        norm_to_hf(params["pre_layernorm"], "pre_layrnorm", out)
        if include_ln_vision:
            norm_to_hf(params["post_layernorm"], "ln_vision", out)
    if "layers" in params:
        layers = unstack_layers(params["layers"], cfg.num_hidden_layers)
    else:
        layers = [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
    for i, layer in enumerate(layers):
        _block_to_hf(layer, f"encoder.layers.{i}.", cfg, out)
    return {prefix + k: v for k, v in out.items()}

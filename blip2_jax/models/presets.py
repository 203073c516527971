"""Named presets for the released BLIP-2 variants (paper Table 2; HF `Salesforce/blip2-*`).

`PRESETS[name]` is a `Blip2Config`; `preset(name, **overrides)` returns one. Towers are listed
once and combined, so each number appears in one place.
"""
from __future__ import annotations

import dataclasses

from blip2_jax.models.configs import Blip2Config, OPTConfig, QFormerConfig, T5Config, VisionConfig

# EVA-CLIP ViT-g/14 without its last block (39 of 40).
EVA_VIT_G = VisionConfig(kind="eva", hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                         num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                         layer_norm_eps=1e-6, post_layernorm_eps=1e-6)
# OpenAI CLIP ViT-L/14 without its last block (23 of 24); ln_vision as in LAVIS (eps 1e-5).
CLIP_VIT_L = VisionConfig(kind="clip", hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, post_layernorm_eps=1e-5)

QFORMER_BASE = QFormerConfig()  # BERT-base, cross-attention every 2nd layer
QFORMER_BASE_TEXT = dataclasses.replace(QFORMER_BASE, use_qformer_text_input=True)

OPT_2_7B = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                     word_embed_proj_dim=2560)
OPT_6_7B = OPTConfig(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                     word_embed_proj_dim=4096)
FLAN_T5_XL = T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32)
FLAN_T5_XXL = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64)


def _blip2(vision, text, qformer=QFORMER_BASE) -> Blip2Config:
    return Blip2Config(vision=vision, qformer=dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size),
                       text=text, num_query_tokens=32)


PRESETS: dict[str, Blip2Config] = {
    # stage-1 / retrieval (HF blip2-itm-vit-g)
    "pretrain_vitg": _blip2(EVA_VIT_G, None, QFORMER_BASE_TEXT),
    "pretrain_vitl": _blip2(CLIP_VIT_L, None, QFORMER_BASE_TEXT),
    # stage-2 (HF blip2-opt-*, blip2-flan-t5-*)
    "vitl_opt2.7b": _blip2(CLIP_VIT_L, OPT_2_7B),
    "vitg_opt2.7b": _blip2(EVA_VIT_G, OPT_2_7B),
    "vitg_opt6.7b": _blip2(EVA_VIT_G, OPT_6_7B),
    "vitl_flant5xl": _blip2(CLIP_VIT_L, FLAN_T5_XL),
    "vitg_flant5xl": _blip2(EVA_VIT_G, FLAN_T5_XL),
    "vitg_flant5xxl": _blip2(EVA_VIT_G, FLAN_T5_XXL),
}

# Paper Table 2 (trainable / total parameters), for the parameter-count test and the README.
PAPER_PARAMS = {
    "vitl_opt2.7b": (104e6, 3.1e9),
    "vitg_opt2.7b": (107e6, 3.8e9),
    "vitg_opt6.7b": (108e6, 7.8e9),
    "vitl_flant5xl": (103e6, 3.4e9),
    "vitg_flant5xl": (107e6, 4.1e9),
    "vitg_flant5xxl": (108e6, 12.1e9),
}


def preset(name: str, **overrides) -> Blip2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides)


def dump_hf_configs(path: str) -> None:
    """Writes the transformers config.json of each preset with a transformers counterpart (EVA
    towers; CLIP ViT-L has none) to one JSON file (used by tools/reference_param_counts.py)."""
    import json
    out = {n: c.to_hf() for n, c in PRESETS.items() if c.vision.kind == "eva"}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)

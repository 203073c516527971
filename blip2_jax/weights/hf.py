"""transformers-format BLIP-2 directories in and out.

`read_lazy(dir)` validates `config.json` (types and the model's arithmetic, `models/configs.py`)
and the safetensors files (`safetensors_io.py`), and converts the tensors of
`Blip2ForConditionalGeneration` (OPT or T5) or `Blip2ForImageTextRetrieval` into our parameter
tree *lazily*: every missing, unexpected or misshapen tensor is reported (one line naming the file
and tensor) before a byte of weights is read. `LazyCheckpoint.place(shardings, dtype)` then puts
it on devices one tensor at a time (`placement.py`: peak host memory about the placed weights);
`load(dir)` gives numpy. `save(dir, ...)` writes a directory that transformers' `from_pretrained`
reads; a load -> save round trip reproduces every tensor exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from blip2_jax import files, quant
from blip2_jax.models.configs import Blip2Config, Limits, OPTConfig, T5Config, check_generation_config
from blip2_jax.weights import convert_opt, convert_qformer, convert_t5, convert_vision, placement, quantized
from blip2_jax.weights.common import TensorShapeError
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError, open_checkpoint, save_state_dict

SUPPORTED_MODEL_TYPES = ("blip-2",)
# Files copied along when saving next to converted weights (tokenizer, processor, generation).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "vocab.txt", "spiece.model", "added_tokens.json", "preprocessor_config.json",
              "processor_config.json", "generation_config.json", "chat_template.json")


def read_config(directory: str, limits: Limits | None = None) -> tuple[Blip2Config, dict[str, Any]]:
    """-> (our config, the raw config.json dict), validated (`Blip2Config.from_hf`). Errors are
    one line naming the file and the problem."""
    if not os.path.isdir(directory):
        raise WeightsError(f"model directory not found: {directory}")
    if not os.path.lexists(os.path.join(directory, "config.json")):
        raise WeightsError(f"{directory}: no config.json (not a transformers-format model directory)")
    path = os.path.join(directory, "config.json")
    raw = files.read_json_object(path, WeightsError, "config.json")
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise WeightsError(f"{directory}: unsupported model type {mt!r:.60} "
                           f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return Blip2Config.from_hf(raw, limits), raw
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None


def read_generation_config(directory: str, cfg: Blip2Config, limits: Limits | None = None) -> dict:
    """generation_config.json as a checked dict ({} when absent or for retrieval models)."""
    if cfg.text is None or not os.path.lexists(os.path.join(directory, "generation_config.json")):
        return {}
    path = os.path.join(directory, "generation_config.json")
    raw = files.read_json(path, WeightsError, "generation_config.json")
    try:
        return check_generation_config(raw, cfg.text.vocab_size, limits)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


@dataclasses.dataclass
class LazyCheckpoint:
    """A validated transformers directory whose tensors have not been read yet.

    `tree`: our parameter tree, leaves are views of the memory-mapped files (`LayerStack`s when
    scanned). `numpy(dtype)` / `place(shardings, dtype)` read it one tensor at a time."""
    directory: str
    config: Blip2Config
    raw_config: dict
    state_dict: LazyStateDict
    tree: dict
    quantization: str = "none"  # the stored mode of a quantized checkpoint (`weights/quantized.py`)

    def quantized_mode(self, requested: str | None) -> str:
        """The mode the towers are placed in: the stored one, or `requested` for float files."""
        if self.quantization == "none":
            return quant.check_mode(requested)
        if requested not in (None, self.quantization):
            raise WeightsError(f"{self.directory}: the checkpoint is quantized to {self.quantization}; it cannot "
                               f"be loaded as {requested} (quantize the float checkpoint instead)")
        return self.quantization

    def dtype_of(self, dtype: Any = None):
        """The per-leaf dtype rule: as stored (None), else `placement.target_dtype`."""
        if dtype is None:
            return lambda path, leaf: leaf.dtype
        return lambda path, leaf: placement.target_dtype(path, dtype)

    def numpy(self, dtype: Any = None) -> dict:
        """Params as numpy (`dtype`: the frozen towers' dtype; None keeps the file's dtypes)."""
        return placement.materialize(self.tree, self.dtype_of(dtype), self.state_dict.release)

    def place(self, shardings: Mapping, dtype: Any = np.float32, quantize: str = "none",
              bands=None) -> dict:
        """Params as jax.Arrays with `shardings`, frozen towers' matrices in `dtype`; with
        `quantize` ("int8", "int4") their kernels quantized on the way, with `bands` some laid
        out in input bands (`placement.place`)."""
        try:
            return placement.place(self.tree, shardings, self.dtype_of(dtype), self.state_dict.release,
                                   quantize, bands)
        except ValueError as e:
            raise WeightsError(f"{self.directory}: {e}") from None


def read_lazy(directory: str, *, scan_layers: bool = True, qformer_lm_head: bool = False,
              limits: Limits | None = None, vision_scan_layers: bool | None = None) -> LazyCheckpoint:
    """Validates a transformers-format directory and converts its tensors lazily (see the
    module docstring). Reads only the tensors that decide whether a head is tied.
    `vision_scan_layers`: the image tower's layers stacked or not (None: as `scan_layers`)."""
    directory = os.fspath(directory)
    limits = limits or Limits.from_env()
    cfg, raw = read_config(directory, limits)
    sd = open_checkpoint(directory, limits.max_tensors)
    if isinstance(cfg.text, T5Config):  # tied or not is decided by the file, as transformers does
        cfg = dataclasses.replace(cfg, text=convert_t5.resolve_tied_head(sd, cfg.text, prefix="language_model."))
    mode = quantized.stored_mode(raw, os.path.join(directory, "config.json"))
    if mode == "none":
        tree = lazy_params(sd, cfg, qformer_lm_head=qformer_lm_head, where=directory)
    else:
        tree = quantized.lazy_quantized_params(
            sd, cfg, mode, lambda view: lazy_params(view, cfg, qformer_lm_head=qformer_lm_head, where=directory),
            directory)
    sd.release()  # pages the tied-head comparisons read
    vision_scan = scan_layers if vision_scan_layers is None else vision_scan_layers
    stacked = {k: placement.stack_lazily(v) if (vision_scan if k == "vision_model" else scan_layers)
               and isinstance(v, dict) else v for k, v in tree.items()}
    return LazyCheckpoint(directory, cfg, raw, sd, stacked, mode)


def lazy_params(sd: Mapping[str, np.ndarray], cfg: Blip2Config, *, qformer_lm_head: bool = False,
                where: str = "") -> dict:
    """A transformers state dict -> our nested params with unrolled layers, as views of `sd`'s
    arrays. Raises WeightsError listing every missing tensor, every unexpected one, or a
    mismatch naming the file, the tensor and both shapes."""
    seen = _Tracking(sd)
    parts: dict[str, Any] = {}
    problems: list[str] = []
    prefix = f"{where}: " if where else ""

    def convert(name, fn, *a, **kw):
        try:
            parts[name] = fn(seen, *a, **kw)
        except KeyError as e:
            problems.append(str(e.args[0]) if e.args else str(e))
        except TensorShapeError as e:
            file_of = getattr(sd, "file_of", None)
            raise WeightsError(f"{file_of(e.name) if file_of else where or 'checkpoint'}: tensor {e} "
                               "(config.json does not fit this checkpoint)") from None
        except ValueError as e:
            raise WeightsError(f"{prefix}{e}") from None

    convert("vision_model", convert_vision.to_flax, cfg.vision, prefix="vision_model.", scan_layers=False)
    convert("qformer", convert_qformer.to_flax, cfg, prefix="", with_lm_head=qformer_lm_head)
    if cfg.text is not None:
        convert("language_projection", _linear_to_flax, "language_projection", cfg.qformer.hidden_size,
                cfg.text.hidden_size)
        module = convert_opt if isinstance(cfg.text, OPTConfig) else convert_t5
        convert("language_model", module.to_flax, cfg.text, prefix="language_model.", scan_layers=False)
    if problems:
        raise WeightsError(f"{prefix}missing tensors: " + "; ".join(problems))
    unexpected = sorted(set(sd) - seen.read)
    if unexpected:
        more = f" (and {len(unexpected) - 20} more)" if len(unexpected) > 20 else ""
        raise WeightsError(f"{prefix}unexpected tensors in the checkpoint: {', '.join(unexpected[:20])}{more}")
    return parts


def params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: Blip2Config, *, scan_layers: bool = True,
                           qformer_lm_head: bool = False) -> dict:
    """A transformers state dict (any Mapping, read lazily) -> our nested params (numpy, dtypes
    as stored). Errors as `lazy_params`."""
    tree = lazy_params(sd, cfg, qformer_lm_head=qformer_lm_head)
    tree = placement.stack_lazily(tree) if scan_layers else tree
    return placement.materialize(tree, lambda path, leaf: leaf.dtype, getattr(sd, "release", lambda a: None))


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
    """A transformers-format directory -> (config, params as numpy), read one tensor at a time.
    `frozen_dtype`: the frozen towers' matrices in that dtype and everything else float32
    (`placement.target_dtype`), whatever the file's dtype; None keeps the stored dtypes."""
    ckpt = read_lazy(directory, scan_layers=scan_layers, qformer_lm_head=qformer_lm_head)
    return ckpt.config, ckpt.numpy(frozen_dtype)


def save(directory: str, cfg: Blip2Config, params: Mapping, *, raw_config: dict | None = None,
         side_files_from: str | None = None, dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json + safetensors (sharded past `max_shard_bytes`), plus the tokenizer /
    processor files of `side_files_from`. `raw_config` (the source's config.json) is kept and
    updated so fields we do not model survive the round trip."""
    sd = state_dict_from_params(params, cfg)
    if dtype is not None:
        sd = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in sd.items()}
    else:
        sd = {k: np.asarray(v) for k, v in sd.items()}
    raw_config = {k: v for k, v in (raw_config or {}).items() if k != "quantization_config"}
    save_state_dict_dir(directory, sd, cfg, raw_config=raw_config, side_files_from=side_files_from,
                        max_shard_bytes=max_shard_bytes)


def save_quantized(directory: str, cfg: Blip2Config, params: Mapping, mode: str, *, raw_config: dict | None = None,
                   side_files_from: str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a quantized checkpoint (format: `weights/quantized.py`) of params whose frozen
    towers' kernels are `qwix.QArray`s (`blip2_jax.load(..., quantize=mode)`)."""
    sd = quantized.state_dict(params, cfg, quant.check_mode(mode), lambda tree: state_dict_from_params(tree, cfg))
    raw = dict(raw_config or {}, quantization_config=quantized.config_entry(mode))
    save_state_dict_dir(directory, sd, cfg, raw_config=raw, side_files_from=side_files_from,
                        max_shard_bytes=max_shard_bytes)


def save_state_dict_dir(directory: str, sd: Mapping[str, np.ndarray], cfg: Blip2Config, *,
                        raw_config: dict | None = None, side_files_from: str | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes tensors + config.json (+ side files) as `save` does."""
    os.makedirs(directory, exist_ok=True)
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
        self.allows_int8 = getattr(sd, "allows_int8", False)  # a quantized checkpoint's kernels

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

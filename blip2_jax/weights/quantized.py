"""Quantized checkpoints: a transformers-format directory whose frozen towers' linear weights
are stored quantized, with their scales beside them (quantize once, load many times).

Format (`FORMAT_VERSION` 1):
- `config.json` gains `"quantization_config": {"quant_method": "blip2_jax", "qtype": "int8" |
  "int4", "scheme": "weight_only_absmax_per_output_channel", "scale_suffix": "_scale",
  "format_version": 1}`.
- Every linear weight `quant.rules` selects (the ViT's and the LLM's attention and FFN matrices;
  EVA's fused `qkv.weight` as one tensor) is stored as `NAME` int8 [out, in] (torch's Linear
  layout; int4 values take one byte each, as safetensors has no 4-bit type) and `NAME_scale`
  float32 [out]: w = NAME * NAME_scale[:, None].
- Every other tensor (the Q-Former, projection, norms, biases, embeddings, LM head) is stored
  as in a float checkpoint. transformers itself cannot read these files.
Loading validates it all before reading a weight: a scale without its tensor, a quantized tensor
without its scale, a scale of the wrong shape or type, or a quantized tensor where the policy
keeps floats (e.g. the Q-Former) is one line naming the tensor.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from blip2_jax import quant
from blip2_jax.weights import placement
from blip2_jax.weights.safetensors_io import WeightsError

QUANT_METHOD = "blip2_jax"
SCHEME = "weight_only_absmax_per_output_channel"
SCALE_SUFFIX = "_scale"
FORMAT_VERSION = 1


def config_entry(mode: str) -> dict:
    """The `quantization_config` written into config.json."""
    return {"quant_method": QUANT_METHOD, "qtype": quant.check_mode(mode), "scheme": SCHEME,
            "scale_suffix": SCALE_SUFFIX, "format_version": FORMAT_VERSION}


def stored_mode(raw_config: Mapping, where: str) -> str:
    """'none' for a float checkpoint, else the stored qtype (the entry is checked field by field)."""
    entry = raw_config.get("quantization_config")
    if entry is None:
        return "none"
    want = config_entry("int8")
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        method = entry.get("quant_method") if isinstance(entry, dict) else entry
        raise WeightsError(f"{where}: quantization_config.quant_method {method!r:.60} is not supported "
                           f"(only {QUANT_METHOD!r} checkpoints, written by blip2_jax)")
    for key in ("scheme", "scale_suffix", "format_version"):
        if entry.get(key) != want[key]:
            raise WeightsError(f"{where}: quantization_config.{key} is {entry.get(key)!r:.60}, expected {want[key]!r}")
    if entry.get("qtype") not in ("int8", "int4"):
        raise WeightsError(f"{where}: quantization_config.qtype {entry.get('qtype')!r:.60} is not int8 or int4")
    return entry["qtype"]


def check_scales(sd, where: str) -> set[str]:
    """Every int8 tensor has its float32 [out] scale and every scale its int8 tensor -> the names
    of the quantized tensors. `sd`: a LazyStateDict (headers only are read)."""
    quantized = {n for n in sd if np.dtype(sd.dtype(n)) == np.int8}
    for name in sd:
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] not in quantized:
            raise WeightsError(f"{sd.file_of(name)}: tensor {name}: a scale without its int8 tensor "
                               f"{name[:-len(SCALE_SUFFIX)]}")
    for name in sorted(quantized):
        scale = name + SCALE_SUFFIX
        if scale not in sd:
            raise WeightsError(f"{sd.file_of(name)}: tensor {name} is int8 but its scale {scale} is missing")
        want = (sd.shape(name)[0],) if sd.shape(name) else None
        if len(sd.shape(name)) != 2 or tuple(sd.shape(scale)) != want or np.dtype(sd.dtype(scale)) != np.float32:
            raise WeightsError(f"{sd.file_of(scale)}: tensor {scale}: {np.dtype(sd.dtype(scale)).name} "
                               f"{tuple(sd.shape(scale))}, expected float32 {want} for {name} "
                               f"{tuple(sd.shape(name))}")
    return quantized


class QuantizedView(Mapping):
    """A state dict as the converters see it: int8 tensors allowed, scales hidden."""
    allows_int8 = True

    def __init__(self, sd: Mapping):
        self.sd = sd
        self.names = [n for n in sd if not n.endswith(SCALE_SUFFIX)]

    def __getitem__(self, name):
        if name.endswith(SCALE_SUFFIX):
            raise KeyError(name)
        return self.sd[name]

    def __contains__(self, name):
        return name in self.sd and not name.endswith(SCALE_SUFFIX)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __getattr__(self, name):  # file_of, release, shape, dtype
        return getattr(self.sd, name)


class _Broadcast(Mapping):
    """Each quantized tensor as its scale broadcast over the input (zero-copy, float32), any
    other tensor as a zero placeholder: converting this tree puts each scale where its weight
    goes (`tags`: each tensor's index instead, to name the tensor behind a parameter)."""

    def __init__(self, sd: Mapping, quantized: set[str], tags: bool = False):
        self.sd, self.quantized, self.tags = sd, quantized, tags
        self.names = [n for n in sd if not n.endswith(SCALE_SUFFIX)]
        self.index = {n: i for i, n in enumerate(self.names)}

    def __getitem__(self, name):
        shape = tuple(self.sd.shape(name))
        if self.tags:
            return np.broadcast_to(np.float32(self.index[name]), shape)
        if name in self.quantized:
            return np.broadcast_to(np.asarray(self.sd[name + SCALE_SUFFIX], np.float32)[:, None], shape)
        return np.broadcast_to(np.float32(0), shape)

    def __contains__(self, name):
        return name in self.index

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def lazy_quantized_params(sd, cfg, mode: str, convert, where: str) -> dict:
    """A quantized checkpoint -> our tree (unrolled layers) whose quantized kernels are
    `placement.Quantized(qvalue [out, in], scale [out, 1])` views. `convert(mapping)` runs the
    converters (`hf.lazy_params`) over a state-dict view."""
    quantized = check_scales(sd, where)
    values = placement.flatten(convert(QuantizedView(sd)))
    scales = placement.flatten(convert(_Broadcast(sd, quantized)))
    out, wrong = {}, []
    for path, leaf in values.items():
        is_int8 = np.dtype(leaf.dtype) == np.int8
        if is_int8 != (quant.qtype_of(path, mode) is not None):
            wrong.append((path, is_int8))
        elif is_int8:
            out[path] = placement.Quantized(leaf, scales[path][:, :1])
        else:
            out[path] = leaf
    if wrong:
        tags = placement.flatten(convert(_Broadcast(sd, quantized, tags=True)))
        names = _Broadcast(sd, quantized).names
        path, is_int8 = wrong[0]
        name = names[int(np.asarray(tags[path]).flat[0])]
        what = ("is int8, but this parameter keeps its floating-point dtype (only the frozen towers' "
                "linear weights are quantized)" if is_int8 else f"is not quantized, but the checkpoint is {mode}")
        raise WeightsError(f"{sd.file_of(name)}: tensor {name} ({'/'.join(path)}) {what}")
    return placement.unflatten(out)


# ------------------------------------------------------------------------------ saving
def state_dict(params: Mapping, cfg, mode: str, to_hf) -> dict[str, np.ndarray]:
    """Our params with QArray kernels -> the tensors of the format above. `to_hf(tree)` is
    `hf.state_dict_from_params` (run twice: once over the int8 values, once over the scales
    broadcast like their weights; the values tell which tensors are quantized)."""
    flat = placement.flatten(params)
    values, scales = {}, {}
    for path, leaf in flat.items():
        if quant.is_quantized(leaf):
            qv = np.asarray(leaf.qvalue)
            qv = qv.astype(np.int8) if qv.dtype != np.int8 else qv  # int4: one value per byte
            values[path] = qv
            scales[path] = np.broadcast_to(np.asarray(leaf.scale, np.float32), qv.shape)
        else:
            values[path] = scales[path] = np.asarray(leaf)
    sd_values = to_hf(placement.unflatten(values))
    sd_scales = to_hf(placement.unflatten(scales))
    out = {}
    for name, v in sd_values.items():
        out[name] = np.ascontiguousarray(v)
        if v.dtype == np.int8:
            out[name + SCALE_SUFFIX] = np.ascontiguousarray(np.asarray(sd_scales[name])[:, 0], np.float32)
    return out

"""The authors' LAVIS checkpoints -> transformers' BLIP-2 tensor names.

LAVIS `.pth` files (or the same tensors, LAVIS-named, in a `.safetensors` file) are renamed to the
names of transformers' `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`, so that the
`convert_*` modules of this package turn them into our params.

Layouts (`kind`, named after LAVIS's model classes):
  "blip2_qformer"  stage 1: `Blip2Qformer`, `Blip2ITM` (blip2_pretrained.pth, blip2_pretrained_vitL.pth,
                   blip2_finetune_coco.pth) -> retrieval-model names plus two extras (below).
  "blip2_opt"      `Blip2OPT` (blip2_pretrained_opt2.7b.pth, blip2_caption_opt2.7b.pth, ...).
  "blip2_t5"       `Blip2T5` (blip2_pretrained_flant5xl.pth, blip2_caption_flant5xl.pth, ...).
  "eva_vit_g"      the frozen EVA-CLIP ViT-g LAVIS downloads separately (eva_vit_g.pth): its
                   `VisionTransformer` names, without the `visual_encoder.` prefix.

Renames, LAVIS -> transformers:
  visual_encoder.{cls_token, pos_embed, patch_embed.proj}
      -> vision_model.embeddings.{class_embedding, position_embedding, patch_embedding}
  visual_encoder.blocks.N.{norm1, norm2, attn.qkv.weight, attn.proj, mlp.fc1, mlp.fc2}
      -> vision_model.encoder.layers.N.{layer_norm1, layer_norm2, self_attn.qkv.weight,
         self_attn.projection, mlp.fc1, mlp.fc2}
  visual_encoder.blocks.N.attn.{q_bias, v_bias}
      -> ...self_attn.qkv.bias = cat(q_bias, zeros, v_bias)  (EVA has no key bias; LAVIS adds zeros too)
  ln_vision -> vision_model.post_layernorm (EVA); with vision="clip" -> vision_model.ln_vision (the name
      `convert_vision` reads for CLIP towers: transformers' CLIP has no such layer)
  query_tokens -> query_tokens;  Qformer.bert.embeddings.LayerNorm -> qformer.layernorm
  Qformer.bert.encoder.layer.N.{attention, crossattention}.self.X -> qformer.encoder.layer.N.{..}.attention.X
  Qformer.bert.encoder.layer.N.<other> -> qformer.encoder.layer.N.<other>
  Qformer.bert.embeddings.{word, position}_embeddings -> embeddings.{word, position}_embeddings  (stage 1)
  vision_proj, text_proj, itm_head -> vision_projection, text_projection, itm_head  (stage 1)
  opt_proj, t5_proj -> language_projection;  opt_model.*, t5_model.* -> language_model.*
Stage-1 tensors without a transformers name (transformers' retrieval model drops them) keep LAVIS's
names, which `convert_qformer` reads: `temp` (ITC temperature, shape ()) and `cls.predictions.*`
(the ITG LM head: bias, transform.dense, transform.LayerNorm, decoder.weight); `split_extras`
separates them.
Not converted (listed in `LavisCheckpoint.dropped`): `Qformer.bert.embeddings.position_ids` (a buffer,
arange); `Qformer.cls.predictions.decoder.bias` (in LAVIS the same Parameter as `predictions.bias`);
ViT blocks at or beyond `num_vision_layers` and a ViT's own final `norm`/`fc_norm`/`head` (BLIP-2
uses the second-to-last block's output, no final norm: LAVIS builds 39 of eva_vit_g.pth's blocks).
Tied pairs may come with one member only (e.g. after a safetensors export that drops shared
tensors): the word embeddings are taken from `decoder.weight` and the LM bias from `decoder.bias`.

What LAVIS checkpoints lack: LAVIS saves only parameters that require gradients, so the frozen LLM is
never in them (-> "language_model." in `absent`: take it from transformers' facebook/opt-* or
google/flan-t5-* weights), and the ViT only in models trained with `freeze_vit: False`
(caption_coco_*, blip2_finetune_coco); otherwise `absent` names the vision tower (eva_vit_g.pth, or
transformers' CLIP ViT-L for the vitL variants). OPT/T5 models have no Q-Former text path.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np

from blip2_jax.weights.safetensors_io import WeightsError

KINDS = ("blip2_qformer", "blip2_opt", "blip2_t5", "eva_vit_g")
EXTRA_NAMES = ("temp", "cls.predictions.")  # stage-1 extras: exact name or prefix
VISION_ABSENT = ("vision_model.embeddings.", "vision_model.encoder.")
_SHOW = 12  # how many names an error message lists

_W = r"(weight|bias)"
# ViT names relative to the tower's prefix. QV marks the two halves of the fused qkv bias.
_VISION_RULES = [
    (r"cls_token", "vision_model.embeddings.class_embedding"),
    (r"pos_embed", "vision_model.embeddings.position_embedding"),
    (rf"patch_embed\.proj\.{_W}", r"vision_model.embeddings.patch_embedding.\1"),
    (rf"blocks\.(\d+)\.norm([12])\.{_W}", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (rf"blocks\.(\d+)\.attn\.proj\.{_W}", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (rf"blocks\.(\d+)\.mlp\.(fc[12])\.{_W}", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.attn\.([qv])_bias", "QV"),
]
_VISION_UNUSED = re.compile(r"(norm|fc_norm|head)\.(weight|bias)")
_BLOCK = re.compile(r"blocks\.(\d+)\.")

_QF = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_QFORMER_RULES = [
    (r"query_tokens", "query_tokens"),
    (rf"Qformer\.bert\.embeddings\.LayerNorm\.{_W}", r"qformer.layernorm.\1"),
    (rf"{_QF}(attention|crossattention)\.self\.(query|key|value)\.{_W}",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (rf"{_QF}(attention|crossattention)\.output\.(dense|LayerNorm)\.{_W}",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (rf"{_QF}(intermediate_query\.dense|output_query\.dense|output_query\.LayerNorm)\.{_W}",
     r"qformer.encoder.layer.\1.\2.\3"),
]
_TEXT_RULES = [  # the Q-Former's text path and the stage-1 heads
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"embeddings.\1.weight"),
    (rf"{_QF}(intermediate\.dense|output\.dense|output\.LayerNorm)\.{_W}", r"qformer.encoder.layer.\1.\2.\3"),
    (rf"vision_proj\.{_W}", r"vision_projection.\1"),
    (rf"text_proj\.{_W}", r"text_projection.\1"),
    (rf"itm_head\.{_W}", r"itm_head.\1"),
    (r"temp", "temp"),
    (rf"Qformer\.cls\.predictions\.(bias|transform\.dense\.{_W}|transform\.LayerNorm\.{_W}|decoder\.weight)",
     r"cls.predictions.\1"),
]
_LM_RULES = {
    "blip2_opt": [(rf"opt_proj\.{_W}", r"language_projection.\1"), (r"opt_model\.(.+)", r"language_model.\1")],
    "blip2_t5": [(rf"t5_proj\.{_W}", r"language_projection.\1"), (r"t5_model\.(.+)", r"language_model.\1")],
}
_DROPPED = {"blip2_qformer": ("Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.bias"),
            "blip2_opt": ("Qformer.bert.embeddings.position_ids",), "blip2_t5": ("Qformer.bert.embeddings.position_ids",),
            "eva_vit_g": ()}
_TIES = (("Qformer.bert.embeddings.word_embeddings.weight", "Qformer.cls.predictions.decoder.weight"),
         ("Qformer.cls.predictions.bias", "Qformer.cls.predictions.decoder.bias"))


@dataclasses.dataclass(frozen=True)
class LavisCheckpoint:
    """A converted LAVIS checkpoint.

    tensors: transformers names -> arrays (plus the stage-1 extras, see `split_extras`).
    kind: the layout (one of `KINDS`).
    absent: transformers name prefixes this file does not provide (take them from elsewhere).
    dropped: LAVIS names that were read but not converted (see the module docstring).
    """
    tensors: dict[str, np.ndarray]
    kind: str
    absent: tuple[str, ...]
    dropped: tuple[str, ...]


def _compile(rules, prefix=""):
    return [(re.compile(re.escape(prefix) + pattern), template) for pattern, template in rules]


def _listing(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def detect_kind(names) -> str:
    """The layout of a LAVIS state dict, from its tensor names (one of `KINDS`)."""
    names = set(names)

    def has(*prefixes):
        return any(n.startswith(prefixes) for n in names)

    found = []
    if has("opt_proj.", "opt_model."):
        found.append("blip2_opt")
    if has("t5_proj.", "t5_model."):
        found.append("blip2_t5")
    if not found and has("Qformer.") and ("temp" in names or has("vision_proj.", "text_proj.", "itm_head.",
                                                                   "Qformer.cls.")):
        found.append("blip2_qformer")
    if not has("Qformer.", "visual_encoder.") and has("blocks.") and {"cls_token", "pos_embed"} & names:
        found.append("eva_vit_g")
    if len(found) != 1:
        what = "is ambiguous (" + " and ".join(found) + ")" if found else "is not a known LAVIS layout"
        raise WeightsError(f"checkpoint {what}; supported kinds: {', '.join(KINDS)} (see blip2_jax.weights."
                           f"lavis). Some of its tensor names: {_listing(names)}")
    return found[0]


def _rules(kind: str, vision: str):
    """(compiled rules, vision prefix) for a layout."""
    if kind == "eva_vit_g":
        return _compile(_VISION_RULES), ""
    ln = "vision_model.post_layernorm" if vision == "eva" else "vision_model.ln_vision"
    rules = _compile(_VISION_RULES, "visual_encoder.") + _compile([(rf"ln_vision\.{_W}", ln + r".\1")])
    rules += _compile(_QFORMER_RULES)
    rules += _compile(_TEXT_RULES) if kind == "blip2_qformer" else _compile(_LM_RULES[kind])
    return rules, "visual_encoder."


def _required(kind: str, names: set[str], vprefix: str, n_blocks: int | None) -> list[str]:
    """LAVIS names this layout must hold, given the layers that are present."""
    req = []
    if n_blocks is not None:  # a ViT is present: it must be complete
        v = vprefix
        req += [v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "patch_embed.proj.bias"]
        qv = any(n.startswith(v + "blocks.") and n.endswith(("attn.q_bias", "attn.v_bias")) for n in names)
        for i in range(n_blocks):
            b = f"{v}blocks.{i}."
            req += [b + s for s in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
                                    "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                    "mlp.fc2.weight", "mlp.fc2.bias")]
            req += [b + "attn.q_bias", b + "attn.v_bias"] if qv else []
    if kind == "eva_vit_g":
        return req
    wb = (".weight", ".bias")
    req += ["query_tokens"] + ["ln_vision" + s for s in wb] + ["Qformer.bert.embeddings.LayerNorm" + s for s in wb]
    layers = {int(m.group(1)) for n in names if (m := re.match(_QF, n))}
    ffns = ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
    if kind == "blip2_qformer":
        ffns += ["intermediate.dense", "output.dense", "output.LayerNorm"]
    for i in range(max(layers, default=0) + 1):
        p = f"Qformer.bert.encoder.layer.{i}."
        # cross-attention sits in every k-th layer, always in layer 0
        attns = ["attention"] + (["crossattention"] if i == 0 or any(n.startswith(p + "crossattention.")
                                                                      for n in names) else [])
        for a in attns:
            req += [f"{p}{a}.self.{x}{s}" for x in ("query", "key", "value") for s in wb]
            req += [f"{p}{a}.output.{x}{s}" for x in ("dense", "LayerNorm") for s in wb]
        req += [p + f + s for f in ffns for s in wb]
    if kind == "blip2_qformer":
        req += ["Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight",
                "temp", "Qformer.cls.predictions.bias"]
        req += [h + s for h in ("vision_proj", "text_proj", "itm_head", "Qformer.cls.predictions.transform.dense",
                                "Qformer.cls.predictions.transform.LayerNorm") for s in wb]
    else:
        req += [("opt_proj" if kind == "blip2_opt" else "t5_proj") + s for s in wb]
    return req


def _fill_ties(sd: Mapping[str, np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
    """Tensors for tied pairs given by one member only; checks the shared LM bias is one tensor."""
    filled = {a: sd[b] for a, b in _TIES if a not in names and b in names}
    bias, dup = _TIES[1]
    if bias in names and dup in names and not np.array_equal(np.asarray(sd[bias]), np.asarray(sd[dup])):
        raise WeightsError(f"{bias} and {dup} differ; in LAVIS they are one parameter")
    return filled


def convert_lavis(state_dict: Mapping[str, np.ndarray], kind: str | None = None, *, vision: str = "eva",
                  num_vision_layers: int | None = None) -> LavisCheckpoint:
    """A LAVIS state dict (name -> array) -> `LavisCheckpoint` with transformers names.

    kind: one of `KINDS`, or None to detect it from the names.
    vision: "eva" (ViT-g) or "clip" (the vitL variants): where `ln_vision` goes (module docstring).
    num_vision_layers: ViT blocks to keep (the rest are dropped); None keeps all blocks of a BLIP-2
        checkpoint (LAVIS saved only the blocks it built) and all but the last of "eva_vit_g".
    Raises WeightsError naming unexpected tensors (a wrong kind) or missing ones.
    """
    names = set(state_dict)
    kind = kind or detect_kind(names)
    if kind not in KINDS:
        raise WeightsError(f"unknown LAVIS kind {kind!r}; supported: {', '.join(KINDS)}")
    if vision not in ("eva", "clip"):
        raise ValueError(f"vision must be 'eva' or 'clip', got {vision!r}")
    rules, vprefix = _rules(kind, vision)

    blocks = {int(m.group(1)) for n in names if n.startswith(vprefix) and (m := _BLOCK.match(n[len(vprefix):]))}
    keep = num_vision_layers
    if keep is None:
        keep = max(blocks) if kind == "eva_vit_g" and blocks else max(blocks, default=-1) + 1

    filled = _fill_ties(state_dict, names)
    out: dict[str, np.ndarray] = {}
    qv: dict[tuple[int, str], str] = {}
    dropped, unexpected = [], []
    for name in sorted(names | set(filled)):
        if name in _DROPPED[kind]:
            dropped.append(name)
            continue
        if name.startswith(vprefix):
            rel = name[len(vprefix):]
            m = _BLOCK.match(rel)
            if (m and int(m.group(1)) >= keep) or _VISION_UNUSED.fullmatch(rel):
                dropped.append(name)
                continue
        for pattern, template in rules:
            m = pattern.fullmatch(name)
            if m is None:
                continue
            if template == "QV":
                qv[(int(m.group(1)), m.group(2))] = name
            else:
                out[m.expand(template)] = filled[name] if name in filled else np.asarray(state_dict[name])
            break
        else:
            unexpected.append(name)
    if unexpected:
        hint = ""
        if any(n.startswith(tuple(vprefix + c for c in ("transformer.", "conv1.", "ln_pre."))) for n in unexpected):
            hint = (" (a CLIP ViT-L tower is not converted here: take it from transformers' CLIPVisionModel "
                    "weights and pass vision='clip')")
        raise WeightsError(f"{kind} checkpoint has {len(unexpected)} unexpected tensor(s){hint}: "
                           f"{_listing(unexpected)}; supported kinds: {', '.join(KINDS)}")

    kept = {i for i in blocks if i < keep}
    has_vision = kind == "eva_vit_g" or any(k.startswith(VISION_ABSENT) for k in out) or bool(qv)
    n_blocks = (max(kept, default=0) + 1) if has_vision else None
    present = names | set(filled)
    missing = [n for n in _required(kind, present, vprefix, n_blocks) if n not in present]
    if missing:
        raise WeightsError(f"{kind} checkpoint is missing {len(missing)} tensor(s): {_listing(missing)}")

    for i in sorted({i for i, _ in qv}):
        q, v = np.asarray(state_dict[qv[(i, "q")]]), np.asarray(state_dict[qv[(i, "v")]])
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])

    absent: list[str] = []
    if kind == "eva_vit_g":
        absent.append("vision_model.post_layernorm.")
    else:
        if n_blocks is None:
            absent += list(VISION_ABSENT) + (["vision_model.pre_layrnorm."] if vision == "clip" else [])
        if kind != "blip2_qformer" and not any(k.startswith("language_model.") for k in out):
            absent.append("language_model.")
    return LavisCheckpoint(tensors=out, kind=kind, absent=tuple(absent), dropped=tuple(dropped))


def lavis_to_hf(state_dict: Mapping[str, np.ndarray], kind: str | None = None, **kwargs) -> dict[str, np.ndarray]:
    """LAVIS state dict -> transformers-named tensors (+ stage-1 extras); `convert_lavis` for the rest."""
    return convert_lavis(state_dict, kind, **kwargs).tensors


def split_extras(tensors: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(tensors transformers' models load, stage-1 extras `temp` and `cls.predictions.*`)."""
    def is_extra(k):
        return k == EXTRA_NAMES[0] or k.startswith(EXTRA_NAMES[1])
    return ({k: v for k, v in tensors.items() if not is_extra(k)},
            {k: v for k, v in tensors.items() if is_extra(k)})


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        import ml_dtypes
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a PyTorch checkpoint needs torch (an optional dependency: "
                          "pip install torch), or convert the file to .safetensors where torch is installed") from None
    try:  # weights_only: tensors and plain containers only, never pickled code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = f"it holds {found.group(1)}" if found else re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("\n")[0]
        raise WeightsError(f"{path}: refused: not a weights-only PyTorch file (objects other than tensors and "
                           f"plain containers are never unpickled): {type(e).__name__}: {detail}") from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # LAVIS saves {"model": state_dict, "optimizer": ..., ...}
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {_listing(map(str, bad))}")
    return {k: _torch_to_numpy(v) for k, v in obj.items()}


def read_lavis_file(path: str) -> Mapping[str, np.ndarray]:
    """LAVIS-named tensors of a `.safetensors` file (no torch needed) or a `.pth`/`.pt`/`.bin` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if path.endswith(".safetensors"):
        from blip2_jax.weights.safetensors_io import LazyStateDict
        return LazyStateDict([path])
    return _read_torch(path)


def load_lavis(path: str, kind: str | None = None, **kwargs) -> LavisCheckpoint:
    """`convert_lavis(read_lavis_file(path), kind, **kwargs)`."""
    return convert_lavis(read_lavis_file(path), kind, **kwargs)

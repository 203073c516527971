"""Write the golden transformers checkpoints of tests/golden/ again in the authors' LAVIS naming.

Run with Python + torch (for the `.pth` file):  python tools/make_lavis_golden.py
Reads tests/golden/{blip2_itm,blip2_opt,blip2_t5}/ (those that exist) and writes tests/golden/lavis/:
  blip2_itm_lavis.safetensors  stage-1 layout (`Blip2Qformer`), ViT included (as in blip2_finetune_coco),
                               plus the stage-1 tensors transformers drops: `temp` and the ITG LM head
                               `Qformer.cls.predictions.*` (random, fixed seed). The LM decoder weight is
                               tied to the word embeddings in LAVIS and left out (a tied pair given once).
  blip2_opt_lavis.safetensors  `Blip2OPT` layout, ViT included (as in caption_coco_opt*), no `opt_model.*`
  blip2_opt_lavis.pth          the same as {"model": state_dict, "epoch": 0} (read only where torch is)
  blip2_t5_lavis.safetensors   `Blip2T5` layout without ViT and LLM (as in pretrain_flant5*)
  manifest.json                per file: source case (and its sha256: rerun this script when the goldens
                               change), LAVIS kind, transformers prefixes it omits, extras.
Every file also holds the `Qformer.bert.embeddings.position_ids` buffer LAVIS saves.

The transformers -> LAVIS table here is written out by structure (from each case's config.json), in
the opposite direction and independently of the converter under test (blip2_jax/weights/lavis.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
OUT = os.path.join(GOLDEN, "lavis")
WB = ("weight", "bias")


def vision_names(vc: dict) -> dict[str, str]:
    """transformers -> LAVIS names of the EVA tower (the fused qkv bias is handled separately)."""
    m = {"vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
         "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed"}
    for s in WB:
        m[f"vision_model.embeddings.patch_embedding.{s}"] = f"visual_encoder.patch_embed.proj.{s}"
        m[f"vision_model.post_layernorm.{s}"] = f"ln_vision.{s}"
    for i in range(vc["num_hidden_layers"]):
        hf, lv = f"vision_model.encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        m[hf + "self_attn.qkv.weight"] = lv + "attn.qkv.weight"
        for s in WB:
            m[hf + f"layer_norm1.{s}"] = lv + f"norm1.{s}"
            m[hf + f"layer_norm2.{s}"] = lv + f"norm2.{s}"
            m[hf + f"self_attn.projection.{s}"] = lv + f"attn.proj.{s}"
            m[hf + f"mlp.fc1.{s}"] = lv + f"mlp.fc1.{s}"
            m[hf + f"mlp.fc2.{s}"] = lv + f"mlp.fc2.{s}"
    return m


def qformer_names(qc: dict, text: bool) -> dict[str, str]:
    m = {"query_tokens": "query_tokens"}
    for s in WB:
        m[f"qformer.layernorm.{s}"] = f"Qformer.bert.embeddings.LayerNorm.{s}"
    ffns = ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
    if text:
        ffns += ["intermediate.dense", "output.dense", "output.LayerNorm"]
        for e in ("word_embeddings", "position_embeddings"):
            m[f"embeddings.{e}.weight"] = f"Qformer.bert.embeddings.{e}.weight"
    for i in range(qc["num_hidden_layers"]):
        hf, lv = f"qformer.encoder.layer.{i}.", f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % qc["cross_attention_frequency"] == 0 else [])
        for s in WB:
            for b in blocks:
                for x in ("query", "key", "value"):
                    m[f"{hf}{b}.attention.{x}.{s}"] = f"{lv}{b}.self.{x}.{s}"
                m[f"{hf}{b}.output.dense.{s}"] = f"{lv}{b}.output.dense.{s}"
                m[f"{hf}{b}.output.LayerNorm.{s}"] = f"{lv}{b}.output.LayerNorm.{s}"
            for f in ffns:
                m[f"{hf}{f}.{s}"] = f"{lv}{f}.{s}"
    return m


def to_lavis(case: str, keep_vision: bool):
    """(LAVIS state dict, manifest entry) for one golden transformers checkpoint."""
    src = os.path.join(GOLDEN, case)
    cfg = json.load(open(os.path.join(src, "config.json")))
    hf = load_file(os.path.join(src, "model.safetensors"))
    stage1 = cfg["architectures"] == ["Blip2ForImageTextRetrieval"]
    names = qformer_names(cfg["qformer_config"], text=stage1)
    names.update(vision_names(cfg["vision_config"]))
    if stage1:
        for ours, theirs in (("vision_projection", "vision_proj"), ("text_projection", "text_proj"),
                             ("itm_head", "itm_head")):
            for s in WB:
                names[f"{ours}.{s}"] = f"{theirs}.{s}"
    else:
        proj = "opt_proj" if cfg["text_config"]["model_type"] == "opt" else "t5_proj"
        for s in WB:
            names[f"language_projection.{s}"] = f"{proj}.{s}"

    qkv_bias = {f"vision_model.encoder.layers.{i}.self_attn.qkv.bias": i
                for i in range(cfg["vision_config"]["num_hidden_layers"])}
    lm = [k for k in hf if k.startswith("language_model.")]
    unknown = set(hf) - set(names) - set(qkv_bias) - set(lm)
    not_there = (set(names) | set(qkv_bias)) - set(hf)
    assert not unknown and not not_there, (sorted(unknown), sorted(not_there))

    sd, omitted = {}, ["language_model."] if lm else []
    for k, lv in names.items():
        if keep_vision or not lv.startswith("visual_encoder."):
            sd[lv] = hf[k]
    if keep_vision:
        for k, i in qkv_bias.items():
            d = hf[k].shape[0] // 3
            # LAVIS has no key bias (it adds zeros); the golden's random one is dropped here. It
            # shifts every score of a query by the same amount, so the outputs do not depend on it.
            sd[f"visual_encoder.blocks.{i}.attn.q_bias"] = hf[k][:d].copy()
            sd[f"visual_encoder.blocks.{i}.attn.v_bias"] = hf[k][2 * d:].copy()
    else:
        omitted += ["vision_model.embeddings.", "vision_model.encoder."]
    qc = cfg["qformer_config"]
    sd["Qformer.bert.embeddings.position_ids"] = np.arange(qc["max_position_embeddings"], dtype=np.int64)[None]

    extras = {}
    if stage1:  # what LAVIS's stage-1 model has and transformers' retrieval model drops
        rng = np.random.default_rng(1234)
        d, v = qc["hidden_size"], qc["vocab_size"]
        extras = {"temp": np.asarray(0.0625, np.float32),
                  "Qformer.cls.predictions.bias": rng.normal(0, 0.1, (v,)).astype(np.float32),
                  "Qformer.cls.predictions.transform.dense.weight": rng.normal(0, 0.1, (d, d)).astype(np.float32),
                  "Qformer.cls.predictions.transform.dense.bias": rng.normal(0, 0.1, (d,)).astype(np.float32),
                  "Qformer.cls.predictions.transform.LayerNorm.weight": 1 + rng.normal(0, 0.1, (d,)).astype(np.float32),
                  "Qformer.cls.predictions.transform.LayerNorm.bias": rng.normal(0, 0.1, (d,)).astype(np.float32)}
        sd.update(extras)
    kind = "blip2_qformer" if stage1 else ("blip2_opt" if cfg["text_config"]["model_type"] == "opt" else "blip2_t5")
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    entry = {"source": case, "source_sha256": digest, "kind": kind, "omitted_prefixes": omitted,
             "extras": {k.replace("Qformer.", "", 1): k for k in extras},
             "dropped": ["Qformer.bert.embeddings.position_ids"],
             "key_bias_dropped": keep_vision}
    return sd, entry


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    plans = [("blip2_itm", True, False), ("blip2_opt", True, True), ("blip2_t5", False, False)]
    manifest = {}
    for case, keep_vision, pth in plans:
        if not os.path.exists(os.path.join(GOLDEN, case, "model.safetensors")):
            print(f"skip {case}: no golden checkpoint yet")
            continue
        sd, entry = to_lavis(case, keep_vision)
        name = f"{case}_lavis.safetensors"
        save_file({k: np.array(v, order="C") for k, v in sd.items()}, os.path.join(OUT, name))
        manifest[name] = entry
        if pth:
            import torch
            tsd = {k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}
            torch.save({"model": tsd, "epoch": 0}, os.path.join(OUT, f"{case}_lavis.pth"))
            manifest[f"{case}_lavis.pth"] = entry
        print(f"{case}: {len(sd)} LAVIS tensors -> {name}")
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

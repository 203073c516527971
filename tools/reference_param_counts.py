"""Parameter counts of the released BLIP-2 configurations, as transformers' PyTorch classes build
them (on the `meta` device: nothing is allocated). Writes tests/golden/param_counts.json.

Run where torch + transformers are installed (e.g. Python 3.11, torch 2.13, transformers 5.23):
    python tools/reference_param_counts.py
The presets' configs are written out by the project (Python 3.12) first:
    python -c "from blip2_jax.models.presets import dump_hf_configs; dump_hf_configs('/tmp/presets.json')"
    python tools/reference_param_counts.py /tmp/presets.json
"""
import json
import pathlib
import sys

import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "golden" / "param_counts.json"


def count(hf_config: dict) -> dict:
    retrieval = "Blip2ForImageTextRetrieval" in hf_config["architectures"]
    cfg = transformers.Blip2Config(
        vision_config=hf_config["vision_config"], qformer_config=hf_config["qformer_config"],
        text_config=hf_config.get("text_config"), num_query_tokens=hf_config["num_query_tokens"],
        image_text_hidden_size=hf_config["image_text_hidden_size"], image_token_index=50265)
    cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
    with torch.device("meta"):
        model = cls(cfg)
    seen, total, frozen = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if (name.startswith("vision_model.") and "post_layernorm" not in name) or name.startswith("language_model."):
            frozen += p.numel()
    text = hf_config.get("text_config") or {}
    if not retrieval and text.get("model_type") == "t5" and text.get("tie_word_embeddings") is False:
        # transformers 5 builds every T5 tied; released FlanT5 checkpoints carry their own lm_head.
        head = text["vocab_size"] * text["d_model"]
        total, frozen = total + head, frozen + head
    return {"total": total, "trainable": total - frozen}


def main():
    configs = json.load(open(sys.argv[1]))
    out = {name: count(c) for name, c in configs.items()}
    out["_generated_by"] = f"tools/reference_param_counts.py, transformers {transformers.__version__}"
    OUT.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

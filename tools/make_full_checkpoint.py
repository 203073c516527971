"""Random BLIP-2 checkpoints with the released architectures, written as the release is.

    python tools/make_full_checkpoint.py full-opt-2.7b [--out DIR]     # default: the cache folder
    python tools/make_full_checkpoint.py full-flant5-xl

Runs where torch + transformers are installed (the golden files' environment: Python 3.11,
torch 2.13, transformers 5.23). The model is built by transformers on the `meta` device (nothing
allocated), so the tensor names, shapes and config.json are transformers' own; each tensor is
then drawn (N(0, 0.02), norms 1 / 0) in bfloat16 and written shard by shard (2 GiB shards,
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`), with a tokenizer, an image
processor and a generation config. Peak memory: about one shard. The folder is a cache outside
the repository (`$BLIP2_JAX_FULL_DIR`, default ~/.cache/blip2_jax/full/<name>); never commit it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SHARD_BYTES = 2 * 2**30

VIT_G = dict(image_size=224, patch_size=14, hidden_size=1408, num_hidden_layers=39, num_attention_heads=16,
             intermediate_size=6144, layer_norm_eps=1e-6, qkv_bias=True)
QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               cross_attention_frequency=2, encoder_hidden_size=1408)
# name -> (text config, tokenizer source, EOS id as released)
CONFIGS = {
    "full-opt-2.7b": (dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                           num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                           do_layer_norm_before=True, bos_token_id=2, eos_token_id=50118, pad_token_id=1),
                      "blip2_opt", 50118),
    "full-opt-6.7b": (dict(model_type="opt", vocab_size=50272, hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                           num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096,
                           do_layer_norm_before=True, bos_token_id=2, eos_token_id=50118, pad_token_id=1),
                      "blip2_opt", 50118),
    "full-flant5-xl": (dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                            num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
                       "blip2_t5", 1),
    "full-flant5-xxl": (dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                             num_decoder_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
                        "blip2_t5", 1),
}


def default_dir(name: str) -> pathlib.Path:
    base = os.environ.get("BLIP2_JAX_FULL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "blip2_jax", "full")
    return pathlib.Path(base) / name


def build_meta(name: str):
    """transformers' Blip2ForConditionalGeneration of `name` on the meta device."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    text, tok_case, _ = CONFIGS[name]
    image_token = json.loads((GOLDEN / tok_case / "config.json").read_text())["image_token_index"]
    config = Blip2Config(vision_config=VIT_G, qformer_config=QFORMER, text_config=text, num_query_tokens=32,
                         image_token_index=image_token)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    return model, config


def plan(model) -> list[list[tuple[str, torch.Size]]]:
    """Tensor names and shapes per shard, in state-dict order; tied copies (OPT's lm_head) left
    out, as transformers' save_pretrained does."""
    opt = model.config.text_config.model_type == "opt"
    shards, size, seen = [[]], 0, set()
    for key, p in model.state_dict().items():
        if (opt and key.endswith("lm_head.weight")) or id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, p.shape))
        size += nbytes
    return shards


def draw(key: str, shape, gen) -> torch.Tensor:
    """N(0, 0.02) weights; norm scales 1 and biases 0; bfloat16."""
    import torch
    if "norm" in key.lower() or "ln_" in key:
        x = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    else:
        x = 0.02 * torch.randn(shape, generator=gen)
    return x.to(torch.bfloat16)


def write(name: str, out: pathlib.Path) -> None:
    import torch
    from safetensors.torch import save_file

    model, config = build_meta(name)
    text, tok_case, eos = CONFIGS[name]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shards = plan(model)
    gen = torch.Generator().manual_seed(0)
    total, weight_map = 0, {}
    for i, shard in enumerate(shards):  # one shard in memory at a time
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: draw(key, shape, gen) for key, shape in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(x.numel() * x.element_size() for x in tensors.values())
        weight_map.update({k: fname for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.torch_dtype = "bfloat16"
    config.save_pretrained(out)
    src = GOLDEN / tok_case
    for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model", "preprocessor_config.json",
              "processor_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    processor_side_files(out, image_size=VIT_G["image_size"], queries=config.num_query_tokens)
    gen_cfg = {"bos_token_id": text.get("bos_token_id"), "eos_token_id": eos, "pad_token_id": text["pad_token_id"],
               "decoder_start_token_id": text.get("decoder_start_token_id")}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen_cfg.items() if v is not None},
                                                           indent=2))
    (out / "full_checkpoint.json").write_text(json.dumps({"name": name, "bytes": total, "shards": len(shards)}))
    print(f"{name}: {total / 2**30:.2f} GiB in {len(shards)} shards -> {out}")


def processor_side_files(out: pathlib.Path, image_size: int, queries: int) -> None:
    """The processor files copied from a tiny golden case, set to the released model's image size
    and query count: both preprocessor_config.json and processor_config.json (transformers'
    Blip2Processor takes its image size from the latter's `image_processor` and inserts
    `num_query_tokens` image tokens)."""
    proc = json.loads((out / "preprocessor_config.json").read_text())
    proc["size"] = {"height": image_size, "width": image_size}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
    path = out / "processor_config.json"
    if path.exists():
        both = json.loads(path.read_text())
        if "image_processor" in both:
            both["image_processor"]["size"] = {"height": image_size, "width": image_size}
        both["num_query_tokens"] = queries
        path.write_text(json.dumps(both, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(CONFIGS))
    p.add_argument("--out", help="output folder (default: the cache folder)")
    args = p.parse_args(argv)
    write(args.name, pathlib.Path(args.out) if args.out else default_dir(args.name))


if __name__ == "__main__":
    sys.exit(main())

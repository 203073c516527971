"""Annotation throughput: `blip2_jax.annotation` (what `python -m blip2_jax.annotate` runs) against
a plain loop over the Python API, same model, same images, same process, one run.

    python tools/bench_annotate.py [--config small] [--images 64] [--batch 16] [--new-tokens 20]
        [--workers 2] [--repeats 2] [--dir CHECKPOINT --dtype bfloat16]

The checkpoint is random (tiny / small as in tools/bench_generate.py: small = ViT 224/14 12x384,
Q-Former 6x384 with 32 queries, OPT-style 12x768, vocabulary 50272), written once to a temporary
directory with the golden OPT tokenizer; the images are 640x480 JPEGs. Every caption has exactly
`--new-tokens` tokens (min = max new tokens), so both sides do the same work. Rows: ours (decoding
and preprocessing in a thread pool beside the device, shards written as JSONL), the plain loop
`model.generate(paths[i:i + batch])`, and the plain loop one image at a time. Each side runs once
to compile, then `--repeats` times alternating; the best time counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "tests" / "golden" / "blip2_opt"
# vision (image, patch, hidden, layers, heads, mlp), Q-Former (hidden, layers, heads, ffn, queries),
# OPT (hidden, layers, heads, ffn), as in tools/bench_generate.py
CONFIGS = {
    "tiny": dict(vision=(64, 16, 64, 2, 4, 256), qformer=(64, 2, 4, 256, 8), opt=(64, 2, 4, 256)),
    "small": dict(vision=(224, 14, 384, 12, 6, 1536), qformer=(384, 6, 6, 1536, 32), opt=(768, 12, 12, 3072)),
}


def make_checkpoint(name: str, out: str) -> None:
    """A random BLIP-2 OPT checkpoint of CONFIGS[name] in transformers format."""
    import jax

    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.preprocess import ImageProcessor
    from blip2_jax.weights import hf

    c = CONFIGS[name]
    im, patch, vh, vl, vheads, vmlp = c["vision"]
    qh, ql, qheads, qffn, queries = c["qformer"]
    oh, ol, oheads, offn = c["opt"]
    cfg, raw = hf.read_config(str(GOLDEN))
    cfg = dataclasses.replace(
        cfg, num_query_tokens=queries,
        vision=dataclasses.replace(cfg.vision, image_size=im, patch_size=patch, hidden_size=vh, num_hidden_layers=vl,
                                   num_attention_heads=vheads, intermediate_size=vmlp),
        qformer=dataclasses.replace(cfg.qformer, hidden_size=qh, num_hidden_layers=ql, num_attention_heads=qheads,
                                    intermediate_size=qffn, encoder_hidden_size=vh),
        text=dataclasses.replace(cfg.text, hidden_size=oh, num_hidden_layers=ol, num_attention_heads=oheads,
                                 ffn_dim=offn, word_embed_proj_dim=oh, max_position_embeddings=512))
    model = Blip2(cfg, scan_layers=False)
    params = sharding.unbox(jax.jit(lambda r: model.init(r, **build.init_inputs(cfg)))(jax.random.key(0))["params"])
    raw = {k: v for k, v in raw.items() if k not in ("vision_config", "qformer_config", "text_config")}
    hf.save(out, cfg, params, raw_config=raw, side_files_from=str(GOLDEN))
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        import json
        json.dump(ImageProcessor(size=im).to_dict(), f)


def make_images(folder: str, n: int) -> list[str]:
    """640x480 JPEGs: smooth colour fields with noise (decoding cost like a photo's)."""
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rs.rand(3) * 0.05
        img = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1) * 100 + 128
        img = np.clip(img + rs.randn(480, 640, 3) * 12, 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"{i:05d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", help="an existing checkpoint (e.g. tools/make_full_checkpoint.py's full size) "
                                 "instead of a random --config one")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()

    import jax

    import blip2_jax
    from blip2_jax import annotation

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, photos = os.path.join(tmp, "ckpt"), os.path.join(tmp, "photos")
        os.makedirs(photos)
        t = time.perf_counter()
        if args.dir:
            ckpt = args.dir
        else:
            make_checkpoint(args.config, ckpt)
        paths = make_images(photos, args.images)
        print(f"# checkpoint + {len(paths)} images in {time.perf_counter() - t:.0f} s; "
              f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} cores", flush=True)
        model = blip2_jax.load(ckpt, dtype=args.dtype)
        opts = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        shards = annotation.list_shards(photos, shard_size=args.images)
        run_id = iter(range(10**6))

        def ours():
            out = os.path.join(tmp, f"out{next(run_id)}")
            task = annotation.CaptionTask(model.predictor, **opts)
            annotation.annotate(shards, task, model.image_processor.one, out, batch_size=args.batch,
                                workers=args.workers, progress=False)

        def plain_batched():
            for s in range(0, len(paths), args.batch):
                model.generate(paths[s:s + args.batch], **opts)

        def plain_single():
            for path in paths:
                model.generate([path], **opts)

        sides = {"ours (annotation)": ours, f"plain loop, batch {args.batch}": plain_batched,
                 "plain loop, one image per call": plain_single}
        for fn in sides.values():  # compile (the plain loops' last partial batch too)
            fn() if fn is not plain_single else model.generate([paths[0]], **opts)
        best = {k: float("inf") for k in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        load = os.getloadavg()[0]
        print(f"| config | side | images/s | seconds for {len(paths)} images |")
        print("|---|---|---|---|")
        for name, sec in best.items():
            print(f"| {args.dir and os.path.basename(args.dir.rstrip('/')) or args.config} | {name} | "
                  f"{len(paths) / sec:.2f} | {sec:.1f} |")
        print(f"# batch {args.batch}, {args.new_tokens} new tokens (greedy), {args.workers} decoding threads, "
              f"{args.dtype}, load average {load:.1f}")


if __name__ == "__main__":
    main()

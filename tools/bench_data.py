"""Input-pipeline throughput per CPU core, beside what training consumes.

Measures, in one process on one thread (= one core):
  transform   decode JPEG + RandomResizedCrop/flip + CLIP normalisation (train) or bicubic resize
              (eval), on COCO-like 640x480 JPEGs;
  pipeline    the whole grain pipeline from array_record files (tfds read, decode, augment, text
              processor, batching), read_threads=0, worker_count=0.
and compares images/s per core with the need: training images/s per accelerator chip divided by
the host cores per chip (target: the pipeline is >= 3x faster than the need).

  python tools/bench_data.py [--sizes 224,364] [--images 200] [--train_images_per_s_per_chip 51]
      [--cores_per_chip 8]

The default need, 51 images/s per chip, is the paper's stage-1 rate (ViT-g: 250k steps of 1680
images in < 6 days on 16 A100s); pass the trainer's measured rate for your model and hardware.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_jax.data import builders, pipeline, transforms  # noqa: E402


def photo_like_jpeg(rng: np.random.Generator, size=(640, 480), quality: int = 90) -> bytes:
    """A JPEG with photo-like statistics: smooth structure plus fine texture (~100 KB)."""
    coarse = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), np.float32)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bench_transform(jpegs: list[bytes], size: int, train: bool, draft: bool,
                    normalize: bool = True) -> float:
    """Images/s of decode + augment (or resize) + normalise on this thread."""
    rng = np.random.default_rng(0)
    draft_size = int(np.ceil(size / np.sqrt(0.5))) if draft else None
    start = time.perf_counter()
    for data in jpegs:
        img, _ = transforms.decode(data, draft_size=draft_size if train else None)
        if train:
            img, _ = transforms.train_image(img, size, rng)
        else:
            img = transforms.eval_image(img, size)
        if normalize:
            transforms.normalize(img)
        else:
            np.asarray(img, np.uint8)
    return len(jpegs) / (time.perf_counter() - start)


def bench_pipeline(data_dir: str, size: int, n_images: int) -> float:
    """Images/s of the whole grain pipeline on one thread (train mode, qformer_caption)."""
    cfg = pipeline.default_input_config()
    cfg.update(dataset="image_text_pairs", data_dir=data_dir, image_size=size, batch_size=16,
               read_threads=0, worker_count=0, text_processor="qformer_caption")
    it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
    next(it)  # warm-up: tokenizer, file handles
    n = max(n_images // cfg.batch_size, 2)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * cfg.batch_size / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="224,364")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--train_images_per_s_per_chip", type=float, default=51.0)
    p.add_argument("--cores_per_chip", type=float, default=8.0,
                   help="host CPU cores per accelerator chip (TPU v5e hosts: 28 vCPUs per chip, "
                        "v4: 60; DGX A100: 16 cores per GPU); 8 is on the safe side")
    p.add_argument("--skip_pipeline", action="store_true")
    args = p.parse_args(argv)
    cores_per_chip = args.cores_per_chip
    need = args.train_images_per_s_per_chip / cores_per_chip
    rng = np.random.default_rng(0)
    jpegs = [photo_like_jpeg(rng) for _ in range(args.images)]
    print(f"{len(jpegs)} JPEGs 640x480, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; "
          f"need {args.train_images_per_s_per_chip:g} img/s per chip / {cores_per_chip:g} "
          f"cores per chip = {need:.1f} img/s per core")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_pipeline:
            manual = Path(tmp) / "manual"
            (manual / "img").mkdir(parents=True)
            rows = []
            for k, data in enumerate(jpegs):
                (manual / "img" / f"{k}.jpg").write_bytes(data)
                rows.append(json.dumps({"image": f"img/{k}.jpg", "caption": f"photo {k}"}))
            (manual / "pairs.jsonl").write_text("\n".join(rows))
            builders.prepare_dataset("image_text_pairs", Path(tmp) / "tfds", manual)
        for size in (int(s) for s in args.sizes.split(",")):
            row = {
                "train_transform": bench_transform(jpegs, size, True, draft=True),
                "train_transform_no_draft": bench_transform(jpegs, size, True, draft=False),
                "train_transform_uint8": bench_transform(jpegs, size, True, draft=True,
                                                         normalize=False),
                "eval_transform": bench_transform(jpegs, size, False, draft=False),
            }
            if not args.skip_pipeline:
                row["train_pipeline"] = bench_pipeline(str(Path(tmp) / "tfds"), size,
                                                       args.images)
            results[size] = row
            for name, rate in row.items():
                print(f"{size} px  {name:26s} {rate:7.1f} img/s per core   "
                      f"{rate / need:5.1f}x the need")
    return results


if __name__ == "__main__":
    main()

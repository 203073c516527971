"""Text-to-image retrieval over a folder of images: ITC top-k, then ITM re-ranking (paper §4.4).

    python -m blip2_jax.retrieve --model DIR --images GALLERY_DIR --queries queries.txt [--k 128] [--top 5] [--json]

queries.txt holds one text per line. Each gallery image is scored by ITC similarity; the k best
are re-scored as ITM match logit + ITC similarity. With --json: a list with one object per query,
`{"query", "results": [{"image", "score"}, ...]}` best first.
"""
from __future__ import annotations

import os
import sys

from blip2_jax.cli import common

PROG = "blip2_jax.retrieve"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def gallery(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ValueError(f"image folder not found: {directory}")
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
    return paths


def read_queries(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"queries file not found: {path}")
    with open(path, encoding="utf-8") as f:
        queries = [line.strip() for line in f if line.strip()]
    if not queries:
        raise ValueError(f"no queries in {path} (one text per line)")
    return queries


def main(argv=None) -> int:
    p = common.parser(PROG, "Rank a folder of images for text queries (ITC top-k + ITM re-ranking).")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of gallery images")
    p.add_argument("--queries", required=True, metavar="FILE", help="one text query per line")
    p.add_argument("--k", type=common.positive_int, default=128, help="ITC candidates re-ranked by ITM")
    p.add_argument("--top", type=common.positive_int, default=5, help="results printed per query")
    args = p.parse_args(argv)

    def go():
        paths = gallery(args.images)
        queries = read_queries(args.queries)
        images = common.load_images(paths)
        model = common.load_model(args)
        ranked = model.retrieve(images, queries, k=args.k, top=args.top)
        rows = [{"query": q, "results": [{"image": paths[i], "score": s} for i, s in hits]}
                for q, hits in zip(queries, ranked)]
        if args.json:
            common.print_json(rows)
        else:
            for r in rows:
                print(r["query"])
                for hit in r["results"]:
                    print(f"  {hit['score']:.4f}\t{hit['image']}")

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())

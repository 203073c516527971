"""Image-text matching with a stage-1 / retrieval checkpoint (Blip2ForImageTextRetrieval).

    python -m blip2_jax.match --model DIR --image a.jpg --text "a cat on a sofa" [--json]

Prints the ITM match probability and the ITC similarity (best query's cosine similarity);
with --json: `{"itm_probability", "itc_similarity"}`.
"""
from __future__ import annotations

import sys

from blip2_jax.cli import common

PROG = "blip2_jax.match"


def main(argv=None) -> int:
    p = common.parser(PROG, "ITM probability and ITC similarity of an image and a text.")
    p.add_argument("--image", required=True, metavar="PATH")
    p.add_argument("--text", required=True, metavar="TEXT")
    args = p.parse_args(argv)

    def go():
        image = common.load_images([args.image])[0]
        model = common.load_model(args)
        out = model.match(image, args.text)
        if args.json:
            common.print_json(out)
        else:
            print(f"itm_probability\t{out['itm_probability']:.6f}\nitc_similarity\t{out['itc_similarity']:.6f}")

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())

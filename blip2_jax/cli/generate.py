"""Captioning, VQA and instructed generation from the command line.

    python -m blip2_jax.generate --model DIR --image a.jpg [--image b.jpg] [--prompt "Question: ... Answer:"]
        [--num_beams 5] [--max_new_tokens 30] [--json]

With --json: a list with one object per image (and returned sequence):
`{"image", "prompt", "text", "token_ids"}`, token_ids = the newly generated ids only (up to and
including EOS when produced). One --prompt applies to every image; several pair up with them.
"""
from __future__ import annotations

import sys

from blip2_jax.cli import common

PROG = "blip2_jax.generate"


def build_parser():
    p = common.parser(PROG, "Generate text for images with a BLIP-2 checkpoint.")
    p.add_argument("--image", action="append", required=True, metavar="PATH", help="image file (repeatable)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt: one for all images, or one per image")
    p.add_argument("--num_beams", type=common.positive_int)
    p.add_argument("--max_new_tokens", type=common.positive_int)
    p.add_argument("--min_new_tokens", type=common.nonnegative_int)
    p.add_argument("--length_penalty", type=float)
    p.add_argument("--early_stopping", choices=("true", "false", "never"))
    p.add_argument("--repetition_penalty", type=common.positive_float)
    p.add_argument("--num_return_sequences", type=common.positive_int)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--top_p", type=common.positive_float)
    p.add_argument("--top_k", type=common.nonnegative_int)
    p.add_argument("--temperature", type=common.positive_float)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        prompts = args.prompt or [None]
        if len(prompts) not in (1, len(args.image)):
            raise ValueError(f"{len(prompts)} prompts for {len(args.image)} images (give one, or one per image)")
        prompts = prompts * len(args.image) if len(prompts) == 1 else prompts
        images = common.load_images(args.image)
        model = common.load_model(args)
        es = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
        opts = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty,
                    early_stopping=es, repetition_penalty=args.repetition_penalty,
                    num_return_sequences=args.num_return_sequences, do_sample=args.do_sample or None,
                    top_p=args.top_p, top_k=args.top_k, temperature=args.temperature, seed=args.seed)
        ids = model.generate_ids(images, prompts, **opts)
        texts = model.decode(ids)
        per_image = len(ids) // len(images)
        rows = [{"image": args.image[i // per_image], "prompt": prompts[i // per_image], "text": t,
                 "token_ids": list(tok)} for i, (t, tok) in enumerate(zip(texts, ids))]
        if args.json:
            common.print_json(rows)
        else:
            for r in rows:
                print(f"{r['image']}\t{r['text']}")

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())

"""Log-likelihood of candidate texts given an image and a prompt (answer ranking, multiple choice).

    python -m blip2_jax.score --model DIR --image a.jpg --prompt "Question: what is this? Answer:" \
        --text " a cat" --text " a dog" [--json]

With --json: `[{"text", "log_likelihood", "num_tokens"}]` (summed log-probability of the text's
tokens after the prompt, and how many tokens it has).
"""
from __future__ import annotations

import sys

from blip2_jax.cli import common

PROG = "blip2_jax.score"


def main(argv=None) -> int:
    p = common.parser(PROG, "Score candidate texts for an image with a BLIP-2 checkpoint.")
    p.add_argument("--image", required=True, metavar="PATH")
    p.add_argument("--prompt", metavar="TEXT", help="prompt before the candidates (default: none)")
    p.add_argument("--text", action="append", required=True, metavar="CANDIDATE", help="candidate (repeatable)")
    args = p.parse_args(argv)

    def go():
        image = common.load_images([args.image])[0]
        model = common.load_model(args)
        ll, counts = model.score(image, args.prompt, args.text, return_num_tokens=True)
        rows = [{"text": t, "log_likelihood": float(s), "num_tokens": int(n)}
                for t, s, n in zip(args.text, ll, counts)]
        if args.json:
            common.print_json(rows)
        else:
            for r in rows:
                print(f"{r['log_likelihood']:.4f}\t{r['num_tokens']}\t{r['text']}")

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())

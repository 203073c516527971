"""The miniature pipeline's evaluations on synthetic_shapes: `:caption` (default), `:vqa`,
`:retrieval` — the paper's evaluators on the offline corpus, at the tiny model's resolution.

  python -m blip2_jax.evaluate --config=configs/eval/synthetic_shapes.py:vqa --workdir=/tmp/tiny2
"""
from blip2_jax.evaluators import runners


def get_config(arg: str = ""):
    kind = arg or "caption"
    c = runners.base_config(kind)
    c.input.dataset = "synthetic_shapes"
    c.input.split = "validation"
    c.input.image_size = 64            # the tiny model's (configs_tiny.TINY_VISION)
    c.input.batch_size = 16
    c.input.read_threads = 1
    if kind == "vqa":
        c.metric = "exact"             # one answer per question: normalised exact match
    elif kind == "caption":
        c.prompt = ""                  # the tiny stage 2 trains captions without a prompt
        c.generation.min_new_tokens = 1  # shape captions can be 3 tokens long
        c.generation.max_new_tokens = 20
    else:
        c.max_text_len = 24            # the tiny config's Q-Former text length
    return c

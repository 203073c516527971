"""The miniature pipeline's evaluations on synthetic_shapes: `:caption` (default), `:vqa`,
`:retrieval` — the paper's evaluators on the offline corpus, at the tiny model's resolution.

  python -m blip2_jax.evaluate --config=configs/eval/synthetic_shapes.py:vqa --workdir=/tmp/tiny2
"""
from blip2_jax.miniature import tiny


def get_config(arg: str = ""):
    return tiny.eval_config(arg or "caption")

"""Flickr30K 1k test retrieval (paper Table 5, zero-shot with the COCO-finetuned stage-1 model):
ITC top-128 re-ranked by ITM, R@1/5/10 both ways."""
from blip2_jax.evaluators import base


def get_config(arg: str = ""):
    c = base.base_config("retrieval")  # k 128, 35 text tokens
    c.input.dataset = "flickr30k_karpathy"
    c.input.split = arg or "test"
    c.input.image_size = 364
    c.input.batch_size = 64
    return c

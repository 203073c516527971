"""COCO captioning, Karpathy test (paper Table 3): BLEU-4, CIDEr (+ SPICE if installed)."""
from blip2_jax.evaluators import base


def get_config(arg: str = ""):
    c = base.base_config("caption")  # prompt "a photo of", beam 5, 8-30 new tokens
    c.input.dataset = "coco_karpathy"
    c.input.split = arg or "test"
    c.input.image_size = 364           # the captioning fine-tuning resolution
    c.input.batch_size = 32
    return c

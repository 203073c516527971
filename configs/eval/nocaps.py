"""NoCaps validation (paper Table 3, zero-shot transfer of the COCO-finetuned model): CIDEr,
SPICE (if installed) over all domains."""
from blip2_jax.evaluators import base


def get_config(arg: str = ""):
    c = base.base_config("caption")  # prompt "a photo of", beam 5, 8-30 new tokens
    c.input.dataset = "nocaps"
    c.input.split = arg or "validation"
    c.input.image_size = 364
    c.input.batch_size = 32
    return c

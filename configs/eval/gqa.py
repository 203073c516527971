"""Zero-shot GQA (paper Table 2): exact match on test-dev balanced."""
from blip2_jax.evaluators import base


def get_config(arg: str = ""):
    c = base.base_config("vqa")     # beam 5, 1-10 new tokens, prompt/length penalty per LLM
    c.input.dataset = "gqa_balanced"
    c.input.split = arg or "testdev"
    c.input.image_size = 224
    c.input.batch_size = 64
    c.metric = "gqa"
    return c

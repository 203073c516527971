"""Zero-shot OK-VQA (paper Table 2): VQA accuracy of lemmatised answers on the val questions."""
from blip2_jax.evaluators import base


def get_config(arg: str = ""):
    c = base.base_config("vqa")     # beam 5, 1-10 new tokens, prompt/length penalty per LLM
    c.input.dataset = "okvqa"
    c.input.split = arg or "validation"
    c.input.image_size = 224
    c.input.batch_size = 64
    c.metric = "okvqa"
    return c

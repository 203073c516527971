"""Tiny stage 2 (OPT-style LM) on synthetic_shapes for CPU (tests, the miniature pipeline)."""
from blip2_jax import config_lib
from blip2_jax.miniature import tiny


def get_config(arg: str = ""):
    c = config_lib.base(task="lm", preset="vitg_opt2.7b")
    c.input.text_processor = "opt_caption"
    c.input.llm_tokenizer = "gpt2-offline"
    c.input.llm_eos_text = "\n"
    return tiny.tiny(c, text="opt")

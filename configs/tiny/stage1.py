"""Tiny stage 1 on synthetic_shapes for CPU (tests, the miniature pipeline)."""
from blip2_jax import config_lib
from blip2_jax.miniature import tiny


def get_config(arg: str = ""):
    c = config_lib.base(task="stage1", preset="pretrain_vitg")
    c.model.qformer_lm_head = True
    c.input.text_processor = "qformer_caption"
    return tiny.tiny(c, text=None)

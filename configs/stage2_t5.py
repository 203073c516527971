r"""Stage 2 with a frozen FlanT5 (paper §3.3: prefix language modelling).

  python -m blip2_jax.main --config=configs/stage2_t5.py:xl --workdir=...
Argument: xl or xxl. Batch 1520, 80k steps, min LR 5e-5. FlanT5 runs in bfloat16 (it overflows
in float16). The paper splits each caption into a prefix (encoder) and a suffix (decoder);
LAVIS's released code uses text_input/text_output instead (text_processor "t5_caption").
"""
from blip2_jax import config_lib


def get_config(arg: str = "xl"):
    if arg not in ("xl", "xxl"):
        raise ValueError(f"stage2_t5: argument must be xl or xxl, got {arg!r}")
    c = config_lib.base(task="lm", preset=f"vitg_flant5{arg}")
    c.total_steps = 80_000
    c.input.batch_size = 1520
    c.input.dataset = "image_text_pairs"
    c.input.image_size = 224
    c.input.text_processor = "t5_prefix_caption"
    c.input.llm_tokenizer = ""               # the FlanT5 tokenizer directory
    c.optim.peak_lr = 1e-4
    c.optim.min_lr = 5e-5
    c.optim.warmup_steps = 2000
    c.optim.total_steps = c.total_steps
    c.ckpt_every = 5000
    c.init.source = "stage1"
    c.init.stage1_workdir = ""
    c.init.vision_dir = ""
    c.init.llm_dir = ""                      # a T5 transformers directory
    return c

r"""Stage 2: generative learning with a frozen OPT (paper §3.3).

  python -m blip2_jax.main --config=configs/stage2_opt.py:2.7b --workdir=...
Argument: 2.7b or 6.7b. Batch 1920, 80k steps, min LR 5e-5 (paper §3.4).
"""
from blip2_jax import config_lib


def get_config(arg: str = "2.7b"):
    if arg not in ("2.7b", "6.7b"):
        raise ValueError(f"stage2_opt: argument must be 2.7b or 6.7b, got {arg!r}")
    c = config_lib.base(task="lm", preset=f"vitg_opt{arg}")
    c.total_steps = 80_000
    c.input.batch_size = 1920
    c.input.dataset = "image_text_pairs"
    c.input.image_size = 224
    c.input.text_processor = "opt_caption"   # caption + "\n", loss on the caption only
    c.input.llm_tokenizer = ""               # the OPT tokenizer directory (e.g. facebook/opt-2.7b)
    c.optim.peak_lr = 1e-4
    c.optim.min_lr = 5e-5
    c.optim.warmup_steps = 2000
    c.optim.total_steps = c.total_steps
    c.ckpt_every = 5000
    c.init.source = "stage1"                 # Q-Former from the stage-1 workdir
    c.init.stage1_workdir = ""
    c.init.vision_dir = ""
    c.init.llm_dir = ""                      # an OPT transformers directory
    return c

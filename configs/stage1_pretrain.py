r"""Stage 1: vision-language representation learning (paper §3.2, Table/§4 recipe).

  python -m blip2_jax.main --config=configs/stage1_pretrain.py:vitg --workdir=...
Argument: vitg (EVA ViT-g/14, batch 1680) or vitl (CLIP ViT-L/14, batch 2320).
"""
from blip2_jax import config_lib


def get_config(arg: str = "vitg"):
    if arg not in ("vitg", "vitl"):
        raise ValueError(f"stage1_pretrain: argument must be vitg or vitl, got {arg!r}")
    c = config_lib.base(task="stage1", preset=f"pretrain_{arg}")
    c.model.qformer_lm_head = True
    c.total_steps = 250_000
    c.input.batch_size = 1680 if arg == "vitg" else 2320
    c.input.dataset = "image_text_pairs"   # 129M images with CapFilt captions (builders/web.py)
    c.input.image_size = 224
    c.input.text_processor = "qformer_caption"
    c.input.max_text_len = 32
    c.optim.peak_lr = 1e-4
    c.optim.min_lr = 1e-5                  # LAVIS stage-1 minimum
    c.optim.warmup_steps = 2000
    c.optim.total_steps = c.total_steps
    c.optim.weight_decay = 0.05
    c.optim.b2 = 0.98
    c.ckpt_every = 5000
    c.init.source = "unimodal"
    c.init.vision_dir = ""                 # a BLIP-2 (EVA) or CLIP transformers directory
    c.init.bert = "bert-base-uncased"      # a BERT-base directory ("minilm-offline" for tests)
    return c

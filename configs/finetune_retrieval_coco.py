r"""COCO retrieval fine-tuning (paper appendix): ITC + ITM + ITG with same-image positives,
LR 1e-5 (ViT-g), batch 224, 364 px, 5 epochs, layer-wise LR decay 0.95 on the ViT (which really
scales each block here; LAVIS's schedulers drop it), ViT unfrozen.

  python -m blip2_jax.main --config=configs/finetune_retrieval_coco.py --workdir=...
"""
from blip2_jax import config_lib

COCO_KARPATHY_TRAIN_PAIRS = 566_747  # caption-image pairs


def get_config(arg: str = "vitg"):
    c = config_lib.base(task="stage1", preset=f"pretrain_{arg}")
    c.model.qformer_lm_head = True
    c.model.vision = {"image_size": 364}
    c.model.vision_dtype = "float32"
    c.model.remat_policy = "full"
    c.frozen_patterns = []                  # no LLM; the ViT is fine-tuned
    c.losses.same_image_positives = True
    c.input.batch_size = 224
    c.input.dataset = "coco_captions"
    c.input.image_size = 364
    c.input.text_processor = "qformer_caption"
    c.total_steps = 5 * COCO_KARPATHY_TRAIN_PAIRS // 224
    c.optim.peak_lr = 1e-5
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 1000
    c.optim.total_steps = c.total_steps
    c.optim.layerwise_lr_decay = 0.95
    c.init.source = "stage1"
    return c

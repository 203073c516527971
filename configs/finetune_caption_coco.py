r"""COCO captioning fine-tuning (paper appendix): 5 epochs, LR 1e-5, batch 256, 364 px, prompt
"a photo of", ViT unfrozen (float32 + gradient checkpointing), LLM frozen.

  python -m blip2_jax.main --config=configs/finetune_caption_coco.py:opt2.7b --workdir=...
Argument: opt2.7b | opt6.7b | flant5xl.
"""
from blip2_jax import config_lib

COCO_KARPATHY_TRAIN = 113_287  # images; 5 captions each (one sampled per step as in LAVIS)


def get_config(arg: str = "opt2.7b"):
    presets = {"opt2.7b": "vitg_opt2.7b", "opt6.7b": "vitg_opt6.7b", "flant5xl": "vitg_flant5xl"}
    if arg not in presets:
        raise ValueError(f"finetune_caption_coco: argument must be one of {sorted(presets)}, got {arg!r}")
    c = config_lib.base(task="lm", preset=presets[arg])
    c.model.vision = {"image_size": 364}
    c.model.vision_dtype = "float32"        # fp16 ViT NaNs once unfrozen (LAVIS: fp32 when trained)
    c.model.remat_policy = "full"
    c.frozen_patterns = config_lib.FROZEN_LLM_ONLY
    c.input.batch_size = 256
    c.input.dataset = "coco_captions"
    c.input.image_size = 364
    c.input.prompt = "a photo of"
    c.input.text_processor = "t5_caption" if arg.startswith("flant5") else "opt_caption"
    c.total_steps = 5 * COCO_KARPATHY_TRAIN // 256
    c.optim.peak_lr = 1e-5
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 1000
    c.optim.total_steps = c.total_steps
    c.optim.weight_decay = 0.05
    c.init.source = "hf"                    # a converted stage-2 checkpoint
    c.init.hf_dir = ""
    return c

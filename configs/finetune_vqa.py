r"""VQAv2 fine-tuning (paper appendix, Fig. 7): LR 1e-5, batch 128, 490 px, 5 epochs, prompt
"Question: {} Answer:", the question also enters the Q-Former (needs a Q-Former with text input,
i.e. initialised from stage 1; LAVIS never released this). LLM and ViT frozen.

  python -m blip2_jax.main --config=configs/finetune_vqa.py:opt2.7b --workdir=...
"""
from blip2_jax import config_lib

VQAV2_TRAIN_QUESTIONS = 443_757 + 214_354  # train + val (VG-augmented sets add more)


def get_config(arg: str = "opt2.7b"):
    presets = {"opt2.7b": "vitg_opt2.7b", "opt6.7b": "vitg_opt6.7b", "flant5xl": "vitg_flant5xl"}
    if arg not in presets:
        raise ValueError(f"finetune_vqa: argument must be one of {sorted(presets)}, got {arg!r}")
    c = config_lib.base(task="lm", preset=presets[arg])
    c.model.vision = {"image_size": 490}
    c.model.qformer = {"use_qformer_text_input": True}
    c.losses.question_to_qformer = True
    c.input.batch_size = 128
    c.input.dataset = "vqav2"
    c.input.image_size = 490
    c.input.text_processor = "t5_vqa" if arg.startswith("flant5") else "opt_vqa"
    c.input.vqa_prompt = "Question: {} Answer:"
    c.total_steps = 5 * VQAV2_TRAIN_QUESTIONS // 128
    c.optim.peak_lr = 1e-5
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 1000
    c.optim.total_steps = c.total_steps
    c.init.source = "stage1"
    return c

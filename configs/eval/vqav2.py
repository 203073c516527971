"""Zero-shot VQAv2 (paper Table 2): VQA accuracy on val; `:test_dev` writes the server file.

  python -m blip2_jax.evaluate --config=configs/eval/vqav2.py --model=DIR \
      --config.input.manual_dir=/data/vqav2 --config.input.data_dir=/data/tfds
"""
from blip2_jax.evaluators import base


def get_config(arg: str = ""):
    c = base.base_config("vqa")     # beam 5, 1-10 new tokens, prompt/length penalty per LLM
    c.input.dataset = "vqav2"
    c.input.split = arg or "validation"  # "test_dev": predictions only (no answers)
    c.input.image_size = 224           # zero-shot VQA at the pre-training resolution
    c.input.batch_size = 64
    c.metric = "vqav2"
    return c

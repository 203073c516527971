"""The tiny model (configs/tiny/, CPU runs, tests, the miniature) and its synthetic_shapes evaluators."""
from __future__ import annotations

TINY_VISION = dict(kind="eva", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, image_size=64, patch_size=16)
TINY_QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    max_position_embeddings=64)
TINY_OPT = dict(model_type="opt", vocab_size=50272, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                bos_token_id=50256, eos_token_id=198, pad_token_id=50256, dropout=0.0)


def tiny(c, *, text: str | None = "opt", batch_size: int = 16, steps: int = 20):
    """Shrinks a config from `config_lib.base` to the tiny CPU model on synthetic_shapes."""
    c.total_steps = steps
    c.log_every = 5
    c.ckpt_every = 10
    c.model.vision = dict(TINY_VISION)
    c.model.qformer = dict(TINY_QFORMER, use_qformer_text_input=text is None)
    c.model.num_query_tokens = 8
    c.model.image_text_hidden_size = 32
    c.model.vision_dtype = c.model.text_dtype = c.model.frozen_param_dtype = "float32"
    c.model.no_text = text is None
    if text == "opt":
        c.model.text = dict(TINY_OPT)
    c.init.source = "random"
    c.init.bert = ""
    c.input.dataset = "synthetic_shapes"
    c.input.image_size = 64
    c.input.batch_size = batch_size
    c.input.max_text_len = 24
    c.input.max_llm_len = 32
    c.input.max_target_len = 24
    c.input.read_threads = 1
    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.total_steps = steps
    c.optim.min_lr = 1e-4
    return c


def eval_config(kind: str = "caption"):
    """The paper's evaluator of `kind` ("caption", "vqa", "retrieval") on synthetic_shapes at the
    tiny model's resolution (configs/eval/synthetic_shapes.py)."""
    from blip2_jax.evaluators import base

    c = base.base_config(kind)
    c.input.dataset = "synthetic_shapes"
    c.input.split = "validation"
    c.input.image_size = TINY_VISION["image_size"]
    c.input.batch_size = 16
    c.input.read_threads = 1
    if kind == "vqa":
        c.metric = "exact"             # one answer per question: normalised exact match
    elif kind == "caption":
        c.prompt = ""                  # the tiny stage 2 trains captions without a prompt
        c.generation.min_new_tokens = 1  # shape captions can be 3 tokens long
        c.generation.max_new_tokens = 20
    else:
        c.max_text_len = 24            # the tiny config's Q-Former text length
    return c

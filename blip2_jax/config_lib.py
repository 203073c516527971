"""Shared defaults of the training configs in configs/ (ml_collections, big_vision style).

Each config file's `get_config(arg)` starts from `base()` and sets what its paper table says.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from blip2_jax import optim, train_state
from blip2_jax.data import pipeline

# Frozen towers of stages 1 and 2 (train_state's table: ln_vision is trained).
FROZEN_VIT_AND_LLM = train_state.frozen_patterns()
FROZEN_LLM_ONLY = train_state.frozen_patterns(("language_model",))  # captioning fine-tuning: ViT trained


def base(task: str, preset: str | None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task                      # blip2_jax/tasks.py: "stage1" | "lm"
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_ckpts = 3
    c.async_checkpointing = True
    c.grad_accum_steps = 1
    c.mesh_shape = (-1, 1, 1)          # (data, fsdp, tensor); -1 = the remaining devices
    c.max_batch_per_device = 4096      # validation: a larger global batch per device is refused
    c.peak_flops = 0.0                 # per device, for MFU; 0 = look up by device kind
    c.log_mfu = True                   # MFU in the log (XLA's FLOP count of an unrolled trace)

    c.model = ml_collections.ConfigDict()
    c.model.preset = preset            # blip2_jax/models/presets.py
    c.model.from_dir = ""              # or take the architecture from a transformers directory
    c.model.vision = {}                # field overrides, e.g. {"image_size": 364}
    c.model.qformer = {}
    c.model.text = {}
    c.model.no_text = False
    c.model.num_query_tokens = 32
    c.model.vision_dtype = "bfloat16"  # compute dtype of the frozen towers
    c.model.text_dtype = "bfloat16"
    c.model.frozen_param_dtype = "bfloat16"
    c.model.quantize_frozen = "none"   # none | int8 | int4: frozen towers' kernels (blip2_jax/quant.py)
    c.model.scan_layers = True
    c.model.remat_policy = "none"      # none | full | dots | dots_with_no_batch_dims
    c.model.qformer_lm_head = False    # the ITG head (stage 1)

    c.init = ml_collections.ConfigDict()
    c.init.source = "unimodal"         # random | hf | unimodal | stage1 (weights/init.py)
    c.init.hf_dir = ""
    c.init.vision_dir = ""
    c.init.llm_dir = ""
    c.init.bert = "minilm-offline"
    c.init.stage1_workdir = ""

    c.frozen_patterns = FROZEN_VIT_AND_LLM
    c.losses = ml_collections.ConfigDict(dict(
        itc_label_smoothing=0.1, itg_label_smoothing=0.1, same_image_positives=False,
        itc_weight=1.0, itm_weight=1.0, itg_weight=1.0, lm_label_smoothing=0.0,
        lm_loss_tokens=0,  # > 0: LM head at each row's first K labelled positions only
        question_to_qformer=False))
    c.input = pipeline.default_input_config()
    # None-valued fields become typed placeholders so `--config.input.data_dir=...` works.
    c.input.data_dir = config_dict.placeholder(str)
    c.input.manual_dir = config_dict.placeholder(str)
    c.input.num_epochs = config_dict.placeholder(int)
    c.optim = optim.default_config()
    c.evals = ml_collections.ConfigDict()
    # Multi-process runs off TPU pods (on pods these are detected): set all three.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    # start-up and first-step barriers (compilation can take minutes on a busy host)
    c.distributed.initialization_timeout_s = 600
    return c

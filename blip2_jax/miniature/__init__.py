"""BLIP-2 in miniature, the README's main job: the paper's two-stage recipe on the built-in
synthetic corpus, on a CPU, in minutes.

  pipeline.py   the phases (data, unimodal towers, stage 1, stage 2, ablation, evaluation, report)
  config.py     every phase's trainer / evaluator settings (configs/tiny/miniature.py exposes them)
  unimodal.py   the frozen towers' pretraining, each on its own modality
  tiny.py       the tiny model of configs/tiny/ and its synthetic_shapes evaluators
"""

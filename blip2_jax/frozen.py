"""The one table of what is frozen: read by the trainer (train_state.py), the transformers
loader (weights/hf.py), the optimizer and quantization (quant.py).

Paper §3.1: the image encoder and the LLM are frozen. ln_vision (the ViT's `post_layernorm`)
sits outside the frozen ViT in LAVIS and is trained with the Q-Former.
"""
from __future__ import annotations

import re
from typing import Sequence

FROZEN_TOWERS = ("vision_model", "language_model")
TRAINED_IN_TOWERS = ("vision_model/post_layernorm",)
# Norm parameters (kept float32 in frozen half-precision towers, never weight-decayed):
# layer_norm1, post_layernorm, ln_vision, final_layer_norm, ...
NORM_PATTERN = r"(?i)(norm|(^|/)ln(_|\d|/))"


def frozen_patterns(towers: Sequence[str] = FROZEN_TOWERS, sep: str = "/") -> list[str]:
    """Regexes of the frozen parameters of `towers`: '/'-joined paths of our params tree, or
    (sep=".") transformers' tensor names. The `TRAINED_IN_TOWERS` exceptions are left out."""
    out = []
    for tower in towers:
        inner = [t[len(tower) + 1:] for t in TRAINED_IN_TOWERS if t.startswith(tower + "/")]
        skip = "".join(f"(?!{re.escape(t.replace('/', sep))}({re.escape(sep)}|$))" for t in inner)
        out.append(f"^{re.escape(tower)}{re.escape(sep)}{skip}")
    return out

"""Preset parameter counts (computed with jax.eval_shape, nothing allocated) against the
reference classes' counts (tests/golden/param_counts.json, tools/reference_param_counts.py) and
the paper's Table 2."""
import json

import jax
import numpy as np
import pytest
import flax.linen as nn

from blip2_jax import train_state
from blip2_jax.models import presets
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models import build
from tests.conftest import GOLDEN

REFERENCE = json.loads((GOLDEN / "param_counts.json").read_text())


def _counts(name):
    cfg = presets.PRESETS[name]
    abstract = nn.unbox(build.abstract_params(Blip2(cfg), cfg))
    trainable, frozen = train_state.split_params(abstract, list(train_state.DEFAULT_FROZEN_PATTERNS))
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    return cfg, n(trainable), n(trainable) + n(frozen)


@pytest.mark.parametrize("name", sorted(k for k in REFERENCE if not k.startswith("_")))
def test_counts_equal_reference(name):
    cfg, trainable, total = _counts(name)
    # One known, deliberate difference: the ITC temperature is a parameter here (the reference's
    # retrieval model has none).
    temp = 1 if cfg.text is None else 0
    assert total == REFERENCE[name]["total"] + temp
    assert trainable == REFERENCE[name]["trainable"] + temp


@pytest.mark.parametrize("name", sorted(presets.PAPER_PARAMS))
def test_trainable_counts_equal_paper_table2(name):
    _, trainable, total = _counts(name)
    paper_trainable, paper_total = presets.PAPER_PARAMS[name]
    assert round(trainable / 1e6) == round(paper_trainable / 1e6)  # the paper reports whole millions
    # Totals are given to 0.1B in the paper, from rounded component sizes (e.g. "FlanT5-XL 3B").
    assert abs(total - paper_total) / paper_total < 0.06

"""The evaluators by name: the `type` of an evaluator config, and `config.evals` of the trainer.

`config.evals` maps a name to a ConfigDict with `type` (a key of `EVALUATORS`), `every`
(steps) and the evaluator's own fields (evaluators/base.py: `base_config`). Each evaluator
yields `(metric_name, value)` pairs.
"""
from __future__ import annotations

from typing import Any, Iterator

from blip2_jax.evaluators.caption import CaptionEvaluator
from blip2_jax.evaluators.retrieval import RetrievalEvaluator
from blip2_jax.evaluators.vqa import VqaEvaluator

EVALUATORS = {
    "vqa": VqaEvaluator,
    "caption": CaptionEvaluator,
    "retrieval": RetrievalEvaluator,
}


class Evaluators:
    """The trainer's periodic evaluations: (metric prefix, every N steps, evaluator)."""

    def __init__(self, runs: list[tuple[str, int, Any]]):
        self.runs = runs

    def due(self, step: int) -> bool:
        """Whether any evaluation runs at `step`."""
        return any(every and step % every == 0 for _, every, _ in self.runs)

    def run_due(self, step: int, trainable, frozen) -> Iterator[tuple[str, float]]:
        for prefix, every, evaluator in self.runs:
            if every and step % every == 0:
                for name, value in evaluator.run(trainable, frozen):
                    yield f"{prefix}/{name}", float(value)


def get(config, **context):
    """The evaluator of `config.type`, built from `config` (+ the trainer's or CLI's context)."""
    kind = config.get("type")
    if kind not in EVALUATORS:
        raise ValueError(f"unknown type {kind!r}; known: {', '.join(sorted(EVALUATORS))}")
    return EVALUATORS[kind](config, **context)


def from_config(evals, **context) -> Evaluators:
    runs = []
    for prefix, ec in dict(evals or {}).items():
        try:
            evaluator = get(ec, **context)
        except ValueError as e:
            raise ValueError(f"evals.{prefix}: {e}") from None
        runs.append((prefix, int(ec.get("every", 0)), evaluator))
    return Evaluators(runs)

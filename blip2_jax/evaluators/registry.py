"""Evaluators chosen by name in `config.evals` and run periodically by the trainer.

`config.evals` maps a name to a ConfigDict with `type` (a key of `EVALUATORS`), `every`
(steps) and the evaluator's own fields. Each evaluator yields `(metric_name, value)` pairs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

EVALUATORS: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def deco(cls):
        EVALUATORS[name] = cls
        return cls
    return deco


class Evaluators:
    def __init__(self, runs: list[tuple[str, int, Any]]):
        self.runs = runs

    def run_due(self, step: int, trainable, frozen) -> Iterator[tuple[str, float]]:
        for prefix, every, evaluator in self.runs:
            if every and step % every == 0:
                for name, value in evaluator.run(trainable, frozen):
                    yield f"{prefix}/{name}", float(value)


def from_config(evals, **context) -> Evaluators:
    from blip2_jax.evaluators import runners  # noqa: F401  (registers the evaluator types)
    runs = []
    for prefix, ec in dict(evals or {}).items():
        kind = ec.get("type")
        if kind not in EVALUATORS:
            raise ValueError(f"evals.{prefix}: unknown type {kind!r}; known: {', '.join(sorted(EVALUATORS))}")
        runs.append((prefix, int(ec.get("every", 0)), EVALUATORS[kind](ec, **context)))
    return Evaluators(runs)

r"""Evaluation CLI: one evaluator config on a released model or on a training run.

  python -m blip2_jax.evaluate --config=configs/eval/vqav2.py --model=/ckpt/blip2-flan-t5-xl
  python -m blip2_jax.evaluate --config=configs/eval/synthetic_shapes.py:caption \
      --workdir=/tmp/run [--config.input.split=test] [--output_dir=DIR]

--model: a transformers-format BLIP-2 directory (weights, config, tokenizer).
--workdir: a training workdir: its config.json (written by the trainer) rebuilds the model and its
  frozen towers from their sources; the trainable params come from the latest checkpoint.
Predictions and `<name>_results.json` go to --output_dir (default: config.output_dir, else
WORKDIR/eval, else ./eval_outputs); a table of the metrics is printed. Bad inputs end with a
one-line error and exit status 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so that importing this module next
    to the trainer, which has its own --config, is harmless)."""
    config_flags.DEFINE_config_file("config", None, "Evaluator config (configs/eval/*.py).",
                                    lock_config=False)
    flags.DEFINE_string("model", None, "A transformers-format BLIP-2 directory.")
    flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints).")
    flags.DEFINE_string("output_dir", None, "Where predictions and results go.")


class UsageError(ValueError):
    """Wrong command-line use, reported as one line."""


def predictor_from_model_dir(directory: str, config, mesh):
    """The serving predictor of a transformers-format directory; the evaluator config's
    tokenizers, when set, replace the checkpoint's."""
    from blip2_jax import serving

    return serving.Predictor.from_dir(directory, dtype=config.dtype, mesh=mesh, tokenizer=config.llm_tokenizer,
                                      qformer_tokenizer=config.qformer_tokenizer)


def predictor_from_workdir(workdir: str, config, mesh):
    """The serving predictor of a training run (see `serving.Predictor.from_workdir`)."""
    from blip2_jax import serving

    return serving.Predictor.from_workdir(workdir, mesh=mesh, tokenizer=config.llm_tokenizer,
                                          qformer_tokenizer=config.qformer_tokenizer)


def format_table(name: str, results: dict[str, float]) -> str:
    """Metric table in markdown."""
    lines = [f"| {name} | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if abs(v) >= 1 else f"| {k} | {v:.4f} |"
              for k, v in results.items()]
    if not results:
        lines.append("| (no ground truth: predictions only) | |")
    return "\n".join(lines)


def evaluate(config, *, model: str | None = None, workdir: str | None = None,
             output_dir: str | None = None) -> dict[str, float]:
    """Runs the evaluator `config` on `model` or `workdir`; returns its metrics."""
    import jax

    from blip2_jax import cache, sharding
    from blip2_jax.evaluators import base, registry

    if (model is None) == (workdir is None):
        raise UsageError("give exactly one of --model DIR and --workdir DIR")
    for flag, d in (("--model", model), ("--workdir", workdir)):
        if d is not None and not os.path.isdir(d):
            raise UsageError(f"{flag}: directory not found: {d}")
    cache.enable()
    config = base.with_defaults(config)
    config.output_dir = output_dir or config.output_dir or (
        os.path.join(workdir, "eval") if workdir else "eval_outputs")
    mesh = sharding.make_mesh(tuple(config.mesh_shape))
    with sharding.use(mesh):
        if model is not None:
            predictor = predictor_from_model_dir(model, config, mesh)
        else:
            predictor = predictor_from_workdir(workdir, config, mesh)
        evaluator = registry.get(config, mesh=mesh, predictor=predictor)
        results = dict(evaluator.evaluate(predictor))
    if jax.process_index() == 0:
        print(format_table(evaluator.name, results))
        print(f"predictions and results: {config.output_dir}")
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from blip2_jax.preprocess import InputError
    from blip2_jax.weights.safetensors_io import WeightsError
    try:
        f = flags.FLAGS
        evaluate(f.config, model=f.model, workdir=f.workdir, output_dir=f.output_dir)
    except (UsageError, InputError, WeightsError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError, KeyError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()

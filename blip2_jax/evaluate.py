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

import json
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
    """A ModelPredictor over a transformers-format directory (weights, tokenizer, generation
    config), loaded with `blip2_jax.load`."""
    import blip2_jax
    from blip2_jax.evaluators.predictor import ModelPredictor

    loaded = blip2_jax.load(directory, dtype=config.dtype, mesh=mesh)
    has_llm = loaded.config.text is not None
    # A retrieval checkpoint carries the Q-Former's own (BERT) tokenizer.
    qformer_tok = config.qformer_tokenizer or (None if has_llm else directory)
    return ModelPredictor(loaded.model, loaded.config, mesh, loaded.params,
                          llm_tokenizer=config.llm_tokenizer or (directory if has_llm else None),
                          qformer_tokenizer=qformer_tok,
                          generation_config=loaded.generation_config)


def predictor_from_workdir(workdir: str, config, mesh):
    """A ModelPredictor over a training run: frozen towers from the sources its config.json
    names, trainable params from the latest checkpoint."""
    import jax
    import ml_collections

    from blip2_jax import train_state
    from blip2_jax.evaluators.predictor import ModelPredictor
    from blip2_jax.weights import init as init_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UsageError(f"{workdir}: no config.json (not a training workdir, or written by a "
                         "trainer that predates it)")
    with open(path) as f:
        raw = json.load(f)
    if not {"model", "init", "frozen_patterns"} <= set(raw):
        raise UsageError(f"{path} is not a training config (a model directory? use --model)")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UsageError(f"{workdir}: no checkpoints/ directory")
    tc = ml_collections.ConfigDict(raw)
    trained = init_lib.restore_trainable(workdir)  # fails early when there is no checkpoint
    # The trainable part comes from the checkpoint: skip loading what only initialised it.
    if tc.init.get("source") == "stage1":
        tc.init.source = "unimodal"
    if "bert" in tc.init:
        tc.init.bert = ""
    model, model_cfg = init_lib.build_model(tc.model)
    params = init_lib.init_params(model, model_cfg, tc, mesh)
    trainable, frozen = train_state.split_params(params, list(tc.frozen_patterns))
    frozen = train_state.cast_frozen(frozen, tc.model.get("frozen_param_dtype", "bfloat16"))
    want, got = _paths(trainable), _paths(trained)
    if want != got:
        raise UsageError(f"{workdir}: checkpoint params do not match the model of its config.json "
                         f"(missing {sorted(want - got)[:3]}, unexpected {sorted(got - want)[:3]})")
    trainable = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                             trained, trainable)
    ti = tc.get("input", {})
    return ModelPredictor(model, model_cfg, mesh, train_state.merge_params(trainable, frozen),
                          llm_tokenizer=config.llm_tokenizer or ti.get("llm_tokenizer"),
                          qformer_tokenizer=config.qformer_tokenizer or ti.get("qformer_tokenizer"))


def _paths(tree, prefix=()) -> set:
    out = set()
    for k, v in tree.items():
        out |= _paths(v, prefix + (k,)) if hasattr(v, "items") else {"/".join(prefix + (k,))}
    return out


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
    import flax.linen as nn
    import jax

    from blip2_jax import sharding
    from blip2_jax.evaluators import registry, runners

    if (model is None) == (workdir is None):
        raise UsageError("give exactly one of --model DIR and --workdir DIR")
    for flag, d in (("--model", model), ("--workdir", workdir)):
        if d is not None and not os.path.isdir(d):
            raise UsageError(f"{flag}: directory not found: {d}")
    config = runners.with_defaults(config)
    config.output_dir = output_dir or config.output_dir or (
        os.path.join(workdir, "eval") if workdir else "eval_outputs")
    mesh = sharding.make_mesh(tuple(config.mesh_shape))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        if model is not None:
            predictor = predictor_from_model_dir(model, config, mesh)
        else:
            predictor = predictor_from_workdir(workdir, config, mesh)
        evaluator = registry.EVALUATORS[config.type](config, mesh=mesh, predictor=predictor)
        results = dict(evaluator.evaluate(predictor))
    if jax.process_index() == 0:
        print(format_table(evaluator.name, results))
        print(f"predictions and results: {config.output_dir}")
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from blip2_jax.preprocess import InputError
    try:
        f = flags.FLAGS
        evaluate(f.config, model=f.model, workdir=f.workdir, output_dir=f.output_dir)
    except (UsageError, InputError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError, KeyError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)

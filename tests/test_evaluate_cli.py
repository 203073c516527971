"""The evaluation CLI end to end: tiny fake corpora in the official formats with tiny
transformers-format models (--model), and synthetic_shapes with training workdirs (--workdir)."""
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import GOLDEN, ROOT
from tests.test_data_builders import _jpeg, _vqa_copy, _write


def _config(name, arg=""):
    return runpy.run_path(str(ROOT / "configs" / "eval" / f"{name}.py"))["get_config"](arg)


def _cli(*args):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return subprocess.run([sys.executable, "-m", "blip2_jax.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _read(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --model DIR and --workdir DIR"),
    (["--model=/nonexistent/blip2"], "--model: directory not found: /nonexistent/blip2"),
    (["--workdir=tests"], "no config.json"),
    (["--workdir=tests/golden/blip2_opt"], "is not a training config"),
    (["--model=tests/golden", "--config.type=bleu"], "unknown evaluator type 'bleu'"),
])
def test_bad_input_is_one_line_error(args, message):
    out = _cli("--config=configs/eval/vqav2.py", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


# ------------------------------------------------------------------------------ --model
@pytest.mark.slow
def test_cli_vqav2_on_fake_corpus(tmp_path):
    manual = tmp_path / "vqa"
    _vqa_copy(manual, "v2_OpenEnded_mscoco_val2014_questions.json",
              "v2_mscoco_val2014_annotations.json", "val2014")
    out = _cli("--config=configs/eval/vqav2.py", f"--model={GOLDEN / 'blip2_opt'}",
               f"--config.input.manual_dir={manual}", f"--config.input.data_dir={tmp_path / 'tfds'}",
               "--config.input.image_size=32", "--config.input.batch_size=8",
               "--config.input.read_threads=1", "--config.dtype=float32",
               f"--output_dir={tmp_path / 'out'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| vqa_vqav2_validation | value |" in out.stdout and "| accuracy |" in out.stdout
    assert "ETA" in out.stderr or "batch" in out.stderr  # the progress bar
    preds = _read(tmp_path / "out" / "vqa_vqav2_validation_predictions.json")
    assert sorted(p["question_id"] for p in preds) == [420, 421, 422]
    assert all(isinstance(p["answer"], str) for p in preds)
    res = _read(tmp_path / "out" / "vqa_vqav2_validation_results.json")
    assert 0.0 <= res["metrics"]["accuracy"] <= 100.0 and res["num_examples"] == 3


def _coco_copy(manual):
    images = []
    for i, split in enumerate(["train", "val", "test", "test", "test"]):
        fname = f"COCO_val2014_{i:012d}.jpg"
        _write(manual / "val2014" / fname, _jpeg(i))
        images.append({"filepath": "val2014", "filename": fname, "split": split, "cocoid": i,
                       "sentences": [{"raw": f"a photo of thing number {i} on a table"},
                                     {"raw": f"thing {i}"}]})
    _write(manual / "dataset_coco.json", {"images": images})


@pytest.mark.slow
def test_evaluate_caption_t5_and_retrieval_itm_models(tmp_path):
    from blip2_jax.cli.evaluate import evaluate
    manual = tmp_path / "coco"
    _coco_copy(manual)
    c = _config("coco_caption")
    c.input.update(dict(manual_dir=str(manual), data_dir=str(tmp_path / "tfds"), image_size=28,
                        batch_size=8, read_threads=1))
    c.dtype, c.spice = "float32", False
    c.generation.max_new_tokens = 10  # the tiny T5's answers: keep the beam loop short
    c.generation.min_new_tokens = 2
    res = evaluate(c, model=str(GOLDEN / "blip2_t5"), output_dir=str(tmp_path / "cap"))
    assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(res)
    preds = _read(tmp_path / "cap" / "caption_coco_karpathy_test_predictions.json")
    assert sorted(p["image_id"] for p in preds) == [2, 3, 4]

    r = _config("coco_retrieval")
    r.input.update(dict(manual_dir=str(manual), data_dir=str(tmp_path / "tfds"), image_size=48,
                        batch_size=8, read_threads=1))
    r.dtype, r.text_batch_size, r.k = "float32", 8, 4
    res = evaluate(r, model=str(GOLDEN / "blip2_itm"), output_dir=str(tmp_path / "ret"))
    assert {"txt_r1", "txt_r5", "img_r1", "img_r_mean", "itc_txt_r1"} <= set(res)
    assert res["txt_r5"] == res["img_r5"] == 100.0  # 3 images, 6 texts: everything is in a top 5
    top = _read(tmp_path / "ret" / "retrieval_coco_karpathy_test_predictions.json")
    assert len(top["texts"]) == 6 and len(top["t2i_top"]) == 6


# ------------------------------------------------------------------------------ --workdir
def _fake_workdir(path, name):
    """A workdir as the trainer leaves it: config.json and a checkpoint of the TrainState."""
    import jax

    from blip2_jax import checkpoint, main, sharding
    config = runpy.run_path(str(ROOT / "configs" / "tiny" / f"{name}.py"))["get_config"]("")
    mesh = sharding.make_mesh(tuple(config.mesh_shape))
    with sharding.use(mesh):
        *_, state, frozen, _ = main.create_state(config, mesh)
    # A "trained" Q-Former: different from the random init the evaluator would otherwise get.
    state = state.replace(params=jax.tree.map(lambda x: x + 0.01, state.params))
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(3, state, {"step": 3}, force=True)
    ckpt.close()
    return jax.tree.map(np.asarray, state.params)


@pytest.mark.slow
def test_evaluate_synthetic_shapes_from_workdirs(tmp_path):
    from blip2_jax.cli import evaluate as cli
    from blip2_jax import sharding, train_state
    from blip2_jax.evaluators import registry

    def shapes(kind):
        c = _config("synthetic_shapes", kind)
        c.input.update(dict(dataset="synthetic_shapes/tiny", data_dir=str(tmp_path / "tfds")))
        c.output_dir = str(tmp_path / kind)
        c.progress = False
        if kind != "retrieval":
            c.generation.max_new_tokens = 5
        return c

    # Stage 2 (OPT): the predictor carries the checkpoint's trainable params next to the towers.
    stage2 = str(tmp_path / "stage2")
    trained = _fake_workdir(stage2, "stage2_opt")
    pred = cli.predictor_from_workdir(stage2, shapes("caption"), sharding.make_mesh())
    loaded, _ = train_state.split_params(pred.params, list(train_state.DEFAULT_FROZEN_PATTERNS))
    np.testing.assert_array_equal(np.asarray(loaded["qformer"]["query_tokens"]),
                                  trained["qformer"]["query_tokens"])
    cap = dict(registry.EVALUATORS["caption"](shapes("caption")).evaluate(pred))
    assert {"Bleu_4", "CIDEr"} <= set(cap)
    vqa = dict(registry.EVALUATORS["vqa"](shapes("vqa")).evaluate(pred))
    assert set(vqa) == {"accuracy"} and 0.0 <= vqa["accuracy"] <= 100.0
    preds = _read(tmp_path / "vqa" / "vqa_synthetic_shapes-tiny_validation_predictions.json")
    assert len(preds) == 16  # one question per validation scene, keyed by image id

    # Stage 1 (Q-Former heads) through the CLI entry point; results default to WORKDIR/eval.
    stage1 = str(tmp_path / "stage1")
    _fake_workdir(stage1, "stage1")
    r = shapes("retrieval")
    r.output_dir = None
    ret = cli.evaluate(r, workdir=stage1)
    assert ret["txt_r10"] >= ret["txt_r5"] >= ret["txt_r1"] >= 0.0
    saved = _read(os.path.join(stage1, "eval",
                               "retrieval_synthetic_shapes-tiny_validation_results.json"))
    assert set(saved["metrics"]) >= {"txt_r1", "img_r1", "r_mean"}

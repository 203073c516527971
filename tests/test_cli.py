"""The command-line tools, run as users run them (`python -m blip2_jax.<tool>`), against the
golden references; bad input must give exit code != 0 and one line on stderr, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import GOLDEN, ROOT

skimage_data = pytest.importorskip("skimage.data")
TOL = 1e-4
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_PLATFORMS="cpu")


def cli(tool, *args):
    return subprocess.run([sys.executable, "-m", f"blip2_jax.{tool}", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=600)


def reference(case):
    return json.loads((GOLDEN / case / "reference.json").read_text())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The golden photos as lossless PNG files, by index."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, name in enumerate(reference("blip2_opt")["images"]):
        paths.append(folder / f"{i}_{name}.png")
        Image.fromarray(getattr(skimage_data, name)()).save(paths[-1])
    return paths


def generate_args(case, photos):
    args = []
    for i, p in zip(case["image_index"], case["prompts"]):
        args += ["--image", photos[i]] + ([] if p is None else ["--prompt", p])
    for k, v in case["kwargs"].items():
        if k != "do_sample":
            args += [f"--{k}", str(v).lower() if isinstance(v, bool) else v]
    return args


@pytest.mark.parametrize("case_dir,name", [("blip2_opt", "greedy_prompts"), ("blip2_t5", "beam4_lp2_early")])
def test_generate_json(photos, case_dir, name):
    case = next(c for c in reference(case_dir)["generate"] if c["name"] == name)
    run = cli("generate", "--model", GOLDEN / case_dir, *generate_args(case, photos), "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["token_ids"] for r in rows] == case["new_tokens"]
    assert [r["image"] for r in rows] == [str(photos[i]) for i in case["image_index"]]
    assert [r["prompt"] for r in rows] == case["prompts"]
    assert all(isinstance(r["text"], str) for r in rows)


def test_score_json(photos):
    case = reference("blip2_opt")["score"][1]
    texts = [a for t in case["texts"] for a in ("--text", t)]
    run = cli("score", "--model", GOLDEN / "blip2_opt", "--image", photos[case["image_index"]],
              "--prompt", case["prompt"], *texts, "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["text"] for r in rows] == case["texts"]
    assert [r["num_tokens"] for r in rows] == case["num_tokens"]
    np.testing.assert_allclose([r["log_likelihood"] for r in rows], case["log_likelihood"], rtol=0, atol=TOL)


def test_match_json(photos):
    ref = reference("blip2_itm")
    npz = np.load(GOLDEN / "blip2_itm" / "reference.npz")
    run = cli("match", "--model", GOLDEN / "blip2_itm", "--image", photos[1], "--text", ref["texts"][1], "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    logits = npz["itm_logits"][1, 1].astype(np.float64)
    assert abs(out["itm_probability"] - np.exp(logits[1]) / np.exp(logits).sum()) < TOL
    assert abs(out["itc_similarity"] - npz["logits_per_image"][1, 1]) < TOL


def test_retrieve_json(photos, tmp_path):
    ref = reference("blip2_itm")
    npz = np.load(GOLDEN / "blip2_itm" / "reference.npz")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for p in photos[:2]:  # the npz covers photos 0 and 1
        (gallery / p.name).write_bytes(p.read_bytes())
    (gallery / "notes.txt").write_text("not an image, skipped by extension")
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(ref["texts"]) + "\n\n")
    run = cli("retrieve", "--model", GOLDEN / "blip2_itm", "--images", gallery, "--queries", queries,
              "--k", 1, "--top", 2, "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["query"] for r in rows] == ref["texts"]
    for t, row in enumerate(rows):
        itc = npz["logits_per_text"][t]
        best = int(np.argmax(itc))  # k=1: only the ITC-best image is re-scored, the other is dropped
        assert [os.path.basename(h["image"]) for h in row["results"]] == [photos[best].name]
        assert abs(row["results"][0]["score"] - (npz["itm_logits"][best, t, 1] + itc[best])) < TOL


def one_line_error(run):
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_input(photos, tmp_path):
    opt = GOLDEN / "blip2_opt"
    (tmp_path / "fake.jpg").write_text("this is text")
    (tmp_path / "empty_model").mkdir()
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((opt / "config.json").read_text())
    cases = [
        (("generate", "--model", opt, "--image", tmp_path / "missing.png"), "not found"),
        (("generate", "--model", opt, "--image", tmp_path / "fake.jpg"), "cannot read image"),
        (("generate", "--model", tmp_path / "empty_model", "--image", photos[0]), "config.json"),
        (("generate", "--model", only_config, "--image", photos[0]), "tokenizer"),
        (("generate", "--model", opt, "--image", photos[0], "--prompt", "word " * 200), "at most"),
        (("generate", "--model", opt, "--image", photos[0], "--num_beams", 0), "--num_beams"),
        (("generate", "--model", opt, "--image", photos[0], "--cores", 0), "--cores"),
        (("match", "--model", opt, "--image", photos[0], "--text", "a cat"), "captioning checkpoint"),
        (("score", "--model", GOLDEN / "blip2_itm", "--image", photos[0], "--text", "a"), "retrieval checkpoint"),
        (("retrieve", "--model", GOLDEN / "blip2_itm", "--images", tmp_path / "empty_model", "--queries",
          tmp_path / "fake.jpg"), "no image files"),
    ]
    for args, expected in cases:
        line = one_line_error(cli(*args))
        assert expected in line, (args, line)
        assert line.startswith(f"blip2_jax.{args[0]}: error:"), line

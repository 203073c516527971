"""CapFilt (`blip2_jax.data.capfilt`, `python -m blip2_jax.capfilt`) with the tiny golden models:
its sampled captions are the captioner's own nucleus samples and its scores the scorer's ITC
similarities (both through `blip2_jax.load`), the top N are kept, every program compiles once;
the Beam pipeline (DirectRunner, RunInference) and the plain JAX job write the same dataset,
corrupt images are counted, a rerun refuses or resumes (only unfinished shards are redone), and
training reads the output, one kept caption per image per step, the same after a resume."""
import dataclasses
import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import blip2_jax
from blip2_jax.cli import capfilt as cli
from blip2_jax.data import builders, capfilt, pipeline
from blip2_jax.data import text as text_lib
from tests.conftest import GOLDEN

CAPTIONER, SCORER = GOLDEN / "blip2_opt", GOLDEN / "blip2_itm"
OPTIONS = capfilt.Options(num_captions=3, keep=2, max_new_tokens=5, batch_size=4)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def web_pairs(tmp_path_factory):
    """image_text_pairs (single-process builder) of 11 images, image 5 corrupt (kept by the
    builder, which does not decode; CapFilt skips it)."""
    root = tmp_path_factory.mktemp("web")
    (root / "raw").mkdir()
    with tarfile.open(root / "raw" / "00000.tar", "w") as tar:
        for k in range(11):
            for ext, data in ((".jpg", b"broken" if k == 5 else jpeg(k)), (".txt", f"web caption {k}!".encode())):
                info = tarfile.TarInfo(f"s{k:02d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    builders.prepare_dataset("image_text_pairs", root / "tfds", root / "raw")
    return root / "tfds"


@pytest.fixture(scope="module")
def models():
    return blip2_jax.load(CAPTIONER), blip2_jax.load(SCORER)


def test_candidates_and_selection():
    pool = capfilt.candidates(["A dog!", "", "a dog"], ["a cat", "A Dog", "  ", "a bird"], max_words=50)
    assert pool == [("A dog!", "web", "a dog"), ("a cat", "synthetic", "a cat"), ("a bird", "synthetic", "a bird")]
    row = capfilt.select(pool, [0.5, 0.7, 0.5], ["A dog!", ""], keep=2)
    assert row["captions"] == ["a cat", "A dog!"] and row["caption_sources"] == ["synthetic", "web"]  # tie: web first
    assert row["caption_scores"] == [0.7, 0.5] and row["web_caption_scores"][0] == 0.5
    assert np.isnan(row["web_caption_scores"][1])
    assert capfilt.batch_seed(0, 1, 2) == capfilt.batch_seed(0, 1, 2) != capfilt.batch_seed(0, 2, 1)


@pytest.mark.slow
def test_step_samples_scores_and_keeps_like_the_models_do(models):
    cap, sc = models
    images = [Image.open(io.BytesIO(jpeg(k))) for k in range(3)]
    web = [["web caption zero"], ["Web caption one", "another"], []]
    step = capfilt.CapfiltStep(cap.predictor, sc.predictor, OPTIONS)
    rows = step(cap.pixel_values(images), sc.pixel_values(images), web, seed=7)

    def compiled():
        return (cap.predictor._generate._cache_size(), sc.predictor._image_side._cache_size(),
                sc.predictor._text_side._cache_size())
    before = compiled()
    step(cap.pixel_values(images[:1]), sc.pixel_values(images[:1]), [["x"]], seed=1)  # other batch sizes,
    step(cap.pixel_values(images + images[:1]), sc.pixel_values(images + images[:1]), [[]] * 4, seed=2)
    assert compiled() == before  # caption counts: nothing compiles again
    # the captioner's own nucleus samples (3 rows; the step padded them to its batch of 4)
    sampled = cap.generate(images, do_sample=True, top_p=0.9, top_k=0, num_return_sequences=3, max_new_tokens=5,
                           seed=7)
    for i, row in enumerate(rows):
        pool = capfilt.candidates(web[i], sampled[3 * i:3 * i + 3], 50)
        sims = sc.match([images[i]], [norm for _, _, norm in pool])["itc_similarity"][0]
        order = sorted(range(len(pool)), key=lambda j: (-sims[j], j))[:2]
        assert row["captions"] == [pool[j][0] for j in order]
        assert row["caption_sources"] == [pool[j][1] for j in order]
        np.testing.assert_allclose(row["caption_scores"], sims[order], atol=1e-5)
        np.testing.assert_allclose(row["web_caption_scores"], sims[:len(web[i])], atol=1e-5)
    assert any(s == "synthetic" for r in rows for s in r["caption_sources"])


def test_refuses_models_that_cannot_do_their_part(models):
    cap, sc = models
    with pytest.raises(ValueError, match="scorer"):
        capfilt.CapfiltStep(cap.predictor, cap.predictor, OPTIONS)
    with pytest.raises(ValueError, match="captioner"):
        capfilt.CapfiltStep(sc.predictor, sc.predictor, OPTIONS)
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(OPTIONS, top_p=1.5).validate()


def run_cli(web_pairs, out, *extra):
    """`python -m blip2_jax.capfilt` in this process -> (exit code, its JSON summary)."""
    import contextlib
    buf = io.StringIO()
    args = ["--input", "image_text_pairs:train", "--input_data_dir", str(web_pairs), "--captioner", str(CAPTIONER),
            "--scorer", str(SCORER), "--output_dir", str(out), "--num_captions", "3", "--max_new_tokens", "5",
            "--batch_size", "4", "--shard_size", "4", "--workers", "2", "--no_progress", *extra]
    with contextlib.redirect_stdout(buf):
        try:
            code = cli.main(args)
        except SystemExit as e:  # a one-line error
            code = e.code
    lines = buf.getvalue().splitlines()
    return code, (json.loads(lines[-1]) if lines else None)


def read_output(out) -> list[dict]:
    src = builders.get_builder("capfilt_pairs", out).as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in src[i].items()} for i in range(len(src))]


@pytest.fixture(scope="module")
def jax_output(web_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("jax_out")
    code, summary = run_cli(web_pairs, out, "--engine", "jax")
    assert code == 0 and summary["complete"] and summary["skipped"] == {"undecodable_image": 1}
    assert summary["totals"]["images"] == 10 and summary["shards"] == 3
    return out


def same_records(a, b):
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.pop("caption_scores"), y.pop("caption_scores"), atol=1e-6)
        np.testing.assert_allclose(x.pop("web_caption_scores"), y.pop("web_caption_scores"), atol=1e-6)
        assert x == y


@pytest.mark.slow  # a CapFilt run (JAX job, then the Beam pipeline)
def test_beam_pipeline_writes_what_the_jax_job_writes(web_pairs, jax_output, tmp_path):
    code, summary = run_cli(web_pairs, tmp_path, "--engine", "beam", "--runner=DirectRunner")
    assert code == 0 and summary["complete"]
    assert (summary["images"], summary["skipped"]) == (10, {"undecodable_image": 1})
    got, want = read_output(tmp_path), read_output(jax_output)
    assert len(got) == 10 and 5 not in [r["image_id"] for r in got]
    for r in got:
        assert len(r["captions"]) == 2 and r["caption_scores"] == sorted(r["caption_scores"], reverse=True)
        assert r["web_captions"] == [f"web caption {r['image_id']}!".encode()]
    same_records(got, want)
    meta = builders.get_builder("capfilt_pairs", tmp_path).info.metadata
    assert meta["images"] == 10 and meta["kept_web"] + meta["kept_synthetic"] == 20
    assert meta["settings"]["options"]["num_captions"] == 3


@pytest.mark.slow
def test_rerun_refuses_or_resumes_only_unfinished_shards(web_pairs, jax_output, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(jax_output, out)
    version = out / "capfilt_pairs" / "1.0.0"
    code, _ = run_cli(web_pairs, out, "--engine", "beam")
    assert code == 2  # refused: the output exists
    # a run killed before shard 1 was committed: its marker and the dataset metadata never written
    (version / "capfilt" / "part-00001.done.json").unlink()
    (version / "dataset_info.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in version.glob("capfilt_pairs-train*")}
    code, summary = run_cli(web_pairs, out, "--engine", "beam", "--if_exists", "resume")
    assert code == 0 and (summary["shards"], summary["already_done_shards"], summary["images"]) == (1, 2, 3)  # shard 1 holds the corrupt image
    after = {p.name: p.stat().st_mtime_ns for p in version.glob("capfilt_pairs-train*")}
    assert [n for n in after if after[n] != kept[n]] == ["capfilt_pairs-train.array_record-00001-of-00003"]
    same_records(read_output(out), read_output(jax_output))
    code, _ = run_cli(web_pairs, out, "--engine", "jax", "--if_exists", "resume", "--keep", "3")
    assert code == 2  # other settings are not continued


@pytest.mark.slow
def test_training_samples_one_kept_caption_per_step(jax_output):
    cfg = pipeline.default_input_config()
    cfg.update(dataset="capfilt_pairs", data_dir=str(jax_output), prepare=False, batch_size=5, image_size=32,
               read_threads=1, seed=3)
    kept = {r["image_id"]: [text_lib.normalize_caption(c.decode()) for c in r["captions"]]
            for r in read_output(jax_output)}
    tok = pipeline.load_tokenizer(cfg.qformer_tokenizer, qformer=True)

    def captions(it, steps):
        out = []
        for _ in range(steps):
            b = next(it)
            for iid, ids in zip(b["image_id"].tolist(), b["qformer_input_ids"]):
                out.append((iid, tok.decode([t for t in ids.tolist() if t], skip_special_tokens=True)))
        return out

    it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
    first = captions(it, 4)
    state = it.get_state()
    rest = captions(it, 4)
    for iid, text in first + rest:
        assert text in kept[iid]
    chosen = {}
    for iid, text in first + rest:  # over four epochs each image trains on both of its captions
        chosen.setdefault(iid, set()).add(text)
    assert sum(len(v) == 2 for v in chosen.values()) >= 5
    assert captions(pipeline.make_iterator(cfg, process_index=0, process_count=1), 8) == first + rest
    resumed = pipeline.make_iterator(cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    assert captions(resumed, 4) == rest
    cfg.seed = 4
    assert captions(pipeline.make_iterator(cfg, process_index=0, process_count=1), 8) != first + rest
    assert os.path.exists(jax_output)


def _evidence_tool():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "capfilt_evidence.py")
    spec = importlib.util.spec_from_file_location("capfilt_evidence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evidence_takes_each_seeds_models_from_a_multi_seed_miniature(tmp_path):
    """tools/capfilt_evidence.py --miniature M: seed 0's runs in M, seed S's in M/seed_S (the
    miniature's layout); a missing run is one line naming it; --stage1_steps rescales the run."""
    tool = _evidence_tool()
    for run in ("stage1", "stage2", "seed_1/stage1", "seed_1/stage2"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "config.json").write_text(json.dumps(
            {"input": {"dataset": "synthetic_shapes", "data_dir": "D", "seed": 0}, "seed": 0, "total_steps": 600,
             "ckpt_every": 600, "optim": {"total_steps": 600}}))
    assert tool.miniature_runs(str(tmp_path), 0) == {k: str(tmp_path / k) for k in ("stage1", "stage2")}
    assert tool.miniature_runs(str(tmp_path), 1)["stage2"] == str(tmp_path / "seed_1" / "stage2")
    with pytest.raises(SystemExit, match="no finished stage1 run for seed 2"):
        tool.miniature_runs(str(tmp_path), 2)
    c = tool.stage1_config(str(tmp_path / "stage1"), "capfilt_pairs", "OUT", 3, steps=2400)
    assert (c.input.dataset, c.input.data_dir, c.seed, c.input.seed) == ("capfilt_pairs", "OUT", 3, 3)
    assert c.total_steps == c.optim.total_steps == c.ckpt_every == 2400
    assert tool.stage1_config(str(tmp_path / "stage1"), "x", "y", 0).total_steps == 600

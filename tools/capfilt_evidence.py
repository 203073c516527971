"""CapFilt in miniature: with noisy web captions, does CapFilt give stage 1 better captions, and a
better model? (paper §3.4; the figures in docs/data.md come from this script)

    python tools/capfilt_evidence.py --workdir W [--seeds 5] [--images 4000] [--noise 0.5]
        [--miniature_src DIR | --miniature M] [--stage1_steps N]

Steps (each skipped when its output exists, so a rerun continues):
  models    `python -m blip2_jax.miniature --workdir W/miniature/seed_S --seed S` per seed (from
            --miniature_src, a copy of the project, when given): its frozen towers, stage-1
            (retrieval) and stage-2 (captioning) models. Only the public artifacts are used: the
            training workdirs named stage1 and stage2, and the stage-1 run's config.json.
            `--miniature M` uses the runs of `python -m blip2_jax.miniature --seeds N --workdir M`
            instead (seed S in M/seed_S, seed 0 in M itself)
  web       new scenes drawn like the miniature's corpus (another generator seed; scenes equal
            to a held-out test scene left out), each with one web caption: one of its true
            captions, or for a share `--noise` of them, in equal parts, a caption of another
            scene, the true caption cut short, or generic alt text; written as webdataset tars
            (W/web/noisy/*.tar, and the same images with their true caption in W/web/clean/)
  build     `python -m blip2_jax.build_pairs` (Apache Beam, DirectRunner) -> image_text_pairs
  capfilt   `python -m blip2_jax.capfilt` with seed 0's stage-2 captioner and stage-1 scorer
            (K = 10 nucleus samples at top-p 0.9, N = 2 kept) -> capfilt_pairs
  quality   each image's web caption and its kept captions against the scene's objects:
            faithful (names at least one (colour, shape) and only ones in the scene), wrong
            (names one that is not there), object recall
  stage 1   per seed, the miniature's stage 1 (its config.json: same start, steps, batch) on the
            noisy web captions, on CapFilt's output and on the true captions (`--stage1_steps`:
            another step count, the schedule scaled with it); held-out retrieval
            R@1 (ITC top 16 re-ranked by ITM) on the miniature's test scenes
Results: W/results.json and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB_SEED = 7            # the web corpus's scene generator (the miniature's corpus uses 0)
PER_TAR = 1000
GENERIC = ("image", "photo", "untitled", "click to enlarge", "stock photo", "view full size",
           "img 0423 jpg", "no description available", "thumbnail", "picture of the day",
           "shop now free shipping on all orders", "copyright all rights reserved")
NOISE_KINDS = ("other_scene", "truncated", "generic")


def run(cmd: list[str], log: str, src: str = ROOT) -> dict:
    """Runs a blip2_jax command line (from the project copy `src`); returns its JSON summary
    (the last stdout line)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    if src != ROOT:
        env["PYTHONPATH"] = src
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as err:
        p = subprocess.run(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed (exit {p.returncode}); see {log}")
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# ------------------------------------------------------------------------------ the web corpus
def is_run(d: str) -> bool:
    """A finished training workdir: config.json + checkpoints/."""
    return os.path.isfile(os.path.join(d, "config.json")) and os.path.isdir(os.path.join(d, "checkpoints"))


def find_run(folder: str, name: str) -> str | None:
    """The training workdir called `name` under `folder`."""
    for d, _, _ in os.walk(folder):
        if os.path.basename(d) == name and is_run(d):
            return d
    return None


def test_scene_keys(dataset: str, data_dir: str) -> set[str]:
    """Scene keys (synthetic_shapes.scene_key) of the miniature's held-out test scenes."""
    import tensorflow_datasets as tfds

    from blip2_jax.data import builders  # noqa: F401  registers synthetic_shapes
    src = tfds.data_source(dataset, split="test", data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()})
    keys = set()
    for r in src:
        o = r["objects"]
        objs = sorted((s.decode(), c.decode(), z.decode(), int(row), int(col)) for s, c, z, row, col in
                      zip(o["shape"], o["colour"], o["size"], o["row"], o["col"]))
        keys.add(json.dumps([r["background"].decode(), [list(x) for x in objs]]))
    return keys


def web_scenes(n: int, look, exclude: set[str]) -> list[dict]:
    """n new scenes of the miniature corpus's look (its BuilderConfig `look`, another generator
    seed), none equal to an excluded (test) scene."""
    import inspect

    from blip2_jax.data.builders import synthetic_shapes as ss
    cfg = dataclasses.replace(look, name="capfilt_web", seed=WEB_SEED, num_train=n + 50, num_validation=0,
                              num_test=0)
    extra = [getattr(cfg, k) for k in ("colours", "full_caption") if k in inspect.signature(ss.make_example).parameters]
    out = []
    for index, scene in ss.assign_splits(cfg)["train"]:
        if json.dumps(json.loads(ss.scene_key(scene))) in exclude or len(out) == n:
            continue
        ex = ss.make_example(scene, index, cfg.image_size, cfg.seed, *extra)
        out.append({"image": ex["image"], "captions": ex["captions"],
                    "objects": [(o["colour"], o["shape"]) for o in ex["objects"]]})
    return out


def web_captions(scenes: list[dict], noise: float, seed: int = 0) -> list[tuple[str, str, str]]:
    """(web caption, its kind, the true caption it replaces) per scene."""
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(scenes):
        true = s["captions"][rng.integers(len(s["captions"]))]
        kind = NOISE_KINDS[rng.integers(3)] if rng.random() < noise else "clean"
        if kind == "other_scene":
            j = (i + 1 + rng.integers(len(scenes) - 1)) % len(scenes)
            web = scenes[j]["captions"][rng.integers(len(scenes[j]["captions"]))]
        elif kind == "truncated":
            words = true.split()
            web = " ".join(words[:1 + rng.integers(max(len(words) // 2, 1))])
        elif kind == "generic":
            web = GENERIC[rng.integers(len(GENERIC))]
        else:
            web = true
        out.append((web, kind, true))
    return out


def write_tars(folder: str, scenes: list[dict], captions: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for t in range(0, len(scenes), PER_TAR):
        with tarfile.open(os.path.join(folder, f"{t // PER_TAR:05d}.tar"), "w") as tar:
            for i in range(t, min(t + PER_TAR, len(scenes))):
                for ext, data in ((".png", scenes[i]["image"]), (".txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------ caption quality
def mentions(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names ("a large red circle" -> {("red", "circle")})."""
    from blip2_jax.data.builders import synthetic_shapes as ss
    words = re.findall(r"[a-z]+", caption.lower())
    return {(a, b) for a, b in zip(words, words[1:]) if a in ss.COLOURS and b in ss.SHAPES}


def word_precision(caption: str, truth: set[str], vocabulary) -> float | None:
    """The share of a caption's words from `vocabulary` (colours or shapes) that the scene has;
    None when it names none."""
    named = {w for w in re.findall(r"[a-z]+", caption.lower()) if w in vocabulary}
    return len(named & truth) / len(named) if named else None


def caption_quality(captions: dict[int, list[str]], objects: dict[int, list]) -> dict[str, float]:
    """Mean over images (and over an image's captions: training samples one per step) of:
    faithful, wrong (a named object that is not in the scene), object recall; and over captions
    naming any, the precision of colour words and of shape words taken alone."""
    from blip2_jax.data.builders import synthetic_shapes as ss
    faithful, wrong, recall, colour, shape = [], [], [], [], []
    for iid, caps in captions.items():
        truth = set(map(tuple, objects[iid]))
        f, w, r = [], [], []
        for c in caps:
            m = mentions(c)
            f.append(bool(m) and m <= truth)
            w.append(bool(m - truth))
            r.append(len(m & truth) / len(truth))
            colour.append(word_precision(c, {o[0] for o in truth}, ss.COLOURS))
            shape.append(word_precision(c, {o[1] for o in truth}, ss.SHAPES))
        faithful.append(np.mean(f))
        wrong.append(np.mean(w))
        recall.append(np.mean(r))
    named = lambda xs: float(np.mean([x for x in xs if x is not None])) if any(x is not None for x in xs) else 0.0  # noqa: E731
    return {"faithful": float(np.mean(faithful)), "wrong": float(np.mean(wrong)),
            "object_recall": float(np.mean(recall)), "colour_precision": named(colour),
            "shape_precision": named(shape), "images": len(captions)}


def read_dataset(name: str, data_dir: str) -> dict[int, dict]:
    import tensorflow_datasets as tfds

    from blip2_jax.data import builders
    src = builders.get_builder(name, data_dir).as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    out = {}
    for r in src:
        rec = {k: r[k] for k in ("captions", "caption_sources", "caption_scores", "web_captions") if k in r}
        out[int(r["image_id"])] = {k: ([x.decode() if isinstance(x, bytes) else float(x) for x in v]) for k, v in rec.items()}
    return out


# ------------------------------------------------------------------------------ stage 1
def miniature_runs(workdir: str, seed: int) -> dict[str, str]:
    """Seed `seed`'s stage-1 and stage-2 workdirs in a multi-seed miniature workdir."""
    from blip2_jax.miniature import pipeline
    runs = {k: os.path.join(pipeline.run_dir(os.path.abspath(workdir), seed), k) for k in ("stage1", "stage2")}
    for k, d in runs.items():
        if not is_run(d):
            raise SystemExit(f"error: {workdir} has no finished {k} run for seed {seed} ({d})")
    return runs


def stage1_config(reference: str, dataset: str, data_dir: str, seed: int, steps: int | None = None):
    """The miniature's stage-1 run (its config.json) on another dataset, optionally for `steps`."""
    import ml_collections
    with open(os.path.join(reference, "config.json")) as f:
        c = ml_collections.ConfigDict(json.load(f))
    c.input.dataset, c.input.data_dir = dataset, data_dir
    c.seed = c.input.seed = seed
    if steps:
        c.total_steps = c.optim.total_steps = c.ckpt_every = steps
    return c


def retrieval(workdir: str, dataset: str, data_dir: str) -> dict[str, float]:
    """Held-out retrieval of a stage-1 workdir on the test split of `dataset` (the miniature's):
    ITC for every pair, the top 16 re-ranked by ITM + ITC, R@1/5/10 both ways."""
    import ml_collections

    from blip2_jax import serving, sharding
    from blip2_jax.evaluators import base, registry
    from blip2_jax.miniature import tiny
    with open(os.path.join(workdir, "config.json")) as f:
        inp = ml_collections.ConfigDict(json.load(f)).input
    c = base.with_defaults(tiny.eval_config("retrieval"))
    c.input.update(dataset=dataset, data_dir=data_dir, split="test",
                   image_size=inp.image_size, batch_size=32)
    c.update(k=16, itm_rows_per_call=32, max_text_len=inp.max_text_len, progress=False,
             output_dir=os.path.join(workdir, "eval"))
    mesh = sharding.make_mesh()
    with sharding.use(mesh):
        predictor = serving.Predictor.from_workdir(workdir, mesh=mesh)
        return {k: float(v) for k, v in registry.get(c, mesh=mesh, predictor=predictor).evaluate(predictor)}


def spread(values: list[float]) -> str:
    """Mean ± standard deviation over seeds of recalls already in percent."""
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


# ------------------------------------------------------------------------------ the run
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--miniature_src", default=ROOT, help="the project copy whose miniature makes the models")
    p.add_argument("--miniature", help="an existing `python -m blip2_jax.miniature --seeds N` workdir to take "
                   "the models from")
    p.add_argument("--stage1_steps", type=int, help="stage 1's steps on each caption set (default: the miniature's)")
    args = p.parse_args(argv)
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    results_path = os.path.join(w, "results.json")
    res = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save():
        with open(results_path, "w") as f:
            json.dump(res, f, indent=1)

    runs = {}
    for seed in range(args.seeds):  # the miniature, one workdir per seed
        if args.miniature:
            runs[seed] = miniature_runs(args.miniature, seed)
            continue
        m = os.path.join(w, "miniature", f"seed_{seed}")
        if not (find_run(m, "stage1") and find_run(m, "stage2")):
            run([sys.executable, "-m", "blip2_jax.miniature", "--workdir", m, "--seed", str(seed)],
                os.path.join(w, f"miniature_{seed}.log"), src=os.path.abspath(args.miniature_src))
        runs[seed] = {"stage1": find_run(m, "stage1"), "stage2": find_run(m, "stage2")}
    with open(os.path.join(runs[0]["stage1"], "config.json")) as f:
        mini_input = json.load(f)["input"]
    dataset, mini_data = mini_input["dataset"], mini_input["data_dir"]
    res["miniature"] = {"dataset": dataset, "runs": runs}
    if "web" not in res:
        from blip2_jax.data.builders import synthetic_shapes
        scenes = web_scenes(args.images, synthetic_shapes.config_of(dataset),
                            test_scene_keys(dataset, mini_data))
        web = web_captions(scenes, args.noise)
        write_tars(os.path.join(w, "web", "noisy"), scenes, [c for c, _, _ in web])
        write_tars(os.path.join(w, "web", "clean"), scenes, [t for _, _, t in web])
        res["web"] = {"images": len(scenes), "noise": args.noise,
                      "kinds": {k: sum(x[1] == k for x in web) for k in ("clean",) + NOISE_KINDS},
                      "objects": [s["objects"] for s in scenes], "kind": [x[1] for x in web]}
        save()
    for variant in ("noisy", "clean"):
        key = f"build_{variant}"
        if key not in res:
            res[key] = run([sys.executable, "-m", "blip2_jax.build_pairs", "--manual_dir",
                            os.path.join(w, "web", variant), "--data_dir", os.path.join(w, "data", variant),
                            "--min_image_size", "32", "--if_exists", "resume"], os.path.join(w, f"{key}.log"))
            save()
    if "capfilt" not in res:
        res["capfilt"] = run([sys.executable, "-m", "blip2_jax.capfilt", "--input", "image_text_pairs:train",
                              "--input_data_dir", os.path.join(w, "data", "noisy"), "--captioner", runs[0]["stage2"],
                              "--scorer", runs[0]["stage1"], "--output_dir", os.path.join(w, "data", "capfilt"),
                              "--max_new_tokens", "36", "--if_exists", "resume", "--no_progress"],
                             os.path.join(w, "capfilt.log"))
        save()
    if "quality" not in res:
        res["quality"] = quality(w, res)
        save()
    from blip2_jax import cache
    from blip2_jax import main as trainer
    cache.enable()
    datasets = {"noisy": ("image_text_pairs", "noisy"), "capfilt": ("capfilt_pairs", "capfilt"),
                "clean": ("image_text_pairs", "clean")}
    res.setdefault("stage1", {})
    for seed in range(args.seeds):
        for variant, (name, folder) in datasets.items():
            key = f"{variant}/seed_{seed}"
            if key in res["stage1"]:
                continue
            workdir = os.path.join(w, "stage1", variant, f"seed_{seed}")
            shutil.rmtree(workdir, ignore_errors=True)  # an interrupted run starts again
            print(f"stage 1: {key}", file=sys.stderr, flush=True)
            cfg = stage1_config(runs[seed]["stage1"], name, os.path.join(w, "data", folder), seed,
                                args.stage1_steps)
            last = trainer.train(cfg, workdir)
            res["stage1"][key] = {"loss": {k: float(v) for k, v in last.items() if k.endswith("loss")},
                                  "retrieval": retrieval(workdir, dataset, mini_data)}
            save()
    res["stage1_miniature"] = {str(s): retrieval(r["stage1"], dataset, mini_data) for s, r in runs.items()}
    save()
    print(report(res, args.seeds))


def quality(w: str, res: dict) -> dict:
    """Caption quality of the web captions, CapFilt's kept ones and the true ones (by noise kind)."""
    objects = dict(enumerate(res["web"]["objects"]))
    kinds = dict(enumerate(res["web"]["kind"]))
    noisy = read_dataset("image_text_pairs", os.path.join(w, "data", "noisy"))
    kept = read_dataset("capfilt_pairs", os.path.join(w, "data", "capfilt"))
    clean = read_dataset("image_text_pairs", os.path.join(w, "data", "clean"))
    q = {"web": caption_quality({i: r["captions"] for i, r in noisy.items()}, objects),
         "capfilt": caption_quality({i: r["captions"] for i, r in kept.items()}, objects),
         "true": caption_quality({i: r["captions"] for i, r in clean.items()}, objects)}
    for kind in ("clean",) + NOISE_KINDS:  # by what happened to the web caption
        ids = [i for i in kept if kinds[i] == kind]
        q[f"web/{kind}"] = caption_quality({i: noisy[i]["captions"] for i in ids}, objects)
        q[f"capfilt/{kind}"] = caption_quality({i: kept[i]["captions"] for i in ids}, objects)
        q[f"web_kept/{kind}"] = float(np.mean(["web" in kept[i]["caption_sources"] for i in ids]))
    q["synthetic_share"] = float(np.mean([s == "synthetic" for r in kept.values() for s in r["caption_sources"]]))
    q["examples"] = [{"web": noisy[i]["captions"][0], "kind": kinds[i], "kept": kept[i]["captions"],
                      "scores": kept[i]["caption_scores"], "objects": objects[i]} for i in sorted(kept)[:8]]
    return q


def report(res: dict, seeds: int) -> str:
    q = res["quality"]
    lines = ["| captions | faithful | name an absent object | object recall | colour words right "
             "| shape words right |", "|---|---|---|---|---|---|"]
    for k, label in (("web", "web (noisy)"), ("capfilt", "CapFilt kept"), ("true", "true caption")):
        lines.append(f"| {label} | {100 * q[k]['faithful']:.1f} % | {100 * q[k]['wrong']:.1f} % | "
                     f"{100 * q[k]['object_recall']:.1f} % | {100 * q[k]['colour_precision']:.1f} % | "
                     f"{100 * q[k]['shape_precision']:.1f} % |")
    lines += ["", "| web caption was | kept by CapFilt |", "|---|---|"]
    lines += [f"| {kind} | {100 * q[f'web_kept/{kind}']:.1f} % |" for kind in ("clean",) + NOISE_KINDS]
    lines += ["", "| stage 1 trained on | TR@1 (ITM) | IR@1 (ITM) | TR@1 (ITC) | IR@1 (ITC) | per seed TR@1 / IR@1 |",
              "|---|---|---|---|---|---|"]
    for variant in ("noisy", "capfilt", "clean"):
        runs = [res["stage1"][f"{variant}/seed_{s}"]["retrieval"] for s in range(seeds)
                if f"{variant}/seed_{s}" in res["stage1"]]
        if not runs:
            continue
        per = ", ".join(f"{r['txt_r1']:.1f} / {r['img_r1']:.1f}" for r in runs)
        lines.append(f"| {variant} | {spread([r['txt_r1'] for r in runs])} | {spread([r['img_r1'] for r in runs])} | "
                     f"{spread([r['itc_txt_r1'] for r in runs])} | {spread([r['itc_img_r1'] for r in runs])} | {per} |")
    pairs = [s for s in range(seeds) if f"noisy/seed_{s}" in res["stage1"] and f"capfilt/seed_{s}" in res["stage1"]]
    if len(pairs) > 1:
        lines += ["", f"CapFilt minus noisy, paired by seed ({len(pairs)} seeds): mean and 95 % interval (t)"]
        for metric, label in (("txt_r1", "TR@1 (ITM)"), ("img_r1", "IR@1 (ITM)"), ("itc_txt_r1", "TR@1 (ITC)"),
                              ("itc_img_r1", "IR@1 (ITC)")):
            d = [res["stage1"][f"capfilt/seed_{s}"]["retrieval"][metric] - res["stage1"][f"noisy/seed_{s}"]["retrieval"][metric]
                 for s in pairs]
            mean, half = paired_interval(d)
            lines.append(f"- {label}: {mean:+.1f} points, [{mean - half:+.1f}, {mean + half:+.1f}]; "
                         f"per seed {', '.join(f'{x:+.1f}' for x in d)}")
    return "\n".join(lines)


def paired_interval(d: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t interval) of paired differences."""
    from scipy import stats
    n = len(d)
    return statistics.mean(d), float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(d) / n ** 0.5


if __name__ == "__main__":
    main()

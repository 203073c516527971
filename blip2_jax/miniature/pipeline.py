r"""BLIP-2 in miniature: the paper's whole recipe on the built-in synthetic corpus, on a CPU.

  python -m blip2_jax.miniature [--workdir DIR] [--fast] [--skip_ablation]

Phases (one progress line each on stderr; settings in blip2_jax/miniature/config.py):
  1. data      build `synthetic_shapes` (2000 / 250 / 250 scenes)
  2. towers    pretrain the image tower on pixels alone and the OPT-style LM on text alone
               (blip2_jax/miniature/unimodal.py): two frozen models that know nothing of each other
  3. start     draw the Q-Former's random initialisation (shared by both runs below)
  4. stage 1   representation learning, ITC + ITM + ITG (`blip2_jax.main`, frozen ViT)
  5. stage 2   generative learning through the frozen LM, Q-Former from stage 1
  6. evaluate  zero-shot on the held-out test scenes: captioning (BLEU/METEOR/ROUGE/CIDEr),
               VQA accuracy, retrieval R@1 (stage-1 model)
  7. ablation  stage 2 straight from the random Q-Former, same stage-2 steps (paper Fig. 5),
               and its evaluation
Prints a table of both runs and a few images' captions and answers; writes WORKDIR/results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import shutil
import sys
import threading
import time

from blip2_jax.miniature import config as phases
from blip2_jax.miniature import tiny

MARKER = "miniature.json"  # marks a workdir this program owns (its phase folders may be replaced)
PHASE_DIRS = ("towers", "stage1", "stage2", "stage2_no_stage1")



# ------------------------------------------------------------------------------------- display
class Phase:
    """One status line on stderr: `[i/n] name  |####----| done/total  12s  ETA 30s`."""

    def __init__(self, index: int, count: int, name: str, total: int | None = None, unit: str = "steps"):
        self.label, self.total, self.unit = f"[{index}/{count}] {name}", total, unit
        self.t0, self.cpu0, self.done, self.tty = time.time(), cpu_seconds(), 0, sys.stderr.isatty()
        self._last, self.suffix = 0.0, ""
        self._draw(force=True)

    def update(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total or self.total
        self._draw()

    def _draw(self, force: bool = False, end: str = "") -> None:
        now = time.time()
        if not (self.tty or end) or (not force and not end and now - self._last < 0.2):
            return
        self._last, dt = now, now - self.t0
        bar = ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            eta = f"  ETA {dt / self.done * (self.total - self.done):.0f}s" if 0 < self.done < self.total else ""
            bar = f"  |{'#' * int(20 * frac):<20}| {self.done}/{self.total} {self.unit}{eta}"
        elif self.done:
            bar = f"  {self.done} {self.unit}"
        text = f"{self.label:<44}{bar}  {dt:.0f}s{self.suffix}"
        print(f"\r{text}\033[K" if self.tty else text, end=end, file=sys.stderr, flush=True)

    def close(self, note: str = "") -> float:
        self.cpu = cpu_seconds() - self.cpu0
        self.suffix = f" ({note + ', ' if note else ''}cpu {self.cpu:.0f}s)"
        self._draw(end="\n")
        return time.time() - self.t0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): unlike the wall
    clock, it does not grow when other programs share the cores."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _watch_metrics(workdir: str, phase: Phase, stop: threading.Event) -> None:
    """Follows WORKDIR/metrics.jsonl (the trainer logs every `log_every` steps) into `phase`."""
    path = os.path.join(workdir, "metrics.jsonl")
    while not stop.wait(0.5):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
            if lines:
                phase.update(int(json.loads(lines[-1])["step"]))
        except (OSError, ValueError, KeyError):
            pass


# ------------------------------------------------------------------------------------- configs
def miniature_config(phase: str, workdir: str, fast: bool, seed: int = 0):
    w = os.path.abspath(workdir)
    arg = f"{phase},towers={w}/towers,stage1={w}/stage1,data_dir={w}/tfds,fast={int(fast)},seed={seed}"
    return phases.get_config(arg)


def eval_config(kind: str, overrides: dict, output_dir: str):
    """The synthetic_shapes evaluator of `kind` (tiny.eval_config) with the miniature's overrides."""
    from blip2_jax.evaluators import base
    c = base.with_defaults(tiny.eval_config(kind))

    def merge(dst, src):
        for k, v in src.items():
            if hasattr(v, "items") and hasattr(dst[k], "items"):
                merge(dst[k], v)
            else:
                dst[k] = v
    merge(c, overrides)
    c.output_dir = output_dir
    return c


def command_line(phase: str, workdir: str, fast: bool, seed: int = 0) -> str:
    """The equivalent `python -m blip2_jax.main` command of a training phase."""
    w = workdir
    extra = (",fast=1" if fast else "") + (f",seed={seed}" if seed else "")
    return (f"python -m blip2_jax.main --config=configs/tiny/miniature.py:{phase},towers={w}/towers,"
            f"stage1={w}/stage1,data_dir={w}/tfds{extra} --workdir={w}/{phase}")


# ------------------------------------------------------------------------------------- phases
def write_qformer_start(stage1_cfg, stage2_cfg, std: float, seed: int) -> tuple[str, str]:
    """The Q-Former's random starting point, saved as two transformers-format BLIP-2 directories
    that `init.source="hf"` reads: the stage-1 (retrieval) layout and the OPT layout (for the
    run without stage 1), both holding the pretrained towers and the same Q-Former draw.

    The draw is the model's own initialiser with every normal(0.02) matrix rescaled to `std`:
    0.02 is BERT-base's scale for width 768; at width 64 it leaves the cross-attention's image
    signal ~3% of the query's and the text [CLS] features nearly identical, and ITC stays at
    ln(batch) for the first ~100 steps."""
    import jax
    import numpy as np

    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.weights import hf
    from blip2_jax.weights import init as init_lib

    def scaled(path, x):
        name = getattr(path[-1], "key", str(path[-1]))
        return x * (std / 0.02) if name in ("kernel", "word_embeddings", "position_embeddings",
                                             "query_tokens") else x

    def like(src: dict, ref: dict) -> dict:  # the part of `src` that `ref`'s model has
        return {k: like(src[k], v) if isinstance(v, dict) else src[k] for k, v in ref.items()}

    mesh = sharding.make_mesh()
    out, qformer = [], None
    for cfg in (stage1_cfg, stage2_cfg):
        draw = cfg.copy_and_resolve_references()
        draw.init.source = "unimodal"  # the towers from their directories, the rest random
        model, mcfg = build.build_model(draw.model)
        params = jax.tree.map(np.asarray, init_lib.init_params(model, mcfg, draw, mesh, seed=seed))
        params.get("qformer", {}).pop("lm_head", None)  # ITG head: not in transformers' layout
        if qformer is None:
            qformer = jax.tree_util.tree_map_with_path(scaled, params["qformer"])
        params["qformer"] = like(qformer, params["qformer"])
        hf.save(cfg.init.hf_dir, mcfg, params)
        out.append(cfg.init.hf_dir)
    return out[0], out[1]


def train_phase(phase: Phase, config, workdir: str) -> dict:
    """`blip2_jax.main.train` in this process (compiled functions and imports are reused)."""
    from blip2_jax import main
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_metrics, args=(workdir, phase, stop), daemon=True)
    watcher.start()
    try:
        last = main.train(config, workdir)
    finally:
        stop.set()
        watcher.join()
    phase.update(int(config.total_steps))
    return last


class _CountingPredictor:
    """Passes every call to a predictor and counts them on a progress line."""

    def __init__(self, inner, phase: Phase):
        self._inner, self._phase, self._calls = inner, phase, 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_") or name == "set_params":
            return attr

        def counted(*a, **kw):
            out = attr(*a, **kw)
            if name != "qformer_tokens":
                self._calls += 1
                self._phase.update(self._calls)
            return out
        return counted


def evaluate_phase(phase: Phase, workdir: str, kinds: dict) -> dict:
    """Runs each evaluator config of `kinds` ({kind: config}) on a training workdir."""
    from blip2_jax import serving, sharding
    from blip2_jax.evaluators import registry

    results = {}
    mesh = sharding.make_mesh()
    with sharding.use(mesh):
        predictor = serving.Predictor.from_workdir(workdir, mesh=mesh)
        counted = _CountingPredictor(predictor, phase)
        for kind, config in kinds.items():
            evaluator = registry.get(config, mesh=mesh, predictor=counted)
            results[kind] = dict(evaluator.evaluate(counted))
    return results


# ------------------------------------------------------------------------------------- report
def read_predictions(output_dir: str) -> dict:
    """{kind: {image_id: text}} from the evaluators' prediction files."""
    out = {}
    for path in pathlib.Path(output_dir).glob("*_predictions.json"):
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and rows and "caption" in rows[0]:
            out["caption"] = {r["image_id"]: r["caption"] for r in rows}
        elif isinstance(rows, list) and rows and "answer" in rows[0]:
            out["vqa"] = {r["question_id"]: r["answer"] for r in rows}
    return out


def test_questions(data_dir: str, split: str) -> list[dict]:
    """The held-out scenes as the VQA evaluator sees them: one question per image (the pipeline
    picks question `image_id % n`), its answer and type, the reference captions."""
    from blip2_jax.data import pipeline
    from blip2_jax.data import text as text_lib
    ic = pipeline.default_input_config()
    ic.dataset, ic.split, ic.data_dir = "synthetic_shapes", split, data_dir
    source = pipeline.load_source(ic)
    dec = text_lib.as_text
    rows = []
    for i in range(len(source)):
        r = source[i]
        n, iid = len(r["qa_questions"]), int(r["image_id"])
        rows.append({"image_id": iid, "question": text_lib.normalize_question(dec(r["qa_questions"][iid % n])),
                     "answer": dec(r["qa_answers"][iid % n]), "type": dec(r["qa_types"][iid % n]),
                     "captions": [dec(c) for c in r["captions"]]})
    return rows


def blind_baselines(data_dir: str, questions: list[dict]) -> dict:
    """What text alone scores, without looking at the image: the commonest training answer to
    each question text, and the commonest training caption for every image."""
    from collections import Counter, defaultdict

    from blip2_jax.miniature import unimodal
    from blip2_jax.evaluators import metrics
    scenes = unimodal.read_scenes("synthetic_shapes", "train", data_dir)
    table = defaultdict(Counter)
    for qa in scenes["qa"]:
        for q, a in qa:
            table[q][a] += 1
    overall = Counter(a for c in table.values() for a in c.elements())
    answers = {q["image_id"]: (table[q["question"]] or overall).most_common(1)[0][0] for q in questions}
    caption = Counter(c for caps in scenes["captions"] for c in caps).most_common(1)[0][0]
    refs = {q["image_id"]: q["captions"] for q in questions}
    return {"vqa": vqa_breakdown(answers, questions),
            "caption": metrics.caption_scores({k: caption for k in refs}, refs, spice=False),
            "blind_caption": caption}


def vqa_breakdown(answers: dict, questions: list[dict]) -> dict:
    """Exact-match accuracy (%) overall and per question type."""
    from blip2_jax.evaluators import metrics
    by_type: dict[str, list[bool]] = {}
    for q in questions:
        if q["image_id"] in answers:
            ok = metrics.normalize_answer(answers[q["image_id"]]) == metrics.normalize_answer(q["answer"])
            by_type.setdefault(q["type"], []).append(ok)
    out = {f"acc_{t}": 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())}
    out["accuracy"] = 100.0 * sum(sum(v) for v in by_type.values()) / max(sum(len(v) for v in by_type.values()), 1)
    return out


RUN_NAMES = {"with_stage1": "with stage 1", "without_stage1": "without stage 1 (Fig. 5)",
             "blind": "blind (text only)"}


def format_report(results: dict) -> str:
    runs = [r for r in RUN_NAMES if r in results["runs"]]
    rows = [("VQA accuracy (%)", "vqa", "accuracy", 1),
            ("caption BLEU-4", "caption", "Bleu_4", 100), ("caption METEOR", "caption", "METEOR", 100),
            ("caption ROUGE-L", "caption", "ROUGE_L", 100), ("caption CIDEr", "caption", "CIDEr", 100),
            ("retrieval image->text R@1 (%), ITC + ITM", "retrieval", "txt_r1", 1),
            ("retrieval text->image R@1 (%), ITC + ITM", "retrieval", "img_r1", 1),
            ("retrieval image->text R@1 (%), ITC only", "retrieval", "itc_txt_r1", 1),
            ("retrieval text->image R@1 (%), ITC only", "retrieval", "itc_img_r1", 1),
            ("final stage-2 LM loss", "train", "lm_loss", 1), ("training time (s)", "train", "seconds", 1)]
    types = sorted(k for k in results["runs"][runs[0]].get("vqa", {}) if k.startswith("acc_"))
    rows[1:1] = [(f"  VQA {t[4:]} (%)", "vqa", t, 1) for t in types]
    lines = [f"| metric | {' | '.join(RUN_NAMES[r] for r in runs)} |", "|---" * (len(runs) + 1) + "|"]
    for label, group, key, scale in rows:
        vals = [results["runs"][r].get(group, {}).get(key) for r in runs]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v * scale:.1f}" for v in vals) + " |")
    out = "\n".join(lines)
    if results.get("verdict"):
        out += "\n\n" + results["verdict"]
    return out


def verdict(results: dict) -> str:
    """What the numbers say about the paper's claim (Fig. 5: without stage 1, zero-shot VQA and
    captioning are worse), each half compared with the blind text-only baseline too."""
    runs = results["runs"]
    w, wo, blind = runs.get("with_stage1"), runs.get("without_stage1"), runs.get("blind", {})
    if not w or not wo:
        return ""
    cider = [100 * r["caption"].get("CIDEr", float("nan")) for r in (w, wo, blind)]
    vqa = [r["vqa"]["accuracy"] for r in (w, wo, blind)]
    cap = ("worse" if cider[1] < cider[0] else "not worse") + " without stage 1"
    lines = [(f"Captioning: {cap} (CIDEr {cider[0]:.1f} with stage 1, {cider[1]:.1f} without; "
              f"blind {cider[2]:.1f}).")]
    # Two standard errors of an accuracy over n questions: smaller gaps are noise.
    n = max(len(results.get("questions", [])) or 250, 1)
    se2 = 2 * 100 * (max(vqa[2], 1) / 100 * (1 - max(vqa[2], 1) / 100) / n) ** 0.5
    if max(vqa[0], vqa[1]) <= vqa[2] + se2:
        lines.append(f"VQA: neither run beats the blind text prior by more than noise ({vqa[0]:.1f} and "
                     f"{vqa[1]:.1f} vs {vqa[2]:.1f} %, 2 s.e. = {se2:.1f}), so this scale cannot test "
                     "the VQA half of the claim.")
    else:
        gap = vqa[0] - vqa[1]
        word = "worse" if gap > se2 else "better" if gap < -se2 else "no different (within noise)"
        lines.append(f"VQA: {word} without stage 1 ({vqa[0]:.1f} vs {vqa[1]:.1f} %; blind text prior "
                     f"{vqa[2]:.1f} %, 2 s.e. = {se2:.1f}).")
    return " ".join(lines)


def examples(questions: list[dict], runs: dict, count: int) -> str:
    lines = []
    for q in questions[:count]:
        lines.append(f"image {q['image_id']}  reference: \"{q['captions'][0]}\"")
        for name, preds in runs.items():
            cap = preds.get("caption", {}).get(q["image_id"], "?")
            ans = preds.get("vqa", {}).get(q["image_id"], "?")
            lines.append(f"  {name:<16} caption: \"{cap}\"   Q: {q['question']}  A: \"{ans}\" (truth: {q['answer']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- pipeline
def run(workdir: str, fast: bool = False, skip_ablation: bool = False, seed: int = 0) -> dict:
    """The whole miniature; returns (and writes to WORKDIR/results.json) every number."""
    _prepare_workdir(workdir)

    from blip2_jax import cache
    cache.enable()
    from blip2_jax.miniature import unimodal
    from blip2_jax.data import builders

    t_start, cpu_start = time.time(), cpu_seconds()
    count = 7 if not skip_ablation else 6
    w = os.path.abspath(workdir)
    uni = miniature_config("unimodal", w, fast, seed)
    ev = miniature_config("eval", w, fast, seed)
    results: dict = {"fast": fast, "seed": seed, "commands": {}, "seconds": {}, "runs": {}}

    p = Phase(1, count, "data: build synthetic_shapes", unit="")
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own progress
        builders.prepare_dataset(uni.dataset, uni.data_dir)
    results["seconds"]["data"] = p.close()

    current: list[Phase] = []

    def tower_phase(name, total):  # one line per tower, each closed when the next starts
        if current:
            current.pop().close()
        current.append(Phase(2, count, f"towers: {name}", total))
        return current[-1].update
    t = time.time()
    results["towers"] = unimodal.pretrain_towers(uni, os.path.join(w, "towers"), tower_phase)
    current.pop().close()
    results["seconds"]["towers"] = time.time() - t

    s1, s2, s2x = (miniature_config(n, w, fast, seed) for n in ("stage1", "stage2", "stage2_no_stage1"))
    p = Phase(3, count, "start: random Q-Former draw", unit="")
    write_qformer_start(s1, s2x, float(uni.qformer_init_std), int(uni.seed))
    results["seconds"]["start"] = p.close()

    run_w = results["runs"]["with_stage1"] = {}
    for index, name, cfg in ((4, "stage1", s1), (5, "stage2", s2)):
        p = Phase(index, count, f"{name}: {'ITC+ITM+ITG' if name == 'stage1' else 'LM through frozen OPT'}",
                  int(cfg.total_steps))
        last = train_phase(p, cfg, os.path.join(w, name))
        run_w.setdefault("train", {})["seconds"] = run_w.get("train", {}).get("seconds", 0) + p.close()
        run_w["train"].update({(f"{name}_{k}" if name == "stage1" else k): v
                               for k, v in last.items() if k.endswith("loss")})
        results["commands"][name] = command_line(name, workdir, fast, seed)

    questions = test_questions(os.path.join(w, "tfds"), ev.caption.input.split)
    results["runs"]["blind"] = blind_baselines(os.path.join(w, "tfds"), questions)
    results["questions"] = [q["image_id"] for q in questions]
    preds = {}

    def evaluate_run(index, label, key, stage2_dir, stage1_dir=None):
        p = Phase(index, count, f"evaluate: {label}", unit="calls")
        out_dir = os.path.join(stage2_dir, "eval")
        kinds = {k: eval_config(k, dict(ev[k]), out_dir) for k in ("caption", "vqa")}
        res = evaluate_phase(p, stage2_dir, kinds)
        if stage1_dir:
            res.update(evaluate_phase(p, stage1_dir, {"retrieval": eval_config(
                "retrieval", dict(ev.retrieval), os.path.join(stage1_dir, "eval"))}))
        preds[key] = read_predictions(out_dir)
        res["vqa"].update({k: v for k, v in vqa_breakdown(preds[key].get("vqa", {}), questions).items()
                           if k != "accuracy"})  # the evaluator's own accuracy is kept
        results["runs"][key].update(res)
        results["seconds"][f"evaluate_{key}"] = p.close()

    evaluate_run(6, "zero-shot, with stage 1", "with_stage1", os.path.join(w, "stage2"), os.path.join(w, "stage1"))

    if not skip_ablation:
        run_wo = results["runs"]["without_stage1"] = {}
        p = Phase(7, count, "ablation: stage 2 without stage 1", int(s2x.total_steps))
        last = train_phase(p, s2x, os.path.join(w, "stage2_no_stage1"))
        run_wo["train"] = {"seconds": p.close(), **{k: v for k, v in last.items() if k.endswith("loss")}}
        results["commands"]["stage2_no_stage1"] = command_line("stage2_no_stage1", workdir, fast, seed)
        evaluate_run(7, "zero-shot, without stage 1", "without_stage1", os.path.join(w, "stage2_no_stage1"))

    results["seconds"]["total"] = time.time() - t_start
    results["seconds"]["total_cpu"] = cpu_seconds() - cpu_start
    results["verdict"] = verdict(results)
    results["examples"] = examples(questions, preds, int(ev.examples))
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def _prepare_workdir(workdir: str) -> None:
    """Creates WORKDIR, or clears the phase folders of an earlier run of this program (the
    dataset is kept). Refuses a non-empty folder it did not create."""
    os.makedirs(workdir, exist_ok=True)
    marker = os.path.join(workdir, MARKER)
    if os.listdir(workdir) and not os.path.exists(marker):
        raise SystemExit(f"error: {workdir} is not empty and was not made by blip2_jax.miniature; "
                         "choose another --workdir")
    for name in PHASE_DIRS:
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    with open(marker, "w") as f:
        json.dump({"created_by": "blip2_jax.miniature"}, f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blip2_jax.miniature", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdir/miniature", help="where every phase writes")
    parser.add_argument("--fast", action="store_true", help="the shortened pipeline of the tests")
    parser.add_argument("--skip_ablation", action="store_true", help="skip the run without stage 1")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from absl import logging
    logging.set_verbosity(logging.ERROR)
    import tensorflow_datasets as tfds
    tfds.display_progress_bar(False)
    results = run(args.workdir, fast=args.fast, skip_ablation=args.skip_ablation, seed=args.seed)
    sec = results["seconds"]
    print(f"\nMiniature BLIP-2 on synthetic_shapes, zero-shot on held-out scenes "
          f"({'--fast, ' if results['fast'] else ''}{sec['total']:.0f}s wall, {sec['total_cpu']:.0f}s cpu)\n")
    print(format_report(results))
    print("\n" + results["examples"])
    print(f"\nall numbers: {os.path.join(args.workdir, 'results.json')}")


if __name__ == "__main__":
    main()

r"""BLIP-2 in miniature: the paper's whole recipe on the built-in synthetic corpus, on a CPU.

  python -m blip2_jax.miniature [--workdir DIR] [--seeds N] [--seed S] [--fast] [--lanes 1|2]

Phases (one line each on stderr; settings in blip2_jax/miniature/config.py; runner.py orders
them in two lanes, one process each, so that two cores are used):
  data        build `synthetic_shapes` (4000 / 250 / 250 scenes, 48 px) and both tokenizers
  towers      pretrain the image tower on pixels alone and the OPT-style LM on text alone
              (unimodal.py): two frozen models that know nothing of each other (all seeds)
then for each seed (the Q-Former's random start and the data order of stages 1 and 2):
  start       draw the Q-Former's random initialisation (shared by both runs of the seed)
  stage 1     representation learning, ITC + ITM + ITG (`blip2_jax.main`, frozen ViT), then its
              held-out checks: retrieval R@1 (ITC alone, ITM re-ranked), ITM accuracy
  stage 2     generative learning through the frozen LM, Q-Former from stage 1; zero-shot
              captioning and VQA on the held-out test scenes
  ablation    stage 2 straight from the random Q-Former, same stage-2 steps (paper Fig. 5), and
              the same evaluation
With --seeds N >= 2 the paired differences (with - without stage 1) give a 95 % t-interval for
VQA accuracy and CIDEr, and the verdict on the paper's claim follows from it. Seed 0's phases
write into WORKDIR itself (stage1/, stage2/, ...), seed S's into WORKDIR/seed_S/.

The workdir records its configuration: a rerun with the same settings resumes after the last
finished phase (and adds seeds); one with other settings is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import threading
import time

from blip2_jax.miniature import config as phases
from blip2_jax.miniature import report, tiny

DOCS = "docs/miniature.md"


# ------------------------------------------------------------------------------------- display
class Phase:
    """One status line on stderr: `[i/n] name  |####----| done/total  12s  ETA 30s`. With
    `live=False` (the second lane's process) only the closing line is printed."""

    def __init__(self, label: str, name: str, total: int | None = None, unit: str = "steps",
                 live: bool = True):
        self.label, self.total, self.unit = f"{label} {name}", total, unit
        self.t0, self.cpu0, self.done = time.time(), cpu_seconds(), 0
        self.tty = live and sys.stderr.isatty()
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
        text = f"{self.label:<56}{bar}  {dt:.0f}s{self.suffix}"
        print(f"\r{text}\033[K" if sys.stderr.isatty() else text, end=end, file=sys.stderr, flush=True)

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
def run_dir(workdir: str, seed: int) -> str:
    """Where a seed's phases write: seed 0 in the workdir itself, seed S in seed_S/."""
    return workdir if seed == 0 else f"{workdir}/seed_{seed}"


def miniature_config(phase: str, workdir: str, fast: bool, seed: int = 0):
    w = os.path.abspath(workdir) if workdir != "W" else "W"
    arg = (f"{phase},towers={w}/towers,run={run_dir(w, seed)},data_dir={w}/tfds,"
           f"fast={int(fast)},seed={seed}")
    return phases.get_config(arg)


def configuration(fast: bool) -> dict:
    """What the results depend on: the corpus's builder config and every phase's settings
    (seed 0, workdir "W")."""
    import tensorflow_datasets as tfds

    from blip2_jax.data.builders import synthetic_shapes
    data = synthetic_shapes.config_of(phases.DATASET)
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    fields = [f.name for f in dataclasses.fields(data) if f.name not in base]  # the corpus's knobs
    cfgs = {p: json.loads(json.dumps(miniature_config(p, "W", fast).to_dict(), default=str))
            for p in ("unimodal", "stage1", "stage2", "stage2_no_stage1", "eval")}
    return {"design": phases.DESIGN, "fast": fast, "phases": cfgs,
            "dataset": json.loads(json.dumps({f: getattr(data, f) for f in fields}))}


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


def command_line(phase: str, workdir: str, fast: bool, seed: int) -> str:
    """The equivalent `python -m blip2_jax.main` command of a training phase."""
    w, r = workdir, run_dir(workdir, seed)
    return (f"python -m blip2_jax.main --config=configs/tiny/miniature.py:{phase},towers={w}/towers,"
            f"run={r},data_dir={w}/tfds,seed={seed}{',fast=1' if fast else ''} --workdir={r}/{phase}")


# ------------------------------------------------------------------------------------- phases
def build_data(dataset: str, data_dir: str) -> None:
    """The corpus, or one line and exit 1 if it cannot be built."""
    from blip2_jax.data import builders
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own progress
            builders.prepare_dataset(dataset, data_dir)
    except Exception as e:  # noqa: BLE001  (any failure: one line, no traceback)
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        raise SystemExit(f"error: building {dataset} in {data_dir} failed: {msg[:300]}") from None


def _draw_with_towers(cfg, seed: int) -> tuple:
    """`cfg`'s model with its towers read from their directories and everything else drawn
    (`init.source="unimodal"`) -> (model config, numpy params)."""
    import jax
    import numpy as np

    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.weights import init as init_lib

    draw = cfg.copy_and_resolve_references()
    draw.init.source = "unimodal"
    model, mcfg = build.build_model(draw.model)
    params = jax.tree.map(np.asarray, init_lib.init_params(model, mcfg, draw, sharding.make_mesh(), seed=seed))
    params.get("qformer", {}).pop("lm_head", None)  # ITG head: not in transformers' layout
    return mcfg, params


def _like(src: dict, ref: dict) -> dict:
    """The part of `src` that `ref`'s model has."""
    return {k: _like(src[k], v) if isinstance(v, dict) else src[k] for k, v in ref.items()}


def write_qformer_start(stage1_cfg, std: float, seed: int) -> None:
    """The Q-Former's random starting point, saved as a transformers-format BLIP-2 directory
    (the stage-1 retrieval layout, with the pretrained image tower) that `init.source="hf"`
    reads. The run without stage 1 starts from the same draw (`write_ablation_start`).

    The draw is the model's own initialiser with every normal(0.02) matrix rescaled to `std`:
    0.02 is BERT-base's scale for width 768; at width 64 it leaves the cross-attention's image
    signal ~3% of the query's and the text [CLS] features nearly identical, and ITC stays at
    ln(batch) for the first ~100 steps."""
    import jax

    from blip2_jax.weights import hf

    def scaled(path, x):
        name = getattr(path[-1], "key", str(path[-1]))
        return x * (std / 0.02) if name in ("kernel", "word_embeddings", "position_embeddings",
                                             "query_tokens") else x

    mcfg, params = _draw_with_towers(stage1_cfg, seed)
    params["qformer"] = jax.tree_util.tree_map_with_path(scaled, params["qformer"])
    hf.save(stage1_cfg.init.hf_dir, mcfg, params)


def write_ablation_start(stage1_cfg, stage2_cfg) -> None:
    """The OPT-layout start of the run without stage 1: the pretrained towers (the LM too) and
    the Q-Former drawn by `write_qformer_start` for the same seed."""
    from blip2_jax.weights import hf

    mcfg, params = _draw_with_towers(stage2_cfg, 0)
    _, drawn = hf.load(stage1_cfg.init.hf_dir, scan_layers="layers" in params["vision_model"])
    params["qformer"] = _like(drawn["qformer"], params["qformer"])
    hf.save(stage2_cfg.init.hf_dir, mcfg, params)


def train_phase(phase: Phase, config, workdir: str) -> dict:
    """`blip2_jax.main.train` in this process (compiled functions and imports are reused).
    Returns the last logged losses and temperature and, as "first_<loss>", the first losses."""
    from blip2_jax import main
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_metrics, args=(workdir, phase, stop), daemon=True)
    watcher.start()
    try:
        last = main.train(config, workdir)
    finally:
        stop.set()
        watcher.join()
    reached = last_checkpoint_step(workdir)
    if reached < int(config.total_steps):  # stopped by a signal: never recorded as done
        raise SystemExit(f"error: {phase.label} stopped at step {reached} of {int(config.total_steps)} "
                         "(interrupted); run the same command again to resume it")
    phase.update(int(config.total_steps))
    out = {k: float(v) for k, v in last.items() if k.endswith("loss") or k == "temperature"}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    out.update({f"first_{k}": float(v) for k, v in first.items() if k.endswith("loss")})
    return out


def last_checkpoint_step(workdir: str) -> int:
    """The step of the newest finished checkpoint under `workdir`/checkpoints (0: none)."""
    d = os.path.join(workdir, "checkpoints")
    return max((int(n) for n in (os.listdir(d) if os.path.isdir(d) else []) if n.isdigit()), default=0)


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


def evaluate_phase(phase: Phase, workdir: str, kinds: dict, probe=None) -> dict:
    """Runs each evaluator config of `kinds` ({kind: config}) on a training workdir, and
    `probe(predictor)` (its result under "probe")."""
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
        if probe is not None:
            results["probe"] = probe(counted)
    return results


def generation_options(vqa_config, predictor) -> dict:
    """The VQA evaluator's generation options with its length penalty for `predictor`'s LM."""
    gen = dict(vqa_config.generation)
    if gen.get("length_penalty") is None:
        gen["length_penalty"] = vqa_config.length_penalty_by_llm[predictor.llm_kind]
    return gen


def read_predictions(output_dir: str) -> dict:
    """{"caption": {image_id: text}, "vqa": {image_id: answer}} from the evaluators' files."""
    import pathlib
    out = {}
    for path in pathlib.Path(output_dir).glob("*_predictions.json"):
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and rows and "caption" in rows[0]:
            out["caption"] = {int(r["image_id"]): r["caption"] for r in rows}
        elif isinstance(rows, list) and rows and "answer" in rows[0]:
            out["vqa"] = {int(r["question_id"]): r["answer"] for r in rows}
    return out


def test_scenes(dataset: str, data_dir: str, split: str) -> list[dict]:
    """The held-out scenes as the VQA evaluator sees them: one question per image (the input
    pipeline picks question `image_id % n`), its answer and type, the reference captions (the
    last is the full description), the objects as (colour, shape)."""
    from blip2_jax.data import pipeline
    from blip2_jax.data import text as text_lib
    ic = pipeline.default_input_config()
    ic.dataset, ic.split, ic.data_dir = dataset, split, data_dir
    source = pipeline.load_source(ic)
    dec = text_lib.as_text
    rows = []
    for i in range(len(source)):
        r = source[i]
        n, iid = len(r["qa_questions"]), int(r["image_id"])
        obj = r["objects"]
        rows.append({"image_id": iid, "question": text_lib.normalize_question(dec(r["qa_questions"][iid % n])),
                     "answer": dec(r["qa_answers"][iid % n]), "type": dec(r["qa_types"][iid % n]),
                     "captions": [dec(c) for c in r["captions"]],
                     "objects": [(dec(c), dec(s)) for c, s in zip(obj["colour"], obj["shape"])]})
    return rows


def test_questions(data_dir: str, split: str) -> list[dict]:
    """`test_scenes` of the miniature's corpus (the notebook's name for it)."""
    return test_scenes(phases.DATASET, data_dir, split)


def format_report(results: dict, docs: str = DOCS) -> str:
    return report.format_report(results, docs)

"""The miniature's phases in order, in one or two lanes, each finished phase recorded.

Lane 1 (this process): data and tokenizers, the image tower, then per seed the Q-Former's
start, stage 1 and its checks, stage 2 and its evaluation. Lane 2 (a second process, so that a
2-core machine works on two things at once): the language model, then per seed the ablation
(stage 2 without stage 1) and its evaluation. A lane waits where it needs the other's result:
stage 2 for the LM, the ablation for the seed's start. With lanes=1 everything runs here.

The workdir holds MARKER (the configuration its results belong to) and DONE/<phase>.json (each
finished phase's numbers, written atomically). A rerun with the same configuration skips the
recorded phases; a folder a phase writes is cleared before the phase (re)starts.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time

from blip2_jax.miniature import config as phases
from blip2_jax.miniature import pipeline as P
from blip2_jax.miniature import report

MARKER = "miniature.json"
DONE = "done"
POLL_S = 0.5


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: {a!r} there, {b!r} now"


def claim_workdir(path: str, config: dict) -> None:
    """Creates `path`, or accepts it if it holds this configuration's results; otherwise one
    line and exit 1 (a folder this program did not make, or another configuration's)."""
    marker = os.path.join(path, MARKER)
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(marker):
            raise SystemExit(f"error: {path} is not empty and was not made by blip2_jax.miniature; "
                             "choose another --workdir")
        with open(marker) as f:
            old = json.load(f).get("config")
        if old != config:
            raise SystemExit(f"error: {path} holds results of another miniature configuration "
                             f"({_first_difference(old, config)}); choose another --workdir or delete it")
    os.makedirs(path, exist_ok=True)
    with open(marker, "w") as f:
        json.dump({"created_by": "blip2_jax.miniature", "config": config}, f, indent=1)


class Record:
    """DONE/<key>.json per finished phase."""

    def __init__(self, workdir: str):
        self.root = os.path.join(workdir, DONE)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key + ".json")

    def get(self, key: str):
        try:
            with open(self._path(key)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put(self, key: str, result: dict) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)

    def wait(self, key: str, other=None):
        """Blocks until `key` is recorded; exits if the other lane (`other`: a process, or None
        for the parent of this one) is gone without recording it."""
        parent = os.getppid()
        while (got := self.get(key)) is None:
            if other is not None and not other.is_alive():
                raise SystemExit(f"error: the second lane stopped (exit code {other.exitcode}) "
                                 f"before {key}; see its message above")
            if other is None and os.getppid() != parent:
                raise SystemExit(0)
            time.sleep(POLL_S)
        return got


def plan(seeds: list[int], ablation: bool) -> list[tuple[str, str, int]]:
    """[(key, display name, lane)] in display order."""
    out = [("data", "data: build synthetic_shapes, tokenizers", 1),
           ("vision", "towers: image tower (attributes from pixels)", 1),
           ("lm", "towers: language model (text only)", 2)]
    for s in seeds:
        tag = f"seed {s}: " if len(seeds) > 1 or s else ""
        out += [(f"seed_{s}/start", f"{tag}start: random Q-Former draw", 1),
                (f"seed_{s}/stage1", f"{tag}stage 1: ITC + ITM + ITG", 1),
                (f"seed_{s}/stage1_eval", f"{tag}stage 1: retrieval, ITM on held-out pairs", 1),
                (f"seed_{s}/stage2", f"{tag}stage 2: LM through frozen OPT", 1),
                (f"seed_{s}/stage2_eval", f"{tag}evaluate: zero-shot, with stage 1", 1)]
        if ablation:
            out += [(f"seed_{s}/ablation", f"{tag}ablation: stage 2 without stage 1", 2),
                    (f"seed_{s}/ablation_eval", f"{tag}evaluate: zero-shot, without stage 1 (Fig. 5)", 2)]
    return out


class Runner:
    def __init__(self, workdir: str, fast: bool, seeds: list[int], ablation: bool = True, lanes: int = 2):
        self.name, self.fast, self.seeds, self.ablation = workdir, fast, seeds, ablation
        self.lanes, self.live = lanes, True
        self.w = os.path.abspath(workdir)
        claim_workdir(self.w, P.configuration(fast))
        self.record = Record(self.w)
        self.steps = plan(seeds, ablation)
        self.index = {k: i + 1 for i, (k, _, _) in enumerate(self.steps)}
        self.names = {k: n for k, n, _ in self.steps}

    # -- one phase
    def phase(self, key: str, fn, total: int | None = None, unit: str = "steps", folders: tuple = ()):
        """`fn(phase)` unless `key` is recorded; records its result."""
        label = f"[{self.index[key]}/{len(self.steps)}]"
        done = self.record.get(key)
        if done is not None:
            P.Phase(label, self.names[key], unit="", live=self.live).close("done earlier")
            return done
        for d in folders:
            shutil.rmtree(os.path.join(self.w, d), ignore_errors=True)
        p = P.Phase(label, self.names[key], total, unit, live=self.live)
        result = dict(fn(p) or {})
        result.update(seconds=p.close(), cpu_seconds=p.cpu)
        self.record.put(key, result)
        return result

    def _cfg(self, phase: str, seed: int = 0):
        return P.miniature_config(phase, self.w, self.fast, seed)

    def _rel(self, seed: int, *parts: str) -> str:
        return os.path.relpath(os.path.join(P.run_dir(self.w, seed), *parts), self.w)

    # -- the lanes
    def run(self) -> dict:
        from blip2_jax import cache
        cache.enable()
        t0, cpu0 = time.time(), P.cpu_seconds()
        uni = self._cfg("unimodal")
        self.phase("data", lambda p: self._data(uni), unit="", folders=("towers",))
        other = None
        if self.lanes == 2:
            other = multiprocessing.get_context("spawn").Process(
                target=_second_lane, args=(self.name, self.fast, self.seeds, self.ablation), daemon=True)
            other.start()
        else:
            self.lm(uni)
        from blip2_jax.miniature import unimodal
        self.phase("vision", lambda p: unimodal.pretrain_vision_tower(uni, os.path.join(self.w, "towers"), p.update),
                   int(uni.vision_train.steps), folders=("towers/vision",))
        for s in self.seeds:
            self.stage1(s)
            self.record.wait("lm", other)
            self.stage2(s)
            if self.lanes == 1 and self.ablation:
                self.without_stage1(s)
        if other is not None:
            for s in self.seeds:
                if self.ablation:
                    self.record.wait(f"seed_{s}/ablation_eval", other)
            other.join()
        return self.results(time.time() - t0, P.cpu_seconds() - cpu0)

    def _data(self, uni) -> dict:
        from blip2_jax.miniature import unimodal
        P.build_data(uni.dataset, uni.data_dir)
        return unimodal.write_tokenizers(uni, os.path.join(self.w, "towers"))

    def lm(self, uni) -> dict:
        from blip2_jax.miniature import unimodal
        return self.phase("lm", lambda p: unimodal.pretrain_lm_tower(uni, os.path.join(self.w, "towers"), p.update),
                          int(uni.lm_train.steps))

    def stage1(self, s: int) -> None:
        uni, s1 = self._cfg("unimodal", s), self._cfg("stage1", s)
        self.phase(f"seed_{s}/start", lambda p: P.write_qformer_start(s1, float(uni.qformer_init_std), s),
                   unit="", folders=(self._rel(s, "start"),))
        d = os.path.join(P.run_dir(self.w, s), "stage1")
        train = self.phase(f"seed_{s}/stage1", lambda p: P.train_phase(p, s1, d), int(s1.total_steps),
                           folders=(self._rel(s, "stage1"),))
        self.phase(f"seed_{s}/stage1_eval", lambda p: self._stage1_eval(p, d, float(train["temperature"])),
                   unit="calls", folders=(self._rel(s, "stage1", "eval"),))

    def stage2(self, s: int) -> None:
        self._stage2(s, "stage2", "stage2")

    def without_stage1(self, s: int) -> None:
        """Stage 2 from the seed's random Q-Former (its OPT-layout start written first: it
        needs the LM, which lane 2 trains while lane 1 draws the start)."""
        s1, cfg = self._cfg("stage1", s), self._cfg("stage2_no_stage1", s)
        self._stage2(s, "ablation", "stage2_no_stage1", before=lambda: P.write_ablation_start(s1, cfg))

    def _stage2(self, s: int, key: str, phase: str, before=lambda: None) -> None:
        cfg = self._cfg(phase, s)
        d = os.path.join(P.run_dir(self.w, s), phase)

        def train(p):
            before()
            return P.train_phase(p, cfg, d)

        self.phase(f"seed_{s}/{key}", train, int(cfg.total_steps), folders=(self._rel(s, phase),))
        self.phase(f"seed_{s}/{key}_eval", lambda p: self._stage2_eval(p, d), unit="calls",
                   folders=(self._rel(s, phase, "eval"),))

    # -- evaluations
    def _questions(self) -> list[dict]:
        ev = self._cfg("eval")
        return P.test_scenes(phases.DATASET, os.path.join(self.w, "tfds"), ev.caption.input.split)

    def _stage1_eval(self, p, stage1_dir: str, temperature: float) -> dict:
        from blip2_jax.miniature import probes
        ev = self._cfg("eval")
        questions = self._questions()
        scenes = self._test_scenes()
        res = P.evaluate_phase(p, stage1_dir, {"retrieval": P.eval_config(
            "retrieval", dict(ev.retrieval), os.path.join(stage1_dir, "eval"))},
            probe=lambda pred: probes.stage1_probes(pred, scenes["images"], scenes["captions"],
                                                    [q["objects"] for q in questions],
                                                    phases.TEXT_LEN, temperature, int(ev.retrieval.k)))
        res.update(res.pop("probe"))
        res["retrieval"]["images"] = len(questions)
        return res

    def _test_scenes(self) -> dict:
        """unimodal.read_scenes of the evaluated test scenes, images included."""
        from blip2_jax.miniature import unimodal
        return unimodal.read_scenes(phases.DATASET, self._cfg("eval").caption.input.split,
                                    os.path.join(self.w, "tfds"), phases.VISION["image_size"])

    def _stage2_eval(self, p, stage2_dir: str) -> dict:
        from blip2_jax.miniature import probes
        ev = self._cfg("eval")
        questions = self._questions()
        out_dir = os.path.join(stage2_dir, "eval")
        configs = {k: P.eval_config(k, dict(ev[k]), out_dir) for k in ("caption", "vqa")}
        scenes = self._test_scenes()
        res = P.evaluate_phase(p, stage2_dir, configs, probe=lambda pred: probes.vqa_every_question(
            pred, scenes["images"], scenes["qa"], scenes["qa_types"], configs["vqa"].prompt,
            P.generation_options(configs["vqa"], pred),
            objects=[int((t[:, 0] > 0).sum()) for t in scenes["targets"]]))
        res["vqa_all"] = res.pop("probe")
        preds = P.read_predictions(out_dir)
        res["vqa"].update({k: v for k, v in report.vqa_breakdown(preds.get("vqa", {}), questions).items()
                           if k != "accuracy"})  # the evaluator's own accuracy is kept
        res["caption"].update(report.caption_precision(preds.get("caption", {}), questions))
        return res

    # -- the numbers
    def _seed_results(self, s: int) -> dict:
        def get(k):
            return self.record.get(f"seed_{s}/{k}") or {}
        r = {"stage1": dict(get("stage1_eval"), train=get("stage1")),
             "with_stage1": dict(get("stage2_eval"), train=get("stage2")),
             "commands": {n: P.command_line(n, self.name, self.fast, s) for n in ("stage1", "stage2")}}
        if self.ablation:
            r["without_stage1"] = dict(get("ablation_eval"), train=get("ablation"))
            r["commands"]["stage2_no_stage1"] = P.command_line("stage2_no_stage1", self.name, self.fast, s)
        return r

    def results(self, wall: float, cpu: float) -> dict:
        from blip2_jax.miniature import unimodal
        uni, ev = self._cfg("unimodal"), self._cfg("eval")
        questions = self._questions()
        train = unimodal.read_scenes(uni.dataset, "train", uni.data_dir)
        blind = report.blind_baselines(train, questions)
        blind["vqa_all"] = report.blind_every_question(train, unimodal.read_scenes(
            uni.dataset, ev.caption.input.split, os.path.join(self.w, "tfds")))
        runs = {str(s): self._seed_results(s) for s in self.seeds}
        first = self.seeds[0]
        preds = {"with_stage1": P.read_predictions(os.path.join(P.run_dir(self.w, first), "stage2", "eval"))}
        if self.ablation:
            preds["without_stage1"] = P.read_predictions(
                os.path.join(P.run_dir(self.w, first), "stage2_no_stage1", "eval"))
        results = {"fast": self.fast, "seeds": self.seeds, "lanes": self.lanes,
                   "towers": {"vision": self.record.get("vision"), "lm": self.record.get("lm"),
                              **(self.record.get("data") or {})},
                   "blind": blind, "runs": runs, "questions": [q["image_id"] for q in questions],
                   "wall_seconds": wall, "cpu_seconds": cpu, "commands": runs[str(first)]["commands"],
                   "examples": report.examples(questions, preds, int(ev.examples))}
        if self.ablation:
            results["claim"] = report.claim_statistics({s: runs[str(s)] for s in self.seeds})
        with open(os.path.join(self.w, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        return results


def _second_lane(workdir: str, fast: bool, seeds: list[int], ablation: bool) -> None:
    """Lane 2, in its own process: the LM, then each seed's ablation once its start is drawn."""
    import tensorflow_datasets as tfds
    from absl import logging

    from blip2_jax import cache
    logging.set_verbosity(logging.ERROR)
    tfds.display_progress_bar(False)
    cache.enable()
    r = Runner.__new__(Runner)  # the parent already claimed the workdir
    r.name, r.fast, r.seeds, r.ablation, r.lanes, r.live = workdir, fast, seeds, ablation, 2, False
    r.w, r.record = os.path.abspath(workdir), Record(os.path.abspath(workdir))
    r.steps = plan(seeds, ablation)
    r.index = {k: i + 1 for i, (k, _, _) in enumerate(r.steps)}
    r.names = {k: n for k, n, _ in r.steps}
    r.lm(r._cfg("unimodal"))
    for s in seeds if ablation else []:
        r.record.wait(f"seed_{s}/start")
        r.without_stage1(s)


# ------------------------------------------------------------------------------------- entry points
def run(workdir: str, fast: bool = False, skip_ablation: bool = False, seed: int = 0, seeds: int = 1,
        lanes: int = 2) -> dict:
    """The whole miniature; returns (and writes to WORKDIR/results.json) every number."""
    return Runner(workdir, fast, list(range(seed, seed + seeds)), ablation=not skip_ablation,
                  lanes=lanes).run()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise SystemExit(f"error: {message} (see --help)")


def main(argv=None) -> None:
    parser = _Parser(prog="python -m blip2_jax.miniature", description=P.__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdir/miniature", help="where every phase writes")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seed pairs (with / without stage 1); >= 2 gives the paired interval")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--fast", action="store_true", help="the shortened pipeline of the tests")
    parser.add_argument("--lanes", type=int, default=2, choices=(1, 2),
                        help="processes working at once (2: the LM and the ablation beside the rest)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"error: --seeds must be at least 1, got {args.seeds}")
    if args.seed < 0:
        raise SystemExit(f"error: --seed must be >= 0, got {args.seed}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from absl import logging
    logging.set_verbosity(logging.ERROR)
    import tensorflow_datasets as tfds
    tfds.display_progress_bar(False)
    results = run(args.workdir, fast=args.fast, seed=args.seed, seeds=args.seeds, lanes=args.lanes)
    print(P.format_report(results))
    print(f"\nall numbers: {os.path.join(args.workdir, 'results.json')}")


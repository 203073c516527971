"""The miniature's numbers and what they say: VQA accuracy per question type, the blind
text-only baselines, caption precision of colour and shape words, the paired statistics over
seeds and the verdict they support, and the printed tables and examples."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from blip2_jax.data.builders import synthetic_shapes as shapes

COLOUR_WORDS = frozenset(shapes.COLOURS)
SHAPE_WORDS = frozenset(shapes.SHAPES)
RUN_NAMES = {"with_stage1": "with stage 1", "without_stage1": "without stage 1 (Fig. 5)",
             "blind": "blind (text only)"}
# The paper's claim (Fig. 5): with the same stage-2 budget, a Q-Former without stage 1 does
# worse. Metrics tested, as (name, run group, key, scale to points).
CLAIM_METRICS = (("VQA accuracy (%)", "vqa", "accuracy", 1.0), ("caption CIDEr", "caption", "CIDEr", 100.0))
LEVEL = 0.95


# ------------------------------------------------------------------------------------- metrics
def vqa_breakdown(answers: dict, questions: list[dict]) -> dict:
    """Exact-match accuracy (%) overall ("accuracy") and per question type ("acc_<type>", over
    "n_<type>" questions)."""
    from blip2_jax.evaluators import metrics
    by_type: dict[str, list[bool]] = {}
    for q in questions:
        if q["image_id"] in answers:
            ok = metrics.normalize_answer(answers[q["image_id"]]) == metrics.normalize_answer(q["answer"])
            by_type.setdefault(q["type"], []).append(ok)
    out = {f"acc_{t}": 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())}
    out.update({f"n_{t}": len(v) for t, v in by_type.items()})
    count = sum(len(v) for v in by_type.values())
    out["accuracy"] = 100.0 * sum(sum(v) for v in by_type.values()) / max(count, 1)
    return out


def caption_precision(captions: dict, questions: list[dict]) -> dict:
    """How often the colour and shape words of generated captions are true of the scene (%).

    colour / shape: of all colour (shape) words written, those that are the colour (shape) of
    some object in the scene; object: of all "<colour> <shape>" word pairs written, those that
    name an object of the scene. Pooled over captions; None where no such word was written."""
    hits, total = Counter(), Counter()
    for q in questions:
        text = captions.get(q["image_id"])
        if text is None:
            continue
        words = text.lower().replace(",", " ").split()
        objects = {tuple(o) for o in q["objects"]}
        for w in words:
            for kind, vocab, truth in (("colour", COLOUR_WORDS, {c for c, _ in objects}),
                                       ("shape", SHAPE_WORDS, {s for _, s in objects})):
                if w in vocab:
                    total[kind] += 1
                    hits[kind] += w in truth
        for a, b in zip(words, words[1:]):
            if a in COLOUR_WORDS and b in SHAPE_WORDS:
                total["object"] += 1
                hits["object"] += (a, b) in objects
    return {f"{k}_precision": (100.0 * hits[k] / total[k] if total[k] else None)
            for k in ("colour", "shape", "object")}


def answer_prior(train: dict):
    """question text -> the commonest training answer to it (else the commonest answer)."""
    table = defaultdict(Counter)
    for qa in train["qa"]:
        for q, a in qa:
            table[q][a] += 1
    overall = Counter(a for c in table.values() for a in c.elements())
    return lambda q: (table.get(q) or overall).most_common(1)[0][0]


def blind_baselines(train: dict, questions: list[dict]) -> dict:
    """What text alone scores without the image: for VQA the commonest training answer to each
    question text (else the commonest answer), for captioning the commonest training caption
    for every image. `train` = unimodal.read_scenes of the training split."""
    from blip2_jax.evaluators import metrics
    prior = answer_prior(train)
    answers = {q["image_id"]: prior(q["question"]) for q in questions}
    caption = Counter(c for caps in train["captions"] for c in caps).most_common(1)[0][0]
    blind_caps = {q["image_id"]: caption for q in questions}
    refs = {q["image_id"]: q["captions"] for q in questions}
    return {"vqa": vqa_breakdown(answers, questions),
            "caption": dict(metrics.caption_scores(blind_caps, refs, spice=False),
                            **caption_precision(blind_caps, questions)),
            "blind_caption": caption}


def blind_every_question(train: dict, test: dict) -> dict:
    """`blind_baselines`' VQA prior on every question of the `test` scenes (read_scenes with
    qa_types): accuracy (%) overall and per type, as `probes.vqa_every_question` reports it."""
    from blip2_jax.evaluators import metrics
    prior = answer_prior(train)
    hits: dict[str, list[bool]] = defaultdict(list)
    for qa, types in zip(test["qa"], test["qa_types"]):
        for (q, a), t in zip(qa, types):
            hits[t].append(metrics.normalize_answer(prior(q)) == metrics.normalize_answer(a))
    out = {f"acc_{t}": 100.0 * sum(v) / len(v) for t, v in sorted(hits.items())}
    out.update({f"n_{t}": len(v) for t, v in hits.items()})
    out["accuracy"] = 100.0 * sum(sum(v) for v in hits.values()) / max(sum(len(v) for v in hits.values()), 1)
    return out


# ------------------------------------------------------------------------------------- statistics
def paired_interval(with_values: list[float], without_values: list[float], level: float = LEVEL) -> dict:
    """Paired t-interval of the mean difference (with - without), one pair per seed.

    Returns n, the differences, their mean, standard deviation and the `level` interval
    [low, high] (None with fewer than two pairs)."""
    from scipy import stats
    d = [a - b for a, b in zip(with_values, without_values)]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    out = {"n": n, "differences": d, "mean": mean, "sd": None, "low": None, "high": None}
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, low=mean - half, high=mean + half)
    return out


def claim_word(interval: dict) -> str:
    """"holds" only when the interval excludes zero in the paper's direction (with stage 1 better)."""
    if interval.get("low") is None:
        return "untested (one seed)"
    if interval["low"] > 0:
        return "holds"
    if interval["high"] < 0:
        return "reversed"
    return "not shown (the interval includes zero)"


def claim_statistics(seed_runs: dict) -> dict:
    """{metric name: paired_interval + "verdict"} over the seeds of `seed_runs`
    ({seed: {"with_stage1": run, "without_stage1": run}})."""
    out = {}
    for name, group, key, scale in CLAIM_METRICS:
        seeds = sorted(seed_runs)
        w = [scale * seed_runs[s]["with_stage1"][group][key] for s in seeds]
        wo = [scale * seed_runs[s]["without_stage1"][group][key] for s in seeds]
        iv = paired_interval(w, wo)
        out[name] = dict(iv, seeds=seeds, with_stage1=w, without_stage1=wo, verdict=claim_word(iv))
    return out


def verdict_text(stats: dict) -> str:
    parts = []
    for name, s in stats.items():
        if s["low"] is None:
            parts.append(f"{name}: {s['mean']:+.1f} with stage 1 (one seed)")
        else:
            parts.append(f"{name}: mean difference {s['mean']:+.1f}, {100 * LEVEL:.0f} % CI "
                         f"[{s['low']:+.1f}, {s['high']:+.1f}] over {s['n']} seeds: {s['verdict']}")
    return ("The paper's claim (Fig. 5: without stage 1, the same stage-2 budget gives worse "
            "zero-shot results), with stage 1 minus without, paired by seed. " + "; ".join(parts) + ".")


# ------------------------------------------------------------------------------------- tables
RUN_ROWS = [("VQA accuracy, the evaluator's one question per scene (%)", "vqa", "accuracy", 1.0),
           ("VQA accuracy, every question of each scene (%)", "vqa_all", "accuracy", 1.0),
            ("caption CIDEr", "caption", "CIDEr", 100.0), ("caption BLEU-4", "caption", "Bleu_4", 100.0),
            ("caption colour words true (%)", "caption", "colour_precision", 1.0),
            ("caption shape words true (%)", "caption", "shape_precision", 1.0),
            ("caption colour-shape pairs true (%)", "caption", "object_precision", 1.0),
            ("final stage-2 LM loss", "train", "lm_loss", 1.0)]


def _fmt(v, scale=1.0, digits=1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _get(run: dict, group: str) -> dict:
    """run["a"]["b"] for group "a/b" ({} where absent)."""
    for k in group.split("/"):
        run = run.get(k) or {}
    return run


def runs_table(runs: dict) -> str:
    """One seed: the zero-shot results of both runs beside the blind baseline."""
    names = [r for r in RUN_NAMES if r in runs]
    rows = list(RUN_ROWS)
    group = "vqa_all" if "vqa_all" in runs[names[0]] else "vqa"
    per_type = runs[names[0]].get(group, {})
    types = sorted(k for k in per_type if k.startswith("acc_"))
    rows[2:2] = [(f"  {t[4:]} questions ({per_type.get('n_' + t[4:], '?')}) (%)", group, t, 1.0) for t in types]
    counts = per_type.get("by_objects", {})
    rows[2 + len(types):2 + len(types)] = [
        (f"  {t} questions on {k}-object scenes ({counts['n_' + key[4:]]}) (%)", "vqa_all/by_objects", key, 1.0)
        for t in ("colour", "shape") for k in (1, 2) if (key := f"acc_{t}_{k}obj") in counts]
    out = []
    for label, group, key, scale in rows:
        vals = [_get(runs[r], group).get(key) for r in names]
        if any(v is not None for v in vals):
            out.append([label] + [_fmt(v, scale, 2 if "loss" in label else 1) for v in vals])
    return _table(["metric"] + [RUN_NAMES[r] for r in names], out)


def stage1_table(s1: dict) -> str:
    """Each stage-1 objective's held-out result beside what the paper leads one to expect."""
    r, itm, train = s1.get("retrieval", {}), s1.get("itm", {}), s1.get("train", {})
    chance = 100.0 / max(r.get("images", 250), 1)
    rows = [
        ["ITC: retrieval R@1 image->text / text->image (%)",
         f"{_fmt(r.get('itc_txt_r1'))} / {_fmt(r.get('itc_img_r1'))}", f"far above chance ({chance:.1f})"],
        ["ITM: held-out positives / hard negatives / balanced accuracy (%)",
         f"{_fmt(itm.get('acc_positive'))} / {_fmt(itm.get('acc_negative'))} / {_fmt(itm.get('accuracy'))}",
         "well above chance (50); >= 85"],
        ["ITM re-ranks ITC's top k: R@1 image->text / text->image (%)",
         f"{_fmt(r.get('txt_r1'))} / {_fmt(r.get('img_r1'))}", "at least ITC's R@1 (paper: it improves)"],
        ["ITC / ITM: true caption above its colour-swapped twin, two-object scenes (%)",
         f"{_fmt(s1.get('binding', {}).get('itc'))} / {_fmt(s1.get('binding', {}).get('itm'))}",
         "chance is 50 (the paper does not test binding)"],
        ["ITG: caption loss, first -> last logged step",
         f"{_fmt(train.get('first_itg_loss'), digits=2)} -> {_fmt(train.get('itg_loss'), digits=2)}",
         "falls (label smoothing 0.1 keeps it above ~0.5)"],
    ]
    return _table(["stage-1 objective (stage-1 model, held-out scenes)", "measured", "expected"], rows)


def seeds_table(stats: dict) -> str:
    """Per seed: both runs and their difference for each claim metric; then mean and CI."""
    names = list(stats)
    seeds = stats[names[0]]["seeds"]
    header = ["seed"] + [f"{n} {w}" for n in names for w in ("with", "without", "difference")]
    rows = []
    for i, s in enumerate(seeds):
        rows.append([str(s)] + [f"{v:.1f}" for n in names for v in
                                (stats[n]["with_stage1"][i], stats[n]["without_stage1"][i],
                                 stats[n]["differences"][i])])
    mean = ["mean"]
    ci = [f"{100 * LEVEL:.0f} % CI"]
    for n in names:
        s = stats[n]
        mean += [f"{sum(s['with_stage1']) / len(seeds):.1f}", f"{sum(s['without_stage1']) / len(seeds):.1f}",
                 f"{s['mean']:+.1f}"]
        ci += ["", "", "-" if s["low"] is None else f"[{s['low']:+.1f}, {s['high']:+.1f}]"]
    return _table(header, rows + [mean, ci])


def ranges(values: list[float | None], scale: float = 1.0) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"


def examples(questions: list[dict], preds: dict, count: int) -> str:
    """A few held-out images: the scene's full description, each run's caption and answer."""
    lines = []
    for q in questions[:count]:
        lines.append(f"image {q['image_id']}  true description: \"{q['captions'][-1]}\"")
        for name, p in preds.items():
            cap = p.get("caption", {}).get(q["image_id"], "?")
            ans = p.get("vqa", {}).get(q["image_id"], "?")
            lines.append(f"  {RUN_NAMES.get(name, name):<26} caption: \"{cap}\"   "
                         f"Q: {q['question']}  A: \"{ans}\" (truth: {q['answer']})")
    return "\n".join(lines)


def format_report(results: dict, docs: str) -> str:
    """What `python -m blip2_jax.miniature` prints."""
    seeds = results["seeds"]
    first = results["runs"][str(seeds[0])]
    runs = {k: first[k] for k in ("with_stage1", "without_stage1") if k in first}
    runs["blind"] = results["blind"]
    title = (f"Miniature BLIP-2 on synthetic_shapes, zero-shot on {len(results['questions'])} held-out "
             f"scenes ({'--fast, ' if results['fast'] else ''}{results['wall_seconds']:.0f}s wall, "
             f"{results['cpu_seconds']:.0f}s cpu)")
    out = [title, "",
           f"Seed {seeds[0]}:", runs_table(runs)] + lm_reading(results.get("towers", {}).get("lm", {})) + [
           "", stage1_table(first["stage1"]), "", examples_text(results)]
    if "claim" not in results:
        out += ["", "Run without the ablation: no comparison with stage 2 alone."]
    elif len(seeds) >= 2:
        out += ["", f"Stage 1 vs no stage 1 over {len(seeds)} seeds (paired by seed):",
                seeds_table(results["claim"]), "", across_seeds(results), "", verdict_text(results["claim"])]
    else:
        note = ("One seed decides nothing: the verdict on the paper's claim comes from the paired "
                "multi-seed run (`python -m blip2_jax.miniature --seeds 5`), whose table and interval "
                f"are in {docs}.")
        out += ["", note]
    return "\n".join(out)


def lm_reading(lm: dict) -> list[str]:
    """The frozen LM's own binding, from text: the ceiling of the two-object rows above."""
    if "qa_two_object_colour" not in lm:
        return []
    return [f"The frozen LM alone, from each two-object scene's text description (validation): colour "
            f"{lm['qa_two_object_colour']:.1f} %, shape {lm.get('qa_two_object_shape', float('nan')):.1f} % "
            "(chance ~50): VQA through the soft prompt does not bind better than its LM reads."]


def examples_text(results: dict) -> str:
    return "Held-out images (true description, then each run's caption and answer):\n" + results["examples"]


def across_seeds(results: dict) -> str:
    """Ranges across seeds of the numbers that are not the claim's."""
    runs = [results["runs"][str(s)] for s in results["seeds"]]
    rows = [
        ("VQA accuracy, one question per scene (%), with / without stage 1", "vqa", "accuracy", 1.0),
        ("VQA accuracy, every question (%)", "vqa_all", "accuracy", 1.0),
        ("VQA colour questions, every question (%)", "vqa_all", "acc_colour", 1.0),
        ("VQA shape questions, every question (%)", "vqa_all", "acc_shape", 1.0),
        ("caption CIDEr", "caption", "CIDEr", 100.0),
        ("caption colour words true (%)", "caption", "colour_precision", 1.0),
        ("caption shape words true (%)", "caption", "shape_precision", 1.0),
    ]
    lines = [["metric", "with stage 1", "without stage 1", "blind"]]
    body = []
    for label, group, key, scale in rows:
        blind = results["blind"].get(group, {}).get(key)
        body.append([label.replace(", with / without stage 1", "")] +
                    [ranges([r[run].get(group, {}).get(key) for r in runs], scale)
                     for run in ("with_stage1", "without_stage1")] + [_fmt(blind, scale)])
    s1 = [r["stage1"] for r in runs]
    body += [["ITC R@1 image->text / text->image (%)",
              f"{ranges([x['retrieval']['itc_txt_r1'] for x in s1])} / {ranges([x['retrieval']['itc_img_r1'] for x in s1])}",
              "-", "-"],
             ["ITM re-ranked R@1 image->text / text->image (%)",
              f"{ranges([x['retrieval']['txt_r1'] for x in s1])} / {ranges([x['retrieval']['img_r1'] for x in s1])}",
              "-", "-"],
             ["ITM balanced accuracy, hard negatives (%)", ranges([x["itm"]["accuracy"] for x in s1]), "-", "-"],
             ["ITC / ITM binding: true above colour-swapped caption (%)",
              f"{ranges([x.get('binding', {}).get('itc') for x in s1])} / "
              f"{ranges([x.get('binding', {}).get('itm') for x in s1])}", "-", "-"]]
    return "Ranges across seeds:\n" + _table(lines[0], body)

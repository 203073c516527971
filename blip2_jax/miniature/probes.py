"""Held-out checks of the stage-1 model beyond the paper's evaluators.

`itm_accuracy`: does the ITM head tell matching image-text pairs from hard non-matching ones?
The test scenes are cut into batches of the stage-1 batch size, each image with one of its
captions, and the hard negatives are drawn as stage 1 draws them (paper §3.2, LAVIS
blip2_qformer.py): per caption an image, per image a caption, from the softmax of the ITC
similarity over the batch's non-matching candidates. Synthetic captions repeat across scenes
("a red circle" describes many images), so a candidate whose scene has the same (colour, shape)
objects as the positive's never counts as a negative here.

`description_retrieval`: the paper's retrieval protocol (ITC for every pair, the top k re-scored
by ITM + ITC) with one text per image, its full description, which names every object's size,
colour, shape and place: unlike "a red circle", it is true of its own image only, so R@1 does
not hinge on how ties between equally true images are broken.

`vqa_every_question`: zero-shot VQA on every question of each held-out scene (about 11 per
scene), not the evaluator's one: per-type figures over hundreds of questions instead of ~25.

`binding_accuracy`: does the model know which colour goes with which shape? Each held-out scene
of two objects that differ in colour and shape, against its own objects with the colours swapped
("a red star and a blue square" vs "a blue star and a red square"): the same words, only the
binding differs. Chance is 50 %.
"""
from __future__ import annotations

import numpy as np

from blip2_jax.data import text as text_lib
from blip2_jax.data.builders import synthetic_shapes as shapes
from blip2_jax.miniature import config

BATCH = config.STAGE1_BATCH  # hard negatives are drawn from batches of the stage-1 batch size
SEED = 0             # which caption per image and which negatives: fixed, so runs compare


def scene_key(objects: list) -> tuple:
    """The scene's objects as a sorted tuple of (colour, shape): what captions can tell apart."""
    return tuple(sorted(tuple(o) for o in objects))


def draw_negatives(sim: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row of `sim` [R, C] (ITC logits, i.e. similarity / temperature) one column drawn from
    the softmax over the `allowed` [R, C] columns; -1 where none is allowed."""
    logits = np.where(allowed, sim, -np.inf)
    out = np.full(len(sim), -1)
    for r in np.flatnonzero(allowed.any(axis=1)):
        p = np.exp(logits[r] - logits[r].max())
        out[r] = rng.choice(len(p), p=p / p.sum())
    return out


def stage1_probes(predictor, images: np.ndarray, captions: list[list[str]], objects: list[list[tuple]],
                  max_text_len: int, temperature: float, k: int) -> dict:
    """images [N, S, S, 3] (normalised), captions [N][c] (the last: the full description), objects
    [N] ((colour, shape) per object), the model's ITC temperature, the re-ranked top k ->
    {"itm": itm_accuracy, "description_retrieval": description_retrieval, "binding":
    binding_accuracy}."""
    keys = [scene_key(o) for o in objects]
    feats = predictor.image_features(images)
    rng = np.random.default_rng(SEED)
    texts = [text_lib.normalize_caption(c[rng.integers(len(c))]) for c in captions]
    return {"itm": itm_accuracy(predictor, feats, texts, keys, max_text_len, temperature, rng),
            "description_retrieval": description_retrieval(
                predictor, feats, [text_lib.normalize_caption(c[-1]) for c in captions], max_text_len, k),
            "binding": binding_accuracy(predictor, feats, objects, max_text_len)}


def _text_side(predictor, texts: list[str], max_text_len: int):
    ids, mask = predictor.qformer_tokens(texts, max_text_len)
    feats = np.concatenate([predictor.text_features(ids[s:s + 256], mask[s:s + 256])
                            for s in range(0, len(texts), 256)])
    return ids, mask, feats


def description_retrieval(predictor, feats: dict, descriptions: list[str], max_text_len: int, k: int) -> dict:
    """R@1 (%) image->text and text->image, ITC alone ("itc_txt_r1", "itc_img_r1") and with the
    top k re-scored by ITM match logit + ITC similarity ("txt_r1", "img_r1")."""
    from blip2_jax.evaluators import metrics
    from blip2_jax.serving import itc_similarity
    ids, mask, text_feats = _text_side(predictor, descriptions, max_text_len)
    sim = itc_similarity(feats["image_feats"], text_feats)               # [N, N]

    def itm(pairs):  # [P, 2] (image row, text row) -> match logits [P]
        return predictor.itm_pair_logits(feats["image_embeds"], ids, mask, pairs)[:, 1]

    def i2t(rows, cand):
        return itm(np.stack([np.repeat(rows, cand.shape[1]), cand.reshape(-1)], 1)).reshape(cand.shape)

    def t2i(rows, cand):
        return itm(np.stack([cand.reshape(-1), np.repeat(rows, cand.shape[1])], 1)).reshape(cand.shape)

    n = len(descriptions)
    own = [[i] for i in range(n)]
    score_i2t = metrics.rerank_topk(sim, i2t, k, rows_per_call=32)
    score_t2i = metrics.rerank_topk(sim.T, t2i, k, rows_per_call=32)
    reranked = metrics.retrieval_recall(score_i2t, np.arange(n), own, sim_t2i=score_t2i)
    itc = metrics.retrieval_recall(sim, np.arange(n), own)
    return {"itc_txt_r1": itc["txt_r1"], "itc_img_r1": itc["img_r1"],
            "txt_r1": reranked["txt_r1"], "img_r1": reranked["img_r1"], "k": k}


def itm_accuracy(predictor, feats: dict, texts: list[str], keys: list[tuple], max_text_len: int,
                 temperature: float, rng: np.random.Generator) -> dict:
    """feats from `predictor.image_features`, texts [N] (one caption per image), keys [N]
    (`scene_key`), the model's ITC temperature -> {"acc_positive", "acc_negative",
    "accuracy" (their mean; chance 50), "pairs"} in %."""
    from blip2_jax.serving import itc_similarity
    ids, mask, text_feats = _text_side(predictor, texts, max_text_len)
    order = rng.permutation(len(texts))
    pos, neg = [], []
    for start in range(0, len(order), BATCH):
        b = order[start:start + BATCH]
        sim = itc_similarity(feats["image_feats"][b], text_feats[b]) / temperature  # [b, b] image x text
        differ = np.array([[keys[i] != keys[j] for j in b] for i in b])
        neg_text = draw_negatives(sim, differ, rng)            # per image
        neg_image = draw_negatives(sim.T, differ.T, rng)       # per text
        pos += [(i, i) for i in b]
        neg += [(i, b[t]) for i, t in zip(b, neg_text) if t >= 0]
        neg += [(b[m], j) for j, m in zip(b, neg_image) if m >= 0]
    pairs = np.asarray(pos + neg)
    logits = predictor.itm_pair_logits(feats["image_embeds"], ids, mask, pairs)
    match = logits[:, 1] > logits[:, 0]
    acc_pos = 100.0 * float(np.mean(match[:len(pos)]))
    acc_neg = 100.0 * float(np.mean(~match[len(pos):]))
    return {"acc_positive": acc_pos, "acc_negative": acc_neg, "accuracy": (acc_pos + acc_neg) / 2,
            "pairs": int(len(pairs))}


def swapped_pairs(objects: list[list[tuple]]) -> tuple[list[int], list[str], list[str]]:
    """Scenes of two objects differing in colour and shape -> (rows, true texts, the same texts
    with the colours swapped), worded as the dataset's first caption ("a red star and a blue
    square")."""
    rows, true, swapped = [], [], []
    for i, objs in enumerate(objects):
        if len(objs) == 2 and objs[0][0] != objs[1][0] and objs[0][1] != objs[1][1]:
            (c1, s1), (c2, s2) = objs
            name = lambda c, s: shapes._name({"colour": c, "shape": s})  # noqa: E731
            rows.append(i)
            true.append(shapes._list([name(c1, s1), name(c2, s2)]))
            swapped.append(shapes._list([name(c2, s1), name(c1, s2)]))
    return rows, true, swapped


def binding_accuracy(predictor, feats: dict, objects: list[list[tuple]], max_text_len: int) -> dict:
    """{"itc", "itm"}: % of two-object scenes whose true text scores above the colour-swapped
    one (ITC similarity, max over queries; ITM match logit); "pairs": how many scenes."""
    from blip2_jax.serving import itc_similarity
    rows, true, swapped = swapped_pairs(objects)
    if not rows:
        return {"itc": None, "itm": None, "pairs": 0}
    img = {k: v[rows] for k, v in feats.items()}
    t_ids, t_mask, t_feats = _text_side(predictor, true, max_text_len)
    s_ids, s_mask, s_feats = _text_side(predictor, swapped, max_text_len)
    itc_true = np.diagonal(itc_similarity(img["image_feats"], t_feats))
    itc_swapped = np.diagonal(itc_similarity(img["image_feats"], s_feats))
    diag = np.stack([np.arange(len(rows))] * 2, 1)
    itm_true = predictor.itm_pair_logits(img["image_embeds"], t_ids, t_mask, diag)[:, 1]
    itm_swapped = predictor.itm_pair_logits(img["image_embeds"], s_ids, s_mask, diag)[:, 1]
    return {"itc": 100.0 * float(np.mean(itc_true > itc_swapped)),
            "itm": 100.0 * float(np.mean(itm_true > itm_swapped)), "pairs": len(rows)}


def vqa_every_question(predictor, images: np.ndarray, qa: list[list[tuple]], types: list[list[str]],
                       template: str, generation: dict, objects: list[int] | None = None,
                       rows_per_call: int = 64) -> dict:
    """Answers every (question, answer) of `qa` [N][m] about `images` [N] with the VQA prompt
    `template` and the evaluator's `generation` options -> exact-match accuracy (%) overall and
    per type ("acc_<type>", over "n_<type>" questions); with `objects` [N] (objects per scene),
    also per type and object count ("acc_<type>_<k>obj", "n_<type>_<k>obj")."""
    from blip2_jax.evaluators import metrics
    items = [(i, q, a, t) for i, (pairs, ts) in enumerate(zip(qa, types)) for (q, a), t in zip(pairs, ts)]
    by_count: dict[str, list[bool]] = {}
    hits: dict[str, list[bool]] = {}
    for s in range(0, len(items), rows_per_call):
        chunk = items[s:s + rows_per_call]
        pad = rows_per_call - len(chunk)          # one compiled shape: the last call is padded
        idx = [i for i, *_ in chunk] + [chunk[0][0]] * pad
        prompts = [template.format(q) for _, q, _, _ in chunk] + [template.format(chunk[0][1])] * pad
        answers = predictor.generate(images[idx], prompts, **generation)
        for (i, _, a, t), got in zip(chunk, answers):
            ok = metrics.normalize_answer(got) == metrics.normalize_answer(a)
            hits.setdefault(t, []).append(ok)
            if objects is not None:
                by_count.setdefault(f"{t}_{objects[i]}obj", []).append(ok)
    out = {f"acc_{t}": 100.0 * float(np.mean(v)) for t, v in sorted(hits.items())}
    out.update({f"n_{t}": len(v) for t, v in hits.items()})
    out["accuracy"] = 100.0 * float(np.mean([h for v in hits.values() for h in v]))
    out["by_objects"] = {f"acc_{k}": 100.0 * float(np.mean(v)) for k, v in sorted(by_count.items())}
    out["by_objects"].update({f"n_{k}": len(v) for k, v in by_count.items()})
    return out

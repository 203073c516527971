"""Image-text retrieval: the paper's ITC top-k + ITM re-ranking and Recall@K (BLIP/LAVIS style).

Protocol (BLIP-2 §4.4, LAVIS `compute_sim_matrix`): for each query row (an image for
image->text, a text for text->image) take the k candidates with the highest ITC similarity,
score them as ITM match logit + ITC similarity, and give every other candidate a fill score
(LAVIS: -100). Recall@K counts a query as retrieved when its best-ranked positive is among the
top K (an image has several captions; a text has one image).

Host-side numpy: the matrices are gathered results, and the model stays behind a callable.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

RECALL_AT = (1, 5, 10)
LAVIS_FILL = -100.0


def rerank_topk(itc_sim, itm_score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int,
                *, fill_value: float = LAVIS_FILL, rows_per_call: int = 1) -> np.ndarray:
    """Re-score each row's top-k ITC candidates with ITM, the rest get `fill_value`.

    Args:
      itc_sim: [R, C] ITC similarities (R queries, C candidates), e.g. max over queries of the
        cosine similarity; use sim_i2t for image->text and sim_i2t.T for text->image.
      itm_score_fn: (rows [B] int, candidates [B, k] int) -> [B, k] ITM match logits of each
        query row with each of its candidates (e.g. itm_head logit 1, averaged over queries).
        B <= rows_per_call; the last call may be smaller.
      k: candidates re-scored per row (paper: 128); clipped to C.
      fill_value: score of candidates outside the top k (LAVIS -100; -inf also works).
      rows_per_call: rows batched into one `itm_score_fn` call.

    Returns:
      [R, C] float scores: ITM + ITC on the top-k candidates, `fill_value` elsewhere.
    """
    sim = np.asarray(itc_sim)
    if sim.ndim != 2:
        raise ValueError(f"itc_sim must be [rows, candidates], got shape {sim.shape}")
    if k < 1 or rows_per_call < 1:
        raise ValueError(f"k and rows_per_call must be >= 1, got k={k}, rows_per_call={rows_per_call}")
    n_rows, n_cand = sim.shape
    k = min(k, n_cand)
    dtype = sim.dtype if np.issubdtype(sim.dtype, np.floating) else np.float32
    out = np.full((n_rows, n_cand), fill_value, dtype=dtype)
    for start in range(0, n_rows, rows_per_call):
        rows = np.arange(start, min(start + rows_per_call, n_rows))
        block = sim[rows]
        # Stable sort: among equal similarities the lower candidate index is taken first.
        topk = np.argsort(-block, axis=1, kind="stable")[:, :k]
        topk_sim = np.take_along_axis(block, topk, axis=1)
        itm = np.asarray(itm_score_fn(rows, topk), dtype=dtype)
        if itm.shape != topk.shape:
            raise ValueError(f"itm_score_fn returned shape {itm.shape}, expected {topk.shape}")
        out[rows[:, None], topk] = itm + topk_sim
    return out


def best_positive_rank(scores, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of the best-ranked positive in each row of `scores` [R, C].

    Candidates are ordered by descending score; equal scores are ordered by index (LAVIS's
    unstable argsort leaves that order unspecified; it matters only for exact ties such as the
    re-ranking fill value).
    """
    scores = np.asarray(scores)
    if len(positives) != scores.shape[0]:
        raise ValueError(f"{len(positives)} positive lists for {scores.shape[0]} rows")
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    col = np.arange(scores.shape[1])
    for r, row in enumerate(scores):
        pos = np.asarray(positives[r], dtype=np.int64)
        if pos.size == 0:
            raise ValueError(f"row {r} has no positive")
        s = row[pos][:, None]
        # rank of positive p = #(higher scores) + #(equal scores at a lower index)
        rank = (row > s).sum(1) + ((row == s) & (col < pos[:, None])).sum(1)
        ranks[r] = rank.min()
    return ranks


def _recalls(ranks: np.ndarray) -> list[float]:
    return [100.0 * int(np.count_nonzero(ranks < n)) / len(ranks) for n in RECALL_AT]


def retrieval_recall(sim_i2t, txt2img, img2txt: Sequence[Sequence[int]], *,
                     sim_t2i=None) -> dict[str, float]:
    """Recall@1/5/10 (percent) both ways, with LAVIS's names.

    Args:
      sim_i2t: [N_img, N_txt] image->text scores (ITC, or re-ranked ITM+ITC).
      txt2img: [N_txt] index of each text's image.
      img2txt: N_img lists of the indices of each image's texts.
      sim_t2i: [N_txt, N_img] text->image scores; default sim_i2t.T (pass it when the two
        directions were re-ranked separately, as in the paper protocol).

    Returns:
      txt_r1/5/10 (image->text: is one of the image's captions in the top K), txt_r_mean,
      img_r1/5/10 (text->image), img_r_mean, r_mean (mean of the two means) and agg_metrics
      (= txt_r_mean, LAVIS's model-selection number).
    """
    sim_i2t = np.asarray(sim_i2t)
    sim_t2i = sim_i2t.T if sim_t2i is None else np.asarray(sim_t2i)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    if sim_t2i.shape != sim_i2t.shape[::-1]:
        raise ValueError(f"sim_t2i shape {sim_t2i.shape} != transposed sim_i2t {sim_i2t.shape[::-1]}")
    if txt2img.shape != (sim_i2t.shape[1],):
        raise ValueError(f"txt2img has shape {txt2img.shape}, expected ({sim_i2t.shape[1]},)")
    tr = _recalls(best_positive_rank(sim_i2t, img2txt))
    ir = _recalls(best_positive_rank(sim_t2i, txt2img[:, None]))
    tr_mean, ir_mean = sum(tr) / len(tr), sum(ir) / len(ir)
    result = {f"txt_r{n}": v for n, v in zip(RECALL_AT, tr)}
    result["txt_r_mean"] = tr_mean
    result.update({f"img_r{n}": v for n, v in zip(RECALL_AT, ir)})
    result["img_r_mean"] = ir_mean
    result["r_mean"] = (tr_mean + ir_mean) / 2
    result["agg_metrics"] = tr_mean
    return result

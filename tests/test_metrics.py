"""Evaluation metrics: hand-checked values of the official VQA script's behaviour, caption metrics
against pycocoevalcap's own COCOEvalCap, retrieval recall on matrices with planted ranks."""
import math
import shutil
import sys

import numpy as np
import pytest

from blip2_jax.evaluators import metrics
from blip2_jax.evaluators.metrics import caption as caption_lib
from blip2_jax.evaluators.metrics import lemmatize as lemmatize_lib


# ----------------------------------------------------------------------------- VQA normalisation
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words -> digits, lower-case
    ("none", "0"),                     # the official map counts "none" as zero
    ("a dog", "dog"),                  # articles dropped
    ("The Dogs", "dogs"),
    ("yes.", "yes"),                   # a period not followed by a digit goes
    ("3.5", "3.5"),                    # ... one followed by a digit stays
    ("1,000", "1000"),                 # comma between digits: all punctuation deleted
    ("red, white", "red white"),       # ", " touches a space: deleted
    ("cat/dog", "cat dog"),            # touches no space: becomes a space
    ("dont", "don't"),                 # contractions map
    ("it's", "it's"),                  # the apostrophe is not in the punctuation list
    ("its", "its"),
    ("8:00", "8:00"),                  # nor is the colon
    ("  yes\n", "yes"),
    ("t-shirt", "t shirt"),
])
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_period_rule_stops_after_32_periods():
    # The official call passes re.UNICODE (= 32) as `count`.
    assert metrics.process_punctuation("a." * 40) == "a" * 32 + "a." * 8


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                               (10, 1.0)])
def test_vqa_accuracy_subset_average(matches, expected):
    # Average over the 10 leave-one-out subsets of min(#matches / 3, 1):
    # m matches -> (m * min(m-1, 3) + (10-m) * min(m, 3)) / 30.
    answers = ["cat"] * matches + ["dog", "bird", "fish", "cow", "horse", "sheep", "pig", "goat",
                                   "duck", "mouse"][:10 - matches]
    assert metrics.vqa_accuracy("cat", answers) == expected


def test_vqa_accuracy_official_cases():
    assert metrics.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert metrics.vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert metrics.vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert metrics.vqa_accuracy("it's", ["its"] * 10) == 0.0
    assert metrics.vqa_accuracy("its", ["its"] * 10) == 1.0
    # Human answers only get the punctuation step, and only when they disagree: "Yes." among
    # other answers becomes "Yes" (still upper-case), so it never matches the prediction "yes".
    assert metrics.vqa_accuracy("yes", ["Yes."] * 9 + ["no"]) == 0.0
    assert metrics.vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    assert metrics.vqa_accuracy("yes", ["yes."] * 10) == 0.0  # unanimous: left as stored


def test_vqa_accuracy_2021_protocol():
    # The current script normalises nothing when the humans agree ...
    assert metrics.vqa_accuracy("Yes", ["yes"] * 10, protocol="2021") == 0.0
    assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    # ... and both sides fully when they disagree.
    assert metrics.vqa_accuracy("Two", ["two"] * 3 + ["3"] * 7, protocol="2021") == 0.9
    assert metrics.vqa_accuracy("Two", ["two"] * 3 + ["3"] * 7) == 0.0
    with pytest.raises(ValueError, match="protocol"):
        metrics.vqa_accuracy("a", ["a"], protocol="2017")


def test_vqa_score_corpus_percent():
    annotations = {1: ["2"] * 10, 2: ["cat"] + ["dog"] * 9, 3: ["no"] * 10}
    predictions = {1: "two", 2: "cat", 3: "yes"}
    assert metrics.vqa_score(predictions, annotations) == pytest.approx(100 * (1.0 + 0.3) / 3)
    with pytest.raises(ValueError, match="1 missing"):
        metrics.vqa_score({1: "two", 2: "cat"}, annotations)


def test_gqa_exact_match_normalises_prediction_only():
    assert metrics.gqa_accuracy("The Table.", "table") == 1.0
    assert metrics.gqa_accuracy("two", "2") == 1.0
    assert metrics.gqa_accuracy("table", "The table") == 0.0
    assert metrics.gqa_score({"a": "Yes", "b": "left", "c": "red"},
                             {"a": "yes", "b": "right", "c": "red"}) == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------- OK-VQA lemmas
def test_okvqa_lemmatisation():
    pytest.importorskip("lemminflect")
    assert metrics.lemmatize_answer("skiing") == "ski"
    assert metrics.lemmatize_answer("two dogs running") == "two dog run"
    assert metrics.lemmatize_answer("glasses") == "glass"
    assert metrics.lemmatize_answer("left") == "left"            # adjective reading kept
    assert metrics.lemmatize_answer("red and white") == "red and white"
    assert metrics.lemmatize_answer("don't") == "do n't"          # spaCy-like clitic split
    assert metrics.lemmatize_answer("t-shirts") == "t - shirt"
    assert metrics.lemmatize_answer("frisbees") == "frisbee"      # out of the dictionary
    assert metrics.lemmatize_answer("tennis") == "tennis"
    annotations = {1: ["ski"] * 10, 2: ["dog"] * 10}
    predictions = {1: "Skiing.", 2: "dogs"}
    assert metrics.okvqa_score(predictions, annotations) == 100.0
    assert metrics.vqa_score(predictions, annotations) == 0.0


def test_lemmatiser_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lemminflect", None)
    lemmatize_lib.lemmatize_word.cache_clear()
    with pytest.raises(ImportError, match="lemminflect"):
        metrics.lemmatize_answer("zebras")
    lemmatize_lib.lemmatize_word.cache_clear()


# ----------------------------------------------------------------------------- captions
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

# Image 1: one word differs from its single reference; image 2: identical up to case and the final
# period (which the PTB tokenizer removes).
PREDICTIONS = {1: "A cat sits on the mat.", 2: "a dog runs on the grass"}
REFERENCES = {1: ["a cat is on the mat"], 2: ["A dog runs on the grass."]}


@pytest.fixture(scope="module")
def our_caption_scores():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java")
    return metrics.caption_scores(PREDICTIONS, REFERENCES, spice=False)


@needs_java
def test_caption_scores_hand_checked(our_caption_scores):
    s = our_caption_scores
    # Corpus BLEU: matched / total n-grams summed over both images; lengths equal (BP = 1).
    # 1-grams 5+6 of 12, 2-grams 3+5 of 10, 3-grams 1+4 of 8, 4-grams 0+3 of 6.
    p = [11 / 12, 8 / 10, 5 / 8, 3 / 6]
    for n in range(1, 5):
        assert s[f"Bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-8)
    # ROUGE-L per image: LCS 5 of 6 both ways (F = 5/6), and 1; averaged.
    assert s["ROUGE_L"] == pytest.approx((5 / 6 + 1) / 2, rel=1e-12)
    assert "SPICE" not in s


@pytest.mark.slow
@needs_java
def test_caption_scores_match_coco_eval_cap(our_caption_scores, monkeypatch):
    """pycocoevalcap's own COCOEvalCap on the same captions (SPICE stubbed: its jars are
    downloaded on first use, which is not possible offline)."""
    from pycocotools.coco import COCO
    import pycocoevalcap.eval as coco_eval_lib

    class NoSpice:
        def compute_score(self, gts, res):
            return float("nan"), []

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval_lib, "Spice", NoSpice)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in REFERENCES],
        "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c}
                        for i, refs in REFERENCES.items() for j, c in enumerate(refs)]}
    coco.createIndex()
    coco_res = coco.loadRes([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()])
    evaluator = coco_eval_lib.COCOEvalCap(coco, coco_res)
    evaluator.evaluate()
    for name in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]:
        assert our_caption_scores[name] == evaluator.eval[name], name


def test_caption_scores_without_java_is_a_clear_error(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(caption_lib.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="Java"):
        metrics.caption_scores({1: "a cat"}, {1: ["a cat"]})
    assert not metrics.spice_available()


def test_spice_is_never_faked():
    pytest.importorskip("pycocoevalcap")
    if metrics.spice_available():
        pytest.skip("the SPICE CoreNLP jars are installed here")
    assert metrics.spice_missing_files() or shutil.which("java") is None
    with pytest.raises(metrics.SpiceUnavailableError):
        metrics.caption_scores({1: "a cat"}, {1: ["a cat"]}, spice=True)


# ----------------------------------------------------------------------------- retrieval
def planted_scores(positives, ranks, n_cols, rng):
    """Rows whose best-ranked positive sits exactly at ranks[r] (0-based, no ties)."""
    out = np.zeros((len(positives), n_cols))
    for r, (pos, rank) in enumerate(zip(positives, ranks)):
        negatives = [c for c in rng.permutation(n_cols) if c not in pos]
        tail = negatives[rank:] + list(pos[1:])
        order = negatives[:rank] + [pos[0]] + [tail[i] for i in rng.permutation(len(tail))]
        out[r, order] = np.arange(n_cols, 0, -1) + rng.uniform(0, 0.5)
    return out


def test_retrieval_recall_planted_ranks():
    rng = np.random.default_rng(0)
    n_img, per_img = 12, 2
    img2txt = [[per_img * i + j for j in range(per_img)] for i in range(n_img)]
    txt2img = np.repeat(np.arange(n_img), per_img)
    i2t_ranks = [0, 0, 0, 1, 2, 4, 5, 7, 9, 10, 15, 21]    # R@1 3/12, R@5 6/12, R@10 9/12
    t2i_ranks = [0] * 12 + [3] * 6 + [6, 8, 9, 10, 11, 11]  # R@1 12/24, R@5 18/24, R@10 21/24
    sim_i2t = planted_scores(img2txt, i2t_ranks, n_img * per_img, rng)
    sim_t2i = planted_scores([[t] for t in txt2img], t2i_ranks, n_img, rng)
    np.testing.assert_array_equal(metrics.best_positive_rank(sim_i2t, img2txt), i2t_ranks)
    r = metrics.retrieval_recall(sim_i2t, txt2img, img2txt, sim_t2i=sim_t2i)
    expected = {"txt_r1": 25.0, "txt_r5": 50.0, "txt_r10": 75.0, "img_r1": 50.0,
                "img_r5": 75.0, "img_r10": 87.5}
    for k, v in expected.items():
        assert r[k] == pytest.approx(v, abs=1e-12), k
    assert r["txt_r_mean"] == pytest.approx(50.0)
    assert r["img_r_mean"] == pytest.approx(212.5 / 3)
    assert r["r_mean"] == pytest.approx((50.0 + 212.5 / 3) / 2)
    assert r["agg_metrics"] == r["txt_r_mean"]


def test_best_positive_rank_ties_and_transpose_default():
    # Equal scores are ordered by index.
    assert list(metrics.best_positive_rank(np.ones((1, 3)), [[2]])) == [2]
    assert list(metrics.best_positive_rank(np.ones((1, 3)), [[1, 2]])) == [1]
    sim = np.array([[0.9, 0.1, 0.5],
                    [0.2, 0.3, 0.8]])     # 2 images, 3 texts
    r = metrics.retrieval_recall(sim, [0, 1, 1], [[0], [1, 2]])
    # i2t: image 0 -> text 0 first; image 1 -> text 2 first.  t2i (sim.T): text 0 -> image 0,
    # text 1 -> image 1 (0.3 > 0.1), text 2 -> image 1 (0.8 > 0.5).
    assert r["txt_r1"] == 100.0 and r["img_r1"] == 100.0


def test_rerank_topk_hand_matrix():
    itc = np.array([[0.1, 0.5, 0.3, 0.9, 0.2],
                    [0.8, 0.7, 0.6, 0.0, 0.1],
                    [0.0, 0.0, 0.4, 0.0, 0.3]])
    itm = np.arange(15, dtype=np.float64).reshape(3, 5) * 10  # ITM logit of (row, candidate)
    calls = []

    def itm_fn(rows, cands):
        calls.append((rows.tolist(), cands.tolist()))
        return itm[rows[:, None], cands]

    out = metrics.rerank_topk(itc, itm_fn, k=2, rows_per_call=2)
    expected = np.full((3, 5), -100.0)
    expected[0, [3, 1]] = [0.9 + 30, 0.5 + 10]
    expected[1, [0, 1]] = [0.8 + 50, 0.7 + 60]
    expected[2, [2, 4]] = [0.4 + 120, 0.3 + 140]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert calls == [([0, 1], [[3, 1], [0, 1]]), ([2], [[2, 4]])]
    out_inf = metrics.rerank_topk(itc, itm_fn, k=10, fill_value=-np.inf)  # k clipped to 5
    np.testing.assert_allclose(out_inf, itc + itm, rtol=0, atol=1e-12)


def test_rerank_fixes_itc_ranking():
    # ITC puts the wrong caption first for both images; ITM on the top-2 puts it right.
    itc = np.array([[0.6, 0.5, 0.1],
                    [0.2, 0.7, 0.6]])
    itm = np.array([[-5.0, 5.0, 9.0],    # row 0: its caption (1) wins; 2 is outside the top-2
                    [9.0, -5.0, 5.0]])   # row 1: its caption (2) wins; 0 is outside the top-2
    img2txt, txt2img = [[1], [2]], [0, 0, 1]
    assert metrics.retrieval_recall(itc, txt2img, img2txt)["txt_r1"] == 0.0
    reranked = metrics.rerank_topk(itc, lambda r, c: itm[r[:, None], c], k=2)
    assert metrics.retrieval_recall(reranked, txt2img, img2txt, sim_t2i=itc.T)["txt_r1"] == 100.0
    with pytest.raises(ValueError, match="shape"):
        metrics.rerank_topk(itc, lambda r, c: np.zeros((1, 1)), k=2)

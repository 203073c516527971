"""VQA accuracy (VQAv2, OK-VQA) and GQA exact match, with the official answer normalisation.

Two revisions of the official script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
vqaEval.py) are in use and they score differently:

- "lavis" (the 2016 script, copied into LAVIS and so behind BLIP-2's reported numbers): the
  prediction is always normalised (punctuation, then digits/articles/contractions); the ten human
  answers get only the punctuation step, and only when they are not all identical.
- "2021" (the current master, "Fixed processing answers bug"): answers are stripped; when the
  human answers disagree, both they and the prediction get both steps; when they agree, neither
  is normalised (the raw prediction, stripped, must equal the answer).

Accuracy of one prediction: for each of the n human answers, leave it out and score
min(#matches among the other n-1 / 3, 1); average the n scores (for n = 10: the average over the
10 choose 9 subsets).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from blip2_jax.evaluators.metrics.lemmatize import lemmatize_answer
from blip2_jax.evaluators.metrics.vqa_tables import (
    ARTICLES,
    CONTRACTIONS,
    MANUAL_MAP,
    PUNCTUATION,
)

PROTOCOLS = ("lavis", "2021")

# The official pattern reads "(?!<=\d)(\.)(?!\d)": the first group is a look-ahead (a typo for a
# look-behind) that never fires, so every period not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in the `count`
# argument, so at most re.UNICODE (= 32) periods are removed.
_PERIOD_COUNT = int(re.UNICODE)
# Humans needed for full credit.
_FULL_CREDIT_MATCHES = 3


def process_punctuation(text: str) -> str:
    """The official processPunctuation.

    Each punctuation mark is deleted if it touches a space anywhere in the text, or if the text
    has a comma between two digits ("1,000" -> "1000"); otherwise it becomes a space
    ("cat/dog" -> "cat dog"). Then periods not followed by a digit are removed ("yes." -> "yes",
    "3.5" kept). Apostrophes and colons are left alone.
    """
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words -> digits, drop a/an/the,
    then restore apostrophes of contractions written without them ("dont" -> "don't")."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full normalisation applied to a predicted answer: "Two dogs." -> "2 dogs"."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over i of min(#{j != i: answers[j] == prediction} / 3, 1)."""
    matches = sum(a == prediction for a in answers)
    # Leaving out a matching answer removes one match; leaving out another keeps all of them.
    credit = sum(min(matches - (a == prediction), _FULL_CREDIT_MATCHES) for a in answers)
    # One integer division so that 1, 2, 3 matches of 10 give exactly 0.3, 0.6, 0.9.
    return credit / (_FULL_CREDIT_MATCHES * len(answers))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, protocol: str = "lavis") -> float:
    """VQA accuracy of one predicted answer against the human answers (usually 10), in [0, 1].

    Args:
      prediction: the model's answer, raw (it is normalised here).
      answers: the human answers as stored in the annotation file (already normalised there; the
        script only re-applies the steps described in the module docstring).
      protocol: "lavis" (default; the revision behind the paper's numbers) or "2021".
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    if protocol == "lavis":
        prediction = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
    elif protocol == "2021":
        prediction = _clean_whitespace(prediction)
        answers = [_clean_whitespace(a) for a in answers]
        if len(set(answers)) > 1:
            answers = [process_digit_article(process_punctuation(a)) for a in answers]
            prediction = process_digit_article(process_punctuation(prediction))
    else:
        raise ValueError(f"unknown VQA protocol {protocol!r}; expected one of {PROTOCOLS}")
    return _leave_one_out_accuracy(prediction, answers)


def _check_same_questions(predictions: Mapping, annotations: Mapping) -> None:
    # The official loader refuses results that do not answer exactly the annotated questions.
    missing = annotations.keys() - predictions.keys()
    extra = predictions.keys() - annotations.keys()
    if missing or extra:
        raise ValueError(
            f"predictions must answer exactly the annotated questions: {len(missing)} missing "
            f"(e.g. {sorted(missing, key=str)[:3]}), {len(extra)} unknown "
            f"(e.g. {sorted(extra, key=str)[:3]})")


def vqa_score(predictions: Mapping[object, str], annotations: Mapping[object, Sequence[str]], *,
              protocol: str = "lavis", lemmatize: bool = False) -> float:
    """Corpus VQA accuracy in percent (not rounded; the official script rounds to 2 decimals).

    Args:
      predictions: question_id -> predicted answer (raw model output).
      annotations: question_id -> the human answers.
      protocol: see `vqa_accuracy`.
      lemmatize: lemmatise the predictions first (OK-VQA, see `okvqa_score`).
    """
    _check_same_questions(predictions, annotations)
    if not annotations:
        raise ValueError("vqa_score needs at least one question")
    total = 0.0
    for qid, answers in annotations.items():
        pred = lemmatize_answer(predictions[qid]) if lemmatize else predictions[qid]
        total += vqa_accuracy(pred, answers, protocol=protocol)
    return 100.0 * total / len(annotations)


def okvqa_score(predictions: Mapping[object, str], annotations: Mapping[object, Sequence[str]], *,
                protocol: str = "lavis") -> float:
    """OK-VQA accuracy in percent: nouns and verbs of each prediction lemmatised (as LAVIS does
    before scoring; the OK-VQA answers are stored lemmatised), then VQA accuracy."""
    return vqa_score(predictions, annotations, protocol=protocol, lemmatize=True)


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA: 1.0 if the normalised prediction equals the (stored, unnormalised) answer, else 0.0.

    As in LAVIS's GQA task: the prediction gets processPunctuation and processDigitArticle (no
    strip of newlines first; split() makes that moot), the ground truth is compared as is.
    """
    return float(process_digit_article(process_punctuation(prediction)) == answer)


def gqa_score(predictions: Mapping[object, str], answers: Mapping[object, str]) -> float:
    """Corpus GQA exact-match accuracy in percent; question_id -> prediction / answer."""
    _check_same_questions(predictions, answers)
    if not answers:
        raise ValueError("gqa_score needs at least one question")
    return 100.0 * sum(gqa_accuracy(predictions[q], a) for q, a in answers.items()) / len(answers)

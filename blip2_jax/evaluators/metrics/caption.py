"""Caption metrics of the COCO caption protocol: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE.

Computed with `pycocoevalcap` exactly as its COCOEvalCap does (the path LAVIS takes): captions and
references go through the Stanford PTB tokenizer (lower-cased, punctuation tokens dropped), then
each scorer runs over the predicted images. pycocoevalcap's "CIDEr" is CIDEr-D (clipped counts,
Gaussian length penalty, x10), with document frequencies from the references of the scored images.
Scores are fractions (the paper prints them x100).

The PTB tokenizer, METEOR and SPICE are Java programs: a Java runtime must be on PATH.
SPICE also needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's `spice/lib`; pycocoevalcap
downloads them on first use, which is not done here. Without them SPICE is reported unavailable
(never estimated).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from typing import Hashable, Mapping, Sequence

_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

BLEU_ORDER = 4


class SpiceUnavailableError(RuntimeError):
    """SPICE was requested but its Stanford CoreNLP jars are not installed."""


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java on PATH (pycocoevalcap's PTB tokenizer, METEOR and SPICE "
            "are Java programs); install a Java runtime, e.g. Debian's default-jre-headless")


def _pycocoevalcap():
    try:
        import pycocoevalcap
    except ImportError as e:
        raise ImportError(
            "caption metrics need the 'pycocoevalcap' package (pip install pycocoevalcap, or "
            "install blip2_jax with the 'eval' extra)") from e
    return pycocoevalcap


def spice_missing_files() -> list[str]:
    """The CoreNLP jars SPICE needs that are not installed (empty list: SPICE can run)."""
    # pycocoevalcap is a namespace package (no __init__.py, so no __file__).
    lib = os.path.join(list(_pycocoevalcap().__path__)[0], "spice", "lib")
    return [os.path.join(lib, j) for j in _CORENLP_JARS if not os.path.exists(os.path.join(lib, j))]


def spice_available() -> bool:
    """Whether SPICE can be computed offline (Java present and CoreNLP jars installed)."""
    return shutil.which("java") is not None and not spice_missing_files()


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """image_id -> captions, tokenized by pycocoevalcap's PTBTokenizer (Java)."""
    _require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize(
        {k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def caption_scores(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]], *,
                   spice: bool | None = None) -> dict[str, float]:
    """Corpus caption metrics over the predicted images.

    Args:
      predictions: image_id -> generated caption (one per image).
      references: image_id -> reference captions; must cover every predicted image (extra
        images are ignored, as in COCOEvalCap).
      spice: True: compute SPICE or raise SpiceUnavailableError; False: skip it; None (default):
        compute it when `spice_available()`, otherwise leave "SPICE" out and log a warning.

    Returns:
      {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]} -> score.
    """
    _pycocoevalcap()
    _require_java()
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} predicted images, "
                         f"e.g. {missing[:3]}")
    if spice is None:
        spice = spice_available()
        if not spice:
            logging.warning("SPICE unavailable (missing %s); reported without SPICE",
                            ", ".join(spice_missing_files()) or "java")
    elif spice and not spice_available():
        raise SpiceUnavailableError(
            "SPICE needs Java and the Stanford CoreNLP 3.6.0 jars, missing: "
            + ", ".join(spice_missing_files()))

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    # One tokenizer run (one JVM start) for both sides; lines are tokenized independently.
    tokens = ptb_tokenize({**{("ref", k): list(references[k]) for k in predictions},
                           **{("pred", k): [c] for k, c in predictions.items()}})
    gts = {k: tokens[("ref", k)] for k in predictions}
    res = {k: tokens[("pred", k)] for k in predictions}
    scorers = [(Bleu(BLEU_ORDER), [f"Bleu_{n}" for n in range(1, BLEU_ORDER + 1)]),
               (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if spice:
        from pycocoevalcap.spice.spice import Spice
        scorers.append((Spice(), "SPICE"))
    out: dict[str, float] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
            score, _ = scorer.compute_score(gts, res)
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score)})
        else:
            out[names] = float(score)
    return out

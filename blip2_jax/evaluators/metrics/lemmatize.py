"""OK-VQA answer lemmatisation (nouns and verbs), offline.

LAVIS runs spaCy's `en_core_web_sm` over each generated answer and replaces every token tagged
NOUN or VERB by its lemma, keeping the other tokens, then joins the tokens with spaces. The OK-VQA
answers are stored lemmatised, so "skiing" only scores once it becomes "ski".

spaCy's models are not on PyPI, so this module uses LemmInflect (PyPI `lemminflect`, its
dictionaries ship inside the wheel; it was written as a spaCy-compatible lemmatiser). What differs
from LAVIS's spaCy pipeline:
- there is no POS tagger: the part of speech of a word is decided without context. A word that is
  also an adjective/adverb/auxiliary in the dictionary ("left", "flying", "open", "is") is kept as
  is; otherwise a plural noun gets its singular ("glasses" -> "glass"), else an inflected verb its
  base ("running" -> "run", "went" -> "go"). spaCy would instead follow its tagger, e.g. it may
  read "flying" as a verb ("fly") or "left" as a verb ("leave");
- words missing from the dictionary get LemmInflect's noun suffix rules only when they look like
  plurals ("frisbees" -> "frisbee"); spaCy's rule lemmatiser would use the tagger's guess;
- the tokenizer approximates spaCy's English rules: clitics split off ("don't" -> "do n't",
  "it's" -> "it 's"), punctuation and hyphens between letters become tokens ("t-shirts" ->
  "t - shirt"), numbers with "," or "." stay whole; spaCy's special cases (e.g. "o'clock") are
  not reproduced.
"""
from __future__ import annotations

import functools
import re

# Split like spaCy's English tokenizer for the cases that matter in short answers (see above).
_TOKEN = re.compile(
    r"\w+?(?=n't\b)"            # the stem before a negative clitic: "do" of "don't", "ca" of "can't"
    r"|n't\b"                   # the negative clitic itself
    r"|'(?:s|m|re|ve|d|ll)\b"   # other clitics: 's 'm 're 've 'd 'll
    r"|\w+(?:[.,]\w+)*"         # words and numbers such as 3.5 and 1,000
    r"|[^\w\s]",                # any other character is a token of its own
    re.IGNORECASE)
# Parts of speech whose presence in the dictionary keeps a word unlemmatised (LAVIS only touches
# NOUN and VERB, and a context-free guess should not turn "left" into "leave").
_KEEP_IF_POS = ("ADJ", "ADV", "AUX", "ADP", "PRON", "DET", "NUM", "CCONJ", "SCONJ", "PART", "INTJ")
# Endings of dictionary-less words that are not plurals ("tennis", "bus", "glass", "adidas").
_NOT_PLURAL_ENDINGS = ("ss", "us", "is", "as")


def _lemminflect():
    try:
        import lemminflect
    except ImportError as e:  # optional dependency: only OK-VQA scoring needs it
        raise ImportError(
            "OK-VQA answer lemmatisation needs the 'lemminflect' package "
            "(pip install lemminflect, or install blip2_jax with the 'eval' extra)") from e
    return lemminflect


def tokenize(text: str) -> list[str]:
    """spaCy-like English tokens of a short answer: "don't go!" -> ["do", "n't", "go", "!"]."""
    return _TOKEN.findall(text)


@functools.lru_cache(maxsize=65536)
def lemmatize_word(word: str) -> str:
    """Lemma of one token if it is taken as a noun or verb, else the token unchanged."""
    if not word.isalpha():
        return word
    lm = _lemminflect()
    w = word.lower()
    lemmas = lm.getAllLemmas(w)
    if not lemmas:
        if w.endswith("s") and not w.endswith(_NOT_PLURAL_ENDINGS):
            return lm.getAllLemmasOOV(w, upos="NOUN")["NOUN"][0]
        return word
    if any(pos in lemmas for pos in _KEEP_IF_POS):
        return word
    noun = lemmas.get("NOUN", (w,))[0]
    if noun != w:
        return noun
    verb = lemmas.get("VERB", (w,))[0]
    return verb if verb != w else word


def lemmatize_answer(text: str) -> str:
    """Lemmatise the nouns and verbs of an answer and join the tokens with single spaces,
    as LAVIS does before OK-VQA scoring: "two dogs running" -> "two dog run"."""
    return " ".join(lemmatize_word(t) for t in tokenize(text))

"""Text: BLIP caption/question normalisation and the named text processors.

A text processor turns the texts chosen for one example ({"caption"} or {"question", "answer"})
into fixed-length int32 arrays. Ids are laid out explicitly from `Tokenizer.encode` plus the
special ids the model's tokenizer adds (`prefix`/`suffix`), so every position is known:

- Q-Former (BERT): `[CLS] text [SEP] [PAD]...`, at most `max_text_len`; `qformer_dec_input_ids`
  is the same with [CLS] replaced by [DEC] (image-grounded text generation, paper §3.2).
- decoder-only LLM (OPT): `prefix(BOS) prompt target [PAD]...`, right-padded to `max_llm_len`;
  labels = the ids, -100 on prefix, prompt and padding (aligned with the inputs: the loss shifts).
- encoder-decoder LLM (T5): encoder `source suffix(</s>)`, decoder labels `target </s>`,
  decoder inputs = labels shifted right behind the decoder start id (T5's pad id, 0).
- generation prompts: `prefix prompt`, left-padded (the generator's layout: pads, BOS, prompt).
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from blip2_jax.data.tokenizers import Tokenizer

IGNORE_INDEX = -100  # label of positions the loss skips (transformers' convention)
_CAPTION_PUNCT = re.compile(r"([.!\"()*#:;~])")


def as_text(x) -> str:
    """A TFDS text field (bytes or str) as str."""
    return x.decode("utf-8", "replace") if isinstance(x, (bytes, np.bytes_)) else str(x)


def normalize_caption(text: str, max_words: int = 50) -> str:
    """BLIP's `pre_caption`: lower-case, the punctuation .!"()*#:; ~ to spaces, collapse
    whitespace, keep at most `max_words` words."""
    text = _CAPTION_PUNCT.sub(" ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def normalize_question(text: str, max_words: int = 50) -> str:
    """BLIP's `pre_question`: lower-case, drop .!"()*#:;~ (no space left), at most
    `max_words` words."""
    text = _CAPTION_PUNCT.sub("", text.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


def pad(ids: list[int], length: int, pad_id: int, side: str = "right"):
    """(ids, mask) as int32 [length]; `ids` must already fit."""
    n = len(ids)
    if n > length:
        raise ValueError(f"{n} ids do not fit in {length}")
    out = np.full((length,), pad_id, np.int32)
    mask = np.zeros((length,), np.int32)
    sl = slice(0, n) if side == "right" else slice(length - n, length)
    out[sl], mask[sl] = ids, 1
    return out, mask


def qformer_text(text: str, tok: Tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """BERT ids [max_len]: input_ids ([CLS] first), dec_input_ids ([DEC] first), mask."""
    body = tok.encode(text)[: max_len - len(tok.prefix) - len(tok.suffix)]
    ids, mask = pad(list(tok.prefix) + body + list(tok.suffix), max_len, tok.pad_id)
    out = {"qformer_input_ids": ids, "qformer_attention_mask": mask}
    if tok.dec_id is not None:
        dec = ids.copy()
        dec[0] = tok.dec_id
        out["qformer_dec_input_ids"] = dec
    return out


def decoder_only_lm(prompt: str, target: str, tok: Tokenizer, max_len: int):
    """Decoder-only LM example [max_len]: llm_input_ids, llm_attention_mask, llm_labels.

    The prompt and target are tokenised apart (target led by a space when a prompt exists),
    which for byte-level BPE equals tokenising the joined string and makes the prompt's length
    exact. Truncation cuts the end, like the reference tokenizer's `max_length`.
    """
    prompt = prompt.rstrip()
    head = list(tok.prefix) + (tok.encode(prompt) if prompt else [])
    body = tok.encode((" " if prompt else "") + target) + list(tok.suffix)
    ids = (head + body)[:max_len]
    labels = ([IGNORE_INDEX] * len(head) + body)[:max_len]
    input_ids, mask = pad(ids, max_len, tok.pad_id)
    lab = np.full((max_len,), IGNORE_INDEX, np.int32)
    lab[: len(labels)] = labels
    return {"llm_input_ids": input_ids, "llm_attention_mask": mask, "llm_labels": lab}


def encoder_decoder_lm(source: str, target: str, tok: Tokenizer, max_len: int,
                       max_target_len: int):
    """Encoder-decoder example: llm_input_ids/llm_attention_mask [max_len] (source + </s>),
    llm_decoder_input_ids/llm_decoder_attention_mask/llm_labels [max_target_len]."""
    src = (tok.encode(source) if source.strip() else [])[: max_len - len(tok.suffix)]
    input_ids, mask = pad(src + list(tok.suffix), max_len, tok.pad_id)
    tgt = tok.encode(target)[: max_target_len - len(tok.suffix)] + list(tok.suffix)
    labels_ids, dmask = pad(tgt, max_target_len, tok.pad_id)
    labels = np.where(dmask == 1, labels_ids, IGNORE_INDEX).astype(np.int32)
    start = tok.decoder_start_id if tok.decoder_start_id is not None else tok.pad_id
    dec_in, _ = pad([start] + tgt[:-1], max_target_len, tok.pad_id)
    return {"llm_input_ids": input_ids, "llm_attention_mask": mask,
            "llm_decoder_input_ids": dec_in, "llm_decoder_attention_mask": dmask,
            "llm_labels": labels}


def prompt_ids(prompt: str, tok: Tokenizer, max_len: int, side: str):
    """A generation prompt [max_len]: `prefix prompt` (+ suffix for encoders), padded on `side`."""
    ids = list(tok.prefix) + (tok.encode(prompt.rstrip()) if prompt.strip() else [])
    if side == "right":  # an encoder's input ends with its suffix (T5: </s>)
        ids = ids[: max_len - len(tok.suffix)] + list(tok.suffix)
    ids = ids[-max_len:] if side == "left" else ids
    input_ids, mask = pad(ids, max_len, tok.pad_id, side)
    return {"llm_input_ids": input_ids, "llm_attention_mask": mask}


def split_prefix(caption: str, rng: np.random.Generator) -> tuple[str, str]:
    """The paper's prefix-LM split for FlanT5 (§3.3): a random cut between words; the prefix
    goes to the encoder, the (non-empty) suffix is the target."""
    words = caption.split(" ")
    cut = int(rng.integers(0, len(words)))
    return " ".join(words[:cut]), " ".join(words[cut:])


# ------------------------------------------------------------------ named processors
class TextProcessor:
    """Builds the text arrays of one example; chosen by `config.text_processor`.

    Call with texts {"caption"} or {"question", "answer"} and an rng; returns a dict of int32
    arrays. Names: none, qformer_caption, opt_caption, t5_caption, t5_prefix_caption, opt_vqa,
    t5_vqa (training); opt_prompt, t5_prompt (captioning prompt), opt_vqa_prompt, t5_vqa_prompt
    (question prompt + the question for the Q-Former) for generation.
    """

    def __init__(self, name: str, *, qformer_tokenizer: Tokenizer | None = None,
                 llm_tokenizer: Tokenizer | None = None, max_text_len: int = 32,
                 max_llm_len: int = 32, max_target_len: int = 32, prompt: str = "",
                 vqa_prompt: str = "Question: {} Answer:", llm_eos_text: str = "\n"):
        if name not in PROCESSORS:
            raise ValueError(f"unknown text_processor {name!r}; known: {sorted(PROCESSORS)}")
        self.name, self.fn = name, PROCESSORS[name]
        self.qtok, self.ltok = qformer_tokenizer, llm_tokenizer
        self.max_text_len, self.max_llm_len, self.max_target_len = (
            max_text_len, max_llm_len, max_target_len)
        self.prompt, self.vqa_prompt, self.eos_text = prompt, vqa_prompt, llm_eos_text

    def __call__(self, texts: dict[str, str], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.fn(self, texts, rng)

    def qformer(self, text: str) -> dict[str, np.ndarray]:
        return qformer_text(text, self.qtok, self.max_text_len)

    def question_prompt(self, texts) -> str:
        return self.vqa_prompt.format(texts["question"])


def _qformer_question(p: TextProcessor, texts) -> dict:
    return p.qformer(texts["question"]) if p.qtok else {}


def _none(p, texts, rng):
    return {}


def _qformer_caption(p, texts, rng):
    return p.qformer(texts["caption"])


def _opt_caption(p, texts, rng):
    return decoder_only_lm(p.prompt, texts["caption"] + p.eos_text, p.ltok, p.max_llm_len)


def _t5_caption(p, texts, rng):  # LAVIS: text_input = prompt, text_output = caption
    return encoder_decoder_lm(p.prompt, texts["caption"], p.ltok, p.max_llm_len,
                              p.max_target_len)


def _t5_prefix_caption(p, texts, rng):
    prefix, suffix = split_prefix(texts["caption"], rng)
    return encoder_decoder_lm(prefix, suffix, p.ltok, p.max_llm_len, p.max_target_len)


def _opt_vqa(p, texts, rng):
    out = decoder_only_lm(p.question_prompt(texts), texts["answer"] + p.eos_text, p.ltok,
                          p.max_llm_len)
    return {**out, **_qformer_question(p, texts)}


def _t5_vqa(p, texts, rng):
    out = encoder_decoder_lm(p.question_prompt(texts), texts["answer"], p.ltok,
                             p.max_llm_len, p.max_target_len)
    return {**out, **_qformer_question(p, texts)}


def _opt_prompt(p, texts, rng):
    return prompt_ids(p.prompt, p.ltok, p.max_llm_len, "left")


def _t5_prompt(p, texts, rng):
    return prompt_ids(p.prompt, p.ltok, p.max_llm_len, "right")


def _opt_vqa_prompt(p, texts, rng):
    out = prompt_ids(p.question_prompt(texts), p.ltok, p.max_llm_len, "left")
    return {**out, **_qformer_question(p, texts)}


def _t5_vqa_prompt(p, texts, rng):
    out = prompt_ids(p.question_prompt(texts), p.ltok, p.max_llm_len, "right")
    return {**out, **_qformer_question(p, texts)}


PROCESSORS: dict[str, Callable] = {
    "none": _none,
    "qformer_caption": _qformer_caption,
    "opt_caption": _opt_caption,
    "t5_caption": _t5_caption,
    "t5_prefix_caption": _t5_prefix_caption,
    "opt_vqa": _opt_vqa,
    "t5_vqa": _t5_vqa,
    "opt_prompt": _opt_prompt,
    "t5_prompt": _t5_prompt,
    "opt_vqa_prompt": _opt_vqa_prompt,
    "t5_vqa_prompt": _t5_vqa_prompt,
}
# name -> (texts it reads: "caption", "qa" (question + answer) or None; uses the Q-Former
# tokenizer; uses the LLM tokenizer)
SPECS: dict[str, tuple[str | None, bool, bool]] = {
    "none": (None, False, False),
    "qformer_caption": ("caption", True, False),
    "opt_caption": ("caption", False, True),
    "t5_caption": ("caption", False, True),
    "t5_prefix_caption": ("caption", False, True),
    "opt_vqa": ("qa", True, True),
    "t5_vqa": ("qa", True, True),
    "opt_prompt": (None, False, True),
    "t5_prompt": (None, False, True),
    "opt_vqa_prompt": ("qa", True, True),
    "t5_vqa_prompt": ("qa", True, True),
}

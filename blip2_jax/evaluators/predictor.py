"""What the evaluators ask of a model, on already preprocessed pixel batches.

`Predictor` is the protocol (tests use fakes); `ModelPredictor` implements it for a `Blip2` module
and a parameter tree in memory, which is what both the trainer (its current trainable + frozen
params) and the evaluation CLI (a loaded directory or a training workdir) have. Generation runs
`generation.generate_tokens` (jitted prefill + decoding loop); retrieval features call the
Q-Former heads directly. Every call takes this host's rows as numpy, spreads them over the mesh's
batch axes (padded to a multiple of the local devices) and returns this host's rows as numpy.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import generation, sharding
from blip2_jax.data import text as text_lib
from blip2_jax.data.tokenizers import Tokenizer, load_tokenizer
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.configs import Blip2Config, OPTConfig, T5Config

QFORMER_TOKENIZER = "bert-base-uncased-offline"  # the Q-Former's vocabulary, available offline


class Predictor(Protocol):
    """Model queries of the evaluators. Arrays are this host's rows, numpy."""

    llm_kind: str | None  # "opt", "t5" or None (no language model)

    def generate(self, pixel_values: np.ndarray, prompts: Sequence[str] | None, *,
                 max_prompt_len: int = 32, **options) -> list[str]:
        """[B, H, W, 3] normalised pixels + B prompts (None: no prompt) -> B texts (the new
        tokens only, stripped). options: num_beams, max_new_tokens, min_new_tokens,
        length_penalty, repetition_penalty, early_stopping."""

    def image_features(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (image embeddings after ln_vision [B, N, Dv] for ITM, L2-normalised ITC query
        projections [B, Q, E])."""

    def tokenize_texts(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Q-Former tokens `[CLS] text [SEP]`, truncated/padded to max_len -> (ids, mask) int32
        [T, max_len]."""

    def text_features(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """-> L2-normalised ITC text projections of [CLS] [T, E]."""

    def itm_scores(self, image_embeds: np.ndarray, input_ids: np.ndarray,
                   attention_mask: np.ndarray) -> np.ndarray:
        """Row-wise (image, text) pairs -> ITM match logits [B] (class 1, averaged over queries)."""

    def set_params(self, params) -> None:
        """Use a new parameter tree (the trainer's latest)."""


class ImageBankPredictor(Predictor, Protocol):
    """Optional: ITM against image embeddings kept on the devices (retrieval re-ranks each
    text against k different images: sending them from the host each time dominates)."""

    def set_image_bank(self, image_embeds: np.ndarray | None) -> None:
        """All images' embeddings [N, Nv, Dv], the same on every host (None: release)."""

    def itm_scores_bank(self, image_index: np.ndarray, input_ids: np.ndarray,
                        attention_mask: np.ndarray) -> np.ndarray:
        """`itm_scores` with the images given as rows of the bank [B]."""


def itc_similarity(image_feats: np.ndarray, text_feats: np.ndarray, chunk: int = 256) -> np.ndarray:
    """ITC similarity (paper §3.2): for each (image, text), the best query's cosine similarity.

    image_feats [I, Q, E] and text_feats [T, E] (both L2-normalised) -> float32 [I, T]; computed
    in chunks of images so the [I, Q, T] intermediate stays small."""
    image_feats = np.asarray(image_feats, np.float32)
    text_feats = np.asarray(text_feats, np.float32)
    n, q, e = image_feats.shape
    out = np.empty((n, text_feats.shape[0]), np.float32)
    for s in range(0, n, chunk):
        block = image_feats[s:s + chunk].reshape(-1, e) @ text_feats.T
        out[s:s + chunk] = block.reshape(-1, q, text_feats.shape[0]).max(axis=1)
    return out


# ------------------------------------------------------------------------------ jitted pieces
def _generate(model: Blip2, params, pixel_values, input_ids, attention_mask, rng, *, options,
              decoder_start_token_id):
    """Pixels + prompt tokens -> new token ids [B, R, max_new_tokens] in one program."""
    prompt = generation.soft_prompts(model, params, pixel_values)
    # The repetition penalty (1.0 in every protocol here) counts the real prompt tokens.
    return generation.generate_tokens(model, params, prompt, input_ids, attention_mask,
                                      attention_mask, rng, options=options,
                                      decoder_start_token_id=decoder_start_token_id)


def _image_side(model: Blip2, params, pixel_values):
    v = {"params": params}
    embeds = model.apply(v, pixel_values, method=Blip2.encode_image)
    query = model.apply(v, embeds, method=Blip2.query_output)
    feats = model.apply(v, query, method=lambda m, q: m.qformer.image_embeds(q))
    return embeds, feats


def _text_side(model: Blip2, params, input_ids, attention_mask):
    def run(m, ids, mask):
        return m.qformer.text_embeds(m.qformer.text_features(ids, mask))
    return model.apply({"params": params}, input_ids, attention_mask, method=run)


def _itm_match(model: Blip2, params, image_embeds, input_ids, attention_mask):
    def run(m, e, ids, mask):
        return m.qformer.itm_logits(m.qformer.multimodal_features(e.astype(jnp.float32), ids, mask))
    return model.apply({"params": params}, image_embeds, input_ids, attention_mask, method=run)[:, 1]


def _itm_match_bank(model: Blip2, params, bank, image_index, input_ids, attention_mask):
    return _itm_match(model, params, bank[image_index], input_ids, attention_mask)


class ModelPredictor:
    """`Predictor` over a `Blip2` module and its params (a tree of arrays, sharded or not).

    Args:
      model, model_cfg: the module and its config.
      mesh: the device mesh (None: all devices on the data axis).
      params: the merged parameter tree.
      llm_tokenizer: a tokenizer name/directory (data/tokenizers.py) or a `Tokenizer`.
      qformer_tokenizer: likewise, for the Q-Former's BERT tokenizer (retrieval); None:
        bert-base-uncased.
      generation_config: a checkpoint's generation_config.json (EOS / pad / decoder start
        override the model config's, as in transformers).
    """

    def __init__(self, model: Blip2, model_cfg: Blip2Config, mesh, params, *,
                 llm_tokenizer: str | Tokenizer | None = None,
                 qformer_tokenizer: str | Tokenizer | None = None,
                 generation_config: dict | None = None):
        self.model, self.cfg, self.params = model, model_cfg, params
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        text = model_cfg.text
        self.llm_kind = ("opt" if isinstance(text, OPTConfig) else
                         "t5" if isinstance(text, T5Config) else None)
        self._llm_tok, self._qf_tok = llm_tokenizer, qformer_tokenizer
        g = dict(generation_config or {})
        if text is not None:
            eos = g.get("eos_token_id", text.eos_token_id)
            self.eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                             if e is not None)
            pad = g.get("pad_token_id", text.pad_token_id)
            self.pad = int(self.eos[0] if pad is None and self.eos else pad or 0)
            self.decoder_start = int(g.get("decoder_start_token_id",
                                           getattr(text, "decoder_start_token_id", 0)) or 0)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.row_multiple = max(1, batch_devices // jax.process_count())
        self._generate = jax.jit(functools.partial(_generate, model),
                                 static_argnames=("options", "decoder_start_token_id"))
        self._image = jax.jit(functools.partial(_image_side, model))
        self._text = jax.jit(functools.partial(_text_side, model))
        self._itm = jax.jit(functools.partial(_itm_match, model))
        self._itm_bank = jax.jit(functools.partial(_itm_match_bank, model))
        self._bank = None

    def set_params(self, params) -> None:
        self.params = params

    # -- tokenizers (loaded on first use: a retrieval model needs no LLM tokenizer)
    @functools.cached_property
    def llm_tokenizer(self) -> Tokenizer:
        if self._llm_tok is None:
            raise ValueError("generation needs an LLM tokenizer: set llm_tokenizer in the "
                             "evaluator config (a name from data/tokenizers.py or a directory)")
        return self._llm_tok if isinstance(self._llm_tok, Tokenizer) else load_tokenizer(self._llm_tok)

    @functools.cached_property
    def qformer_tokenizer(self) -> Tokenizer:
        t = self._qf_tok or QFORMER_TOKENIZER
        return t if isinstance(t, Tokenizer) else load_tokenizer(t, qformer=True)

    # -- mesh plumbing
    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def _global(self, *arrays: np.ndarray):
        """Local rows -> global arrays split over the batch axes (rows padded) and the count."""
        n = len(arrays[0])
        rows = -(-n // self.row_multiple) * self.row_multiple
        out = []
        for a in arrays:
            a = np.asarray(a)
            if rows != n:
                a = np.concatenate([a, np.repeat(a[:1], rows - n, axis=0)])
            out.append(jax.make_array_from_process_local_data(
                sharding.batch_sharding(self.mesh, a.ndim), a))
        return out, n

    def _local(self, x: jax.Array, n: int) -> np.ndarray:
        """A global batch-sharded result -> this host's first n rows."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            x = jax.jit(lambda a: a, out_shardings=sharding.batch_sharding(self.mesh, x.ndim))(x)
            x = multihost_utils.global_array_to_host_local_array(
                x, self.mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
        return np.asarray(x)[:n]

    # -- generation
    def _prompt_ids(self, prompts: Sequence[str | None], max_len: int):
        """OPT: `[pads][BOS] prompt` (left); T5: `prompt </s> [pads]` (right); [B, max_len], or
        [B, 0] when nothing at all is there. Long prompts lose their end, as with transformers'
        truncation."""
        tok = self.llm_tokenizer
        seqs = []
        for p in prompts:
            body = tok.encode(p.rstrip()) if p and p.strip() else []
            body = body[:max_len - len(tok.prefix) - len(tok.suffix)]
            seqs.append(list(tok.prefix) + body + list(tok.suffix))
        if not any(seqs):  # a tokenizer without BOS and no prompt: the soft prompt alone leads
            max_len = 0    # (as in training with such a tokenizer)
        elif not all(seqs):
            raise ValueError("some prompts are empty and the tokenizer adds no BOS")
        ids = np.full((len(seqs), max_len), tok.pad_id, np.int32)
        mask = np.zeros((len(seqs), max_len), np.int32)
        for i, seq in enumerate(seqs):
            sl = slice(0, len(seq)) if self.llm_kind == "t5" else slice(max_len - len(seq), max_len)
            ids[i, sl], mask[i, sl] = seq, 1
        return ids, mask

    def generate(self, pixel_values, prompts=None, *, max_prompt_len: int = 32,
                 **options) -> list[str]:
        if self.llm_kind is None:
            raise ValueError("generation needs a model with a language model")
        b = len(pixel_values)
        prompts = [None] * b if prompts is None else list(prompts)
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for {b} images")
        opts = generation.GenerationOptions(
            eos_token_id=self.eos, pad_token_id=self.pad,
            **{k: v for k, v in options.items() if v is not None}).validate()
        ids, mask = self._prompt_ids(prompts, max_prompt_len)
        (px, ids_g, mask_g), n = self._global(pixel_values, ids, mask)
        with self._context():
            out = self._generate(self.params, px, ids_g, mask_g, jax.random.key(0),
                                 options=opts, decoder_start_token_id=self.decoder_start)
        tokens = self._local(out, n)[:, 0]
        return [self.llm_tokenizer.decode(_cut_at_eos(row, self.eos)).strip() for row in tokens]

    # -- retrieval
    def image_features(self, pixel_values):
        (px,), n = self._global(pixel_values)
        with self._context():
            embeds, feats = self._image(self.params, px)
        return self._local(embeds, n), self._local(feats, n)

    def tokenize_texts(self, texts, max_len: int):
        rows = [text_lib.qformer_text(t, self.qformer_tokenizer, max_len) for t in texts]
        return (np.stack([r["qformer_input_ids"] for r in rows]),
                np.stack([r["qformer_attention_mask"] for r in rows]))

    def text_features(self, input_ids, attention_mask):
        (ids, mask), n = self._global(input_ids, attention_mask)
        with self._context():
            return self._local(self._text(self.params, ids, mask), n)

    def itm_scores(self, image_embeds, input_ids, attention_mask):
        (emb, ids, mask), n = self._global(image_embeds, input_ids, attention_mask)
        with self._context():
            return self._local(self._itm(self.params, emb, ids, mask), n)

    def set_image_bank(self, image_embeds) -> None:
        # Replicated: every device gathers its rows' images locally (memory: the whole bank per
        # device, e.g. 5k COCO images x 677 x 1408 in bfloat16 = 9.5 GB).
        self._bank = None if image_embeds is None else jax.device_put(
            image_embeds, sharding.replicated(self.mesh))

    def itm_scores_bank(self, image_index, input_ids, attention_mask):
        if self._bank is None:
            raise ValueError("itm_scores_bank needs set_image_bank first")
        (idx, ids, mask), n = self._global(np.asarray(image_index, np.int32), input_ids,
                                           attention_mask)
        with self._context():
            return self._local(self._itm_bank(self.params, self._bank, idx, ids, mask), n)


def _cut_at_eos(row, eos: tuple[int, ...]) -> list[int]:
    """New tokens up to and including the first EOS (the pad fill after it dropped)."""
    out = []
    for t in row:
        out.append(int(t))
        if int(t) in eos:
            break
    return out

"""The serving core: every model query blip2_jax answers, over (model, params, mesh).

`Predictor` holds a `Blip2` module, its params (placed on a mesh), the tokenizers and the
checkpoint's generation config, and owns the jitted programs:

  image side   pixels -> ViT output (after ln_vision), query outputs, soft prompts or ITC features
  text side    Q-Former text -> normalised ITC text features
  ITM          (image embeddings, text) -> match logits, also against an on-device image bank
  generate     soft prompts + prompt tokens -> new tokens (greedy / beam / sampling)
  score        summed log-likelihood of candidate texts

Inputs are this host's rows as numpy (pixels already preprocessed, `preprocess.ImageProcessor`);
outputs are this host's rows as numpy. Rows are padded to a batch bucket ({1, 2, 4, 8, 16, 24,
...}, a multiple of the local batch devices) and token lengths to multiples of `length_bucket`,
so repeated calls reuse the compiled programs. `blip2_jax.load` wraps a Predictor for strings,
paths and PIL images (`inference.py`); the evaluators, the CLIs, the demo and annotation use it.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blip2_jax import generation, sharding
from blip2_jax.data import text as text_lib
from blip2_jax.data.tokenizers import Tokenizer, load_tokenizer, require_tokenizer_files
from blip2_jax.generation import GenerationOptions
from blip2_jax.models import streaming
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.configs import Blip2Config, OPTConfig, T5Config
from blip2_jax.models.qformer import itc_similarity as _itc_similarity
from blip2_jax.preprocess import InputError

QFORMER_TOKENIZER = "bert-base-uncased-offline"  # the Q-Former's vocabulary, available offline
GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
                     "repetition_penalty", "num_return_sequences", "do_sample", "temperature", "top_k",
                     "top_p")
DEFAULT_MAX_NEW_TOKENS = 20  # the reference's default when nothing sets a length
IMAGE_ROWS_PER_CALL = 32
ITM_PAIRS_PER_CALL = 64


# ------------------------------------------------------------------------------ rows and tokens
def batch_bucket(n: int, multiple: int = 1) -> int:
    """Padded batch size: powers of two up to 8, then multiples of 8; a multiple of `multiple`."""
    b = 1 << (max(n, 1) - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return -(-b // multiple) * multiple


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Repeats the first row to fill `rows` (the extra rows are dropped afterwards)."""
    x = np.asarray(x)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)], axis=0)


def pad_tokens(seqs: Sequence[Sequence[int]], pad_id: int, length: int, side: str = "right"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask) int32 [N, length], padded on `side` (each list must fit)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, sl], mask[i, sl] = list(s), 1
    return ids, mask


def cut_at_eos(row: Sequence[int], eos: Sequence[int]) -> list[int]:
    """New tokens up to and including the first EOS (the pad fill after it dropped)."""
    out = []
    for t in row:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def itc_similarity(image_feats: np.ndarray, text_feats: np.ndarray, chunk: int = 256) -> np.ndarray:
    """`qformer.itc_similarity` for collections: [I, Q, E] x [T, E] -> float32 [I, T], in
    chunks of images so that the [I, T, Q] intermediate stays small."""
    image_feats = np.asarray(image_feats, np.float32)
    text_feats = jnp.asarray(text_feats, jnp.float32)
    out = np.empty((len(image_feats), len(text_feats)), np.float32)
    for s in range(0, len(image_feats), chunk):
        block = image_feats[s:s + chunk]
        rows = len(block)
        sim = _jitted_itc(jnp.asarray(pad_rows(block, chunk if len(image_feats) > chunk else rows)), text_feats)
        out[s:s + rows] = np.asarray(sim)[:rows]
    return out


_jitted_itc = jax.jit(_itc_similarity)


# ------------------------------------------------------------------------------ jitted pieces
def _image_side(model: Blip2, params, pixel_values):
    v = {"params": params}
    embeds = model.apply(v, pixel_values, method=Blip2.encode_image)
    query = model.apply(v, embeds, method=Blip2.query_output)
    out = {"image_embeds": embeds, "query_output": query}
    if model.config.text is not None:
        out["projected"] = model.apply(v, query, method=Blip2.project)
    elif model.config.qformer.use_qformer_text_input:
        out["image_feats"] = model.apply(v, query, method=lambda m, q: m.qformer.image_embeds(q))
    return out


def _text_side(model: Blip2, params, input_ids, attention_mask):
    return model.apply({"params": params}, input_ids, attention_mask,
                       method=lambda m, i, a: m.qformer.text_embeds(m.qformer.text_features(i, a)))


def _itm_logits(model: Blip2, params, image_embeds, input_ids, attention_mask):
    def run(m, e, i, a):
        return m.qformer.itm_logits(m.qformer.multimodal_features(e.astype(jnp.float32), i, a))
    return model.apply({"params": params}, image_embeds, input_ids, attention_mask, method=run)


def _itm_bank_logits(model: Blip2, params, bank, image_index, input_ids, attention_mask):
    return _itm_logits(model, params, bank[image_index], input_ids, attention_mask)


# ------------------------------------------------------------------------------ the predictor
class Predictor:
    """A BLIP-2 ready to answer: module, params on a mesh, tokenizers, compiled programs.

    Args:
      model, params, config: the `Blip2` module, its parameter tree (arrays placed on `mesh`) and
        its `Blip2Config`.
      mesh: the device mesh (None: one device).
      tokenizer: the language model's tokenizer (a `Tokenizer`, a name or directory for
        `data.tokenizers.load_tokenizer`; loaded on first use). None: generation unavailable.
      qformer_tokenizer: likewise for the Q-Former's BERT tokenizer (None: bert-base-uncased).
      generation_config: a checkpoint's generation_config.json (defaults and special ids, as in
        transformers: explicit options > this > transformers' defaults).
      length_bucket: token lengths are padded to a multiple of this (fewer compiled shapes).
    """

    def __init__(self, model: Blip2, params, config: Blip2Config, *, mesh=None,
                 tokenizer: Tokenizer | str | None = None,
                 qformer_tokenizer: Tokenizer | str | None = None,
                 generation_config: dict | None = None, length_bucket: int = 8):
        self.model, self.params, self.config = model, params, config
        self.mesh = sharding.single_device_mesh() if mesh is None else mesh
        self._tok, self._qf_tok = tokenizer, qformer_tokenizer
        self.generation_config = dict(generation_config or {})
        self.length_bucket = int(length_bucket)
        text = config.text
        self.llm_kind = "opt" if isinstance(text, OPTConfig) else "t5" if isinstance(text, T5Config) else None
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        # a mesh may span all processes (evaluators) or only this one's devices (annotation)
        self.mesh_processes = len({d.process_index for d in self.mesh.devices.flat})
        self.row_multiple = max(1, batch_devices // self.mesh_processes)
        m, serve = model, streaming.serving_products  # inference only: see its docstring
        self._soft_prompts = jax.jit(serve(functools.partial(generation.soft_prompts, m)))
        self._generate = jax.jit(serve(functools.partial(generation.generate_tokens, m)),
                                 static_argnames=("options", "decoder_start_token_id"))
        self._log_likelihood = jax.jit(serve(functools.partial(generation.log_likelihood, m)))
        self._image_side = jax.jit(serve(functools.partial(_image_side, m)))
        self._text_side = jax.jit(serve(functools.partial(_text_side, m)))
        self._itm = jax.jit(serve(functools.partial(_itm_logits, m)))
        self._itm_bank = jax.jit(serve(functools.partial(_itm_bank_logits, m)))
        self._bank = None

    def set_params(self, params) -> None:
        """Use a new parameter tree (the trainer's latest), placed like the old one."""
        self.params = params

    # -- what the checkpoint can do
    @property
    def can_generate(self) -> bool:
        return self.config.text is not None

    @property
    def can_match(self) -> bool:
        return self.config.text is None and self.config.qformer.use_qformer_text_input

    def require(self, ok: bool, what: str, name: str = "the model") -> None:
        if not ok:
            kind = ("a captioning checkpoint (Blip2ForConditionalGeneration): it has no ITM/ITC heads"
                    if self.can_generate else "a retrieval checkpoint (Blip2ForImageTextRetrieval): it has "
                    "no language model")
            raise InputError(f"{what} is not available: {name} is {kind}")

    # -- tokenizers (loaded on first use: a retrieval model needs no LLM tokenizer)
    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            raise ValueError("generation needs a language-model tokenizer (a name from "
                             "data/tokenizers.py or a directory)")
        return self._tok if isinstance(self._tok, Tokenizer) else load_tokenizer(self._tok)

    @functools.cached_property
    def qformer_tokenizer(self) -> Tokenizer:
        t = self._qf_tok or QFORMER_TOKENIZER
        return t if isinstance(t, Tokenizer) else load_tokenizer(t, qformer=True)

    # -- rows over the mesh
    def _global(self, *arrays: np.ndarray, rows: int | None = None):
        """Local rows -> global arrays split over the batch axes (padded to `rows`, default the
        batch bucket of the row count) and the count of real rows."""
        n = len(arrays[0])
        rows = batch_bucket(n, self.row_multiple) if rows is None else rows
        out = [jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, np.ndim(a)),
                                                      pad_rows(a, rows)) for a in arrays]
        return out, n

    def _local(self, x: jax.Array, n: int) -> np.ndarray:
        """A global batch-sharded result -> this host's first n rows."""
        if self.mesh_processes > 1:
            from jax.experimental import multihost_utils
            x = jax.jit(lambda a: a, out_shardings=sharding.batch_sharding(self.mesh, x.ndim))(x)
            x = multihost_utils.global_array_to_host_local_array(
                x, self.mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
        return np.asarray(x)[:n]

    def bucket(self, n: int, limit: int | None = None) -> int:
        """A token length rounded up to the length bucket (never past `limit`, never below n)."""
        b = -(-max(n, 1) // self.length_bucket) * self.length_bucket
        return b if limit is None else max(n, min(b, limit))

    # -- image and text sides
    def image_features(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """[B, S, S, 3] normalised pixels -> "image_embeds" (ViT output after ln_vision)
        [B, N, Dv], "query_output" [B, Q, Dq], and "projected" [B, Q, D_llm] (LLM checkpoints)
        or "image_feats" (normalised ITC projections [B, Q, E], retrieval checkpoints)."""
        out = []
        step = max(IMAGE_ROWS_PER_CALL, self.row_multiple)
        for s in range(0, len(pixel_values), step):
            (px,), n = self._global(np.asarray(pixel_values[s:s + step], np.float32))
            with sharding.use(self.mesh):
                feats = self._image_side(self.params, px)
            out.append({k: self._local(v, n) for k, v in feats.items()})
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def qformer_tokens(self, texts: Sequence[str], max_len: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Q-Former tokens `[CLS] text [SEP]` -> (ids, mask) int32 [T, L]. With `max_len`
        (a protocol's length) texts are truncated and padded to it; without, a text longer than
        the Q-Former's positions is an error and L is the length bucket of the longest."""
        tok = self.qformer_tokenizer
        if max_len is not None:
            rows = [text_lib.qformer_text(t, tok, max_len) for t in texts]
            return (np.stack([r["qformer_input_ids"] for r in rows]),
                    np.stack([r["qformer_attention_mask"] for r in rows]))
        seqs = [tok(t)["input_ids"] for t in texts]
        longest, limit = max(map(len, seqs)), self.config.qformer.max_position_embeddings
        if longest > limit:
            raise InputError(f"a text is {longest} tokens; the Q-Former allows at most {limit}")
        return pad_tokens(seqs, tok.pad_id, self.bucket(longest, limit))

    def text_features(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Q-Former tokens -> L2-normalised ITC text projections of [CLS] [T, E]."""
        (ids, mask), n = self._global(input_ids, attention_mask)
        with sharding.use(self.mesh):
            return self._local(self._text_side(self.params, ids, mask), n)

    def itm_logits(self, image_embeds: np.ndarray, input_ids: np.ndarray,
                   attention_mask: np.ndarray) -> np.ndarray:
        """Row-wise (image, text) pairs -> ITM logits [B, 2] (no match, match), mean over queries."""
        (emb, ids, mask), n = self._global(image_embeds, input_ids, attention_mask)
        with sharding.use(self.mesh):
            return self._local(self._itm(self.params, emb, ids, mask), n)

    def itm_scores(self, image_embeds, input_ids, attention_mask) -> np.ndarray:
        """Match logits [B] (class 1) of row-wise pairs."""
        return self.itm_logits(image_embeds, input_ids, attention_mask)[:, 1]

    def itm_pair_logits(self, image_embeds: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                        pairs: np.ndarray) -> np.ndarray:
        """ITM logits [P, 2] of (image row, text row) index pairs [P, 2], in fixed-size calls."""
        chunk = batch_bucket(min(len(pairs), ITM_PAIRS_PER_CALL), self.row_multiple)
        out = []
        for s in range(0, len(pairs), chunk):
            p = pad_rows(pairs[s:s + chunk], chunk)
            out.append(self.itm_logits(image_embeds[p[:, 0]], ids[p[:, 1]], mask[p[:, 1]]))
        return np.concatenate(out)[:len(pairs)]

    def set_image_bank(self, image_embeds: np.ndarray | None) -> None:
        """All images' embeddings [N, Nv, Dv], the same on every host, kept on every device
        (retrieval re-ranks each text against k images; sending them each time dominates).
        Memory: the whole bank per device (5k COCO images x 677 x 1408 in bfloat16 = 9.5 GB)."""
        self._bank = None if image_embeds is None else jax.device_put(
            image_embeds, sharding.replicated(self.mesh))

    def itm_scores_bank(self, image_index: np.ndarray, input_ids: np.ndarray,
                        attention_mask: np.ndarray) -> np.ndarray:
        """`itm_scores` with the images given as rows of the bank [B]."""
        if self._bank is None:
            raise ValueError("itm_scores_bank needs set_image_bank first")
        (idx, ids, mask), n = self._global(np.asarray(image_index, np.int32), input_ids, attention_mask)
        with sharding.use(self.mesh):
            return self._local(self._itm_bank(self.params, self._bank, idx, ids, mask), n)[:, 1]

    # -- generation
    def special_ids(self) -> tuple[tuple[int, ...], int, int | None, int]:
        """(EOS ids, pad id, BOS id, decoder start id): generation_config.json over config.json."""
        g, text = self.generation_config, self.config.text
        eos = g.get("eos_token_id", text.eos_token_id)
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = g.get("pad_token_id", text.pad_token_id)
        pad = eos[0] if pad is None and eos else int(pad or 0)
        bos = g.get("bos_token_id", getattr(text, "bos_token_id", None))
        start = int(g.get("decoder_start_token_id", getattr(text, "decoder_start_token_id", 0)) or 0)
        return eos, pad, None if bos is None else int(bos), start

    def options(self, **kwargs) -> GenerationOptions:
        """Generation options: explicit kwargs > generation_config.json > transformers' defaults."""
        unknown = sorted(set(kwargs) - set(GENERATION_FIELDS))
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(unknown)}")
        g = self.generation_config
        vals = {k: g[k] for k in GENERATION_FIELDS if g.get(k) is not None}
        vals.update({k: v for k, v in kwargs.items() if v is not None})
        vals.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        vals["early_stopping"] = vals.get("early_stopping", False)
        if vals["early_stopping"] not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {vals['early_stopping']!r}")
        vals.update({k: int(vals[k]) for k in ("max_new_tokens", "min_new_tokens", "num_beams",
                                               "num_return_sequences") if k in vals})
        vals.update({k: float(vals[k]) for k in ("length_penalty", "repetition_penalty", "temperature",
                                                 "top_p") if k in vals})
        eos, pad, _, _ = self.special_ids()
        return GenerationOptions(eos_token_id=eos, pad_token_id=pad, **vals).validate()

    def prompt_tokens(self, prompt: str | None, max_len: int | None = None) -> list[int]:
        """The language model's prompt ids as the reference builds them: the tokenizer's own
        special ids around the text (OPT: BOS first; T5: </s> last). No prompt (None) on a
        decoder-only model is `[BOS]` from the config, as transformers' generate builds it; a
        text that tokenizes to nothing with a tokenizer that adds no BOS gives no ids (the soft
        prompt alone leads). `max_len` truncates the text's end (the evaluators' protocol)."""
        tok = self.tokenizer
        if prompt is None and self.llm_kind == "opt":
            bos = self.special_ids()[2]
            return [] if bos is None else [bos]
        body = tok.encode(prompt or "")
        if max_len is not None:
            body = body[:max(max_len - len(tok.prefix) - len(tok.suffix), 0)]
        return list(tok.prefix) + body + list(tok.suffix)

    def max_prompt_tokens(self, extra: int) -> int | None:
        """Longest prompt (tokens) the language model accepts next to `extra` generated tokens."""
        if self.llm_kind == "t5":
            limit = getattr(self.tokenizer, "model_max_length", None)
            return limit if limit is not None and limit < 10**6 else None
        return self.config.text.max_position_embeddings - self.config.num_query_tokens - extra

    def check_length(self, n: int, extra: int, what: str) -> None:
        """InputError when `n` prompt tokens plus `extra` fed-back generated tokens do not fit."""
        limit = self.max_prompt_tokens(extra)
        if limit is not None and n > limit:
            raise InputError(f"{what} is {n} tokens, but at most {max(limit, 0)} fit: the language model has "
                             f"{self.config.text.max_position_embeddings} positions, "
                             f"{self.config.num_query_tokens} for the image and {extra} for generated tokens")

    def generate_ids(self, pixel_values: np.ndarray, prompts: Sequence[str | None] | str | None = None, *,
                     max_prompt_len: int | None = None, seed: int = 0, **options) -> list[list[int]]:
        """[B, S, S, 3] normalised pixels + prompts (one for all, or one per image; None: no
        prompt) -> the new token ids of every returned sequence (B x num_return_sequences lists,
        best first per image), cut after the first EOS (kept)."""
        self.require(self.can_generate, "generation")
        n = len(pixel_values)
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise InputError(f"{len(prompts)} prompts for {n} images")
        opts = self.options(**options)
        seqs = [self.prompt_tokens(p, max_prompt_len) for p in prompts]
        empty = [i for i, s in enumerate(seqs) if not s]
        if empty and len(empty) < n:  # rows without prompt tokens go alone (nothing to left-pad)
            full = [i for i in range(n) if seqs[i]]
            out: list[list[list[int]]] = [[] for _ in range(n)]
            for group in (empty, full):
                ids = self.generate_ids(pixel_values[group], [prompts[i] for i in group],
                                        max_prompt_len=max_prompt_len, seed=seed, **options)
                r = len(ids) // len(group)
                for j, i in enumerate(group):
                    out[i] = ids[j * r:(j + 1) * r]
            return [row for rows in out for row in rows]
        tokens = self._generate_padded(np.asarray(pixel_values, np.float32), seqs, opts, seed)
        return [cut_at_eos(row, opts.eos_token_id) for row in tokens.reshape(n * opts.num_return_sequences, -1)]

    def _generate_padded(self, pixel_values, seqs, opts: GenerationOptions, seed: int) -> np.ndarray:
        """Padded prompts on the mesh -> new tokens [B, R, max_new_tokens] (numpy)."""
        enc_dec = self.llm_kind == "t5"
        natural = max(len(s) for s in seqs)
        self.check_length(natural, 0 if enc_dec else opts.max_new_tokens - 1, "the prompt")
        length = 0 if natural == 0 else self.bucket(
            natural, None if enc_dec else self.max_prompt_tokens(opts.max_new_tokens - 1))
        ids, mask = pad_tokens(seqs, self.tokenizer.pad_id, length, "right" if enc_dec else "left")
        # the positions the reference's own batch padding (to `natural`) has: the repetition
        # penalty counts those pads, not our extra bucket padding
        counted = mask.copy() if enc_dec else np.zeros_like(mask)
        if not enc_dec:
            counted[:, length - natural:] = 1
        (px, ids_g, mask_g, counted_g), n = self._global(pixel_values, ids, mask, counted)
        start = self.special_ids()[3]
        with sharding.use(self.mesh):
            prompt = self._soft_prompts(self.params, px)
            out = self._generate(self.params, prompt, ids_g, mask_g, counted_g, jax.random.key(int(seed)),
                                 options=opts, decoder_start_token_id=start)
        return self._local(out, n)

    def generate(self, pixel_values, prompts=None, **kwargs) -> list[str]:
        """`generate_ids`, decoded and stripped (the evaluators' answers and captions)."""
        return self.decode(self.generate_ids(pixel_values, prompts, **kwargs))

    def decode(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(list(t), skip_special_tokens=True).strip() for t in token_ids]

    # -- scoring
    def log_likelihood(self, pixel_values: np.ndarray, prompts: Sequence[str | None],
                       texts: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-likelihood of each image's candidate texts after its prompt.

        pixel_values [N, S, S, 3]; prompts [N]; texts: N equally long lists of C candidates.
        Returns (log-likelihoods float32 [N, C], token counts int [N, C]). One process."""
        self.require(self.can_generate, "scoring")
        n, c = len(pixel_values), len(texts[0])
        tok, enc_dec = self.tokenizer, self.llm_kind == "t5"
        image_index, prompt_ids, text_ids = [], [], []
        for i, (p, cands) in enumerate(zip(prompts, texts)):
            pids = self.prompt_tokens(p)
            for t in cands:
                image_index.append(i)
                prompt_ids.append(pids)
                text_ids.append(tok.encode(t))
        if enc_dec:
            for p in prompt_ids:
                self.check_length(len(p), 0, "the prompt")
            start = self.special_ids()[3]
            enc_ids, enc_mask = pad_tokens(prompt_ids, tok.pad_id, self.bucket(max(map(len, prompt_ids))))
            dec_len = self.bucket(max(map(len, text_ids)))
            dec_in, _ = pad_tokens([[start] + t[:-1] for t in text_ids], tok.pad_id, dec_len)
            targets, target_mask = pad_tokens(text_ids, tok.pad_id, dec_len)
            arrays = (enc_ids, enc_mask, targets, target_mask, dec_in)
            counts = target_mask.sum(-1)
        else:
            full = [p + t for p, t in zip(prompt_ids, text_ids)]
            longest = max(map(len, full))
            self.check_length(longest, 0, "prompt + text")
            ids, mask = pad_tokens(full, tok.pad_id, self.bucket(longest, self.max_prompt_tokens(0)))
            target_mask = np.zeros_like(mask)
            for j, (p, t) in enumerate(zip(prompt_ids, text_ids)):
                target_mask[j, len(p):len(p) + len(t)] = 1
            arrays = (ids, mask, ids, target_mask)
            counts = target_mask.sum(-1)
        (px,), _ = self._global(np.asarray(pixel_values, np.float32))
        rows, _ = self._global(np.asarray(image_index, np.int32), *arrays)
        with sharding.use(self.mesh):
            prompt = self._soft_prompts(self.params, px)
            ll = self._log_likelihood(self.params, prompt, *rows)
        return self._local(ll, n * c).reshape(n, c), counts.reshape(n, c)

    # -- construction
    @classmethod
    def from_dir(cls, directory: str, *, dtype: Any = "float32", mesh=None, length_bucket: int = 8,
                 scan_layers: bool | None = None, tokenizer: Tokenizer | str | None = None,
                 qformer_tokenizer: Tokenizer | str | None = None, revision: str | None = None,
                 quantize: str | None = None) -> Predictor:
        """A transformers-format BLIP-2 directory or Hugging Face Hub id (`weights/hub.py`;
        `revision` for ids): weights, config, tokenizer, generation config. Every file is
        validated before anything is allocated; the weights are then cast and placed on `mesh`
        one tensor at a time (`weights.hf.read_lazy`). `dtype`: the frozen towers' matrices
        (the Q-Former, norms and biases stay float32, whatever the files hold); `scan_layers`:
        see `default_scan_layers`; tokenizers given here replace the checkpoint's. `quantize`:
        "int8" / "int4" quantizes the frozen towers' matrices while placing them (`quant.py`);
        None keeps what the checkpoint stores (a quantized checkpoint stays quantized)."""
        from blip2_jax import quant
        from blip2_jax.models import build
        from blip2_jax.weights import hf, hub
        from blip2_jax.weights.safetensors_io import WeightsError

        quant.check_mode(quantize)
        if jax.default_backend() == "cpu":
            return_large_frees()
        directory = hub.resolve(os.fspath(directory), revision=revision)
        dt = build.dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
        mesh = sharding.single_device_mesh() if mesh is None else mesh
        cfg, _ = hf.read_config(directory)
        scan = default_scan_layers(cfg) if scan_layers is None else bool(scan_layers)
        scan_vision = default_scan_layers(None, mesh) if scan_layers is None else scan
        try:
            require_tokenizer_files(directory)
        except ValueError as e:
            raise _tokenizer_error(directory, e) from None
        # The tokenizer loads in a thread while the weights are placed: its import of
        # transformers (and of PyTorch where that is installed) takes seconds.
        pool = concurrent.futures.ThreadPoolExecutor(1)
        tok_job = pool.submit(load_tokenizer, directory, qformer=cfg.text is None)
        pool.shutdown(wait=False)
        gen_cfg = hf.read_generation_config(directory, cfg)
        ckpt = hf.read_lazy(directory, scan_layers=scan, vision_scan_layers=scan_vision)  # every tensor checked, none read yet
        cfg = ckpt.config
        mode = ckpt.quantized_mode(quantize)
        quant.check_backend(mode)
        model = Blip2(cfg, vision_dtype=dt, text_dtype=dt, scan_layers=scan, vision_scan_layers=scan_vision)
        with sharding.use(mesh):
            boxed = build.abstract_params(model, cfg)
            shardings = split_kernels(sharding.param_shardings(boxed, mesh), mesh)
            shardings = quant.quantized_shardings(shardings, sharding.unbox(boxed), mode)
        params = ckpt.place(shardings, dt, mode, _band_rule(mesh))
        try:
            own_tok = tok_job.result()
        except (FileNotFoundError, ValueError, OSError) as e:
            raise _tokenizer_error(directory, e) from None
        own = (own_tok, None) if cfg.text is not None else (None, own_tok)
        return cls(model, params, cfg, mesh=mesh, tokenizer=tokenizer or own[0],
                   qformer_tokenizer=qformer_tokenizer or own[1],
                   generation_config=gen_cfg, length_bucket=length_bucket)

    @classmethod
    def from_workdir(cls, workdir: str, *, mesh=None, tokenizer: Tokenizer | str | None = None,
                     qformer_tokenizer: Tokenizer | str | None = None) -> Predictor:
        """A training run (`weights.init.load_workdir`): its model, frozen towers and latest
        trainable params. Tokenizers default to the run's input pipeline's."""
        from blip2_jax.weights import init as init_lib

        mesh = sharding.single_device_mesh() if mesh is None else mesh
        model, model_cfg, params, tc = init_lib.load_workdir(workdir, mesh)
        return cls(model, params, model_cfg, mesh=mesh, tokenizer=tokenizer or tc.input.get("llm_tokenizer"),
                   qformer_tokenizer=qformer_tokenizer or tc.input.get("qformer_tokenizer"))


MMAP_ENV = "BLIP2_JAX_MMAP_THRESHOLD"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees() -> int | None:
    """On glibc, buffers of 1 MiB and more are mapped on their own and given back when freed
    (`mallopt(M_MMAP_THRESHOLD)`, process-wide). By default glibc raises that threshold as large
    buffers are freed and keeps what is freed after: at full size, the products' transient
    buffers left a batch-8 caption's process at 1.9x its weights (1.2x with this; a caption ~5 %
    slower, some phases up to ~25 %, on a machine whose fresh pages fault in slowly).
    `BLIP2_JAX_MMAP_THRESHOLD`: another threshold in bytes, 0 to keep glibc's behaviour. Returns
    the threshold set, or None."""
    import ctypes

    try:
        threshold = int(os.environ.get(MMAP_ENV, 1 << 20))
    except ValueError:
        raise ValueError(f"{MMAP_ENV} must be a number of bytes, got {os.environ[MMAP_ENV]!r}") from None
    if threshold <= 0:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc
        return None
    if ok != 1:
        return None
    _trim_after_compiles()
    return threshold


@functools.cache
def _trim_after_compiles() -> None:
    """After each XLA compilation (or persistent-cache retrieval), the heap the compiler freed goes
    back to the system (`malloc_trim`), before the program's first run adds its own buffers: at
    full size, a batch-1 caption's peak 0.11 GiB lower, its steady RSS 0.2 GiB lower."""
    import ctypes

    from jax._src import dispatch  # the event's name: jax.monitoring has no public constant

    libc = ctypes.CDLL("libc.so.6")

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(listener)


def split_kernels(shardings: dict, mesh) -> dict:
    """On a mesh of host devices split along "tensor" only (`streaming.split_mesh`), each
    language-model kernel [..., out, in] is placed split by output channel, as a decoding step's
    products stream their shares (`streaming.per_device`); other meshes: `shardings` as given."""
    if streaming.split_mesh(mesh) is None:
        return shardings
    P = jax.sharding.PartitionSpec

    def one(path, sh):
        if path[0] != "language_model" or path[-1] != "kernel" or len(sh.spec) < 2:
            return sh
        return jax.sharding.NamedSharding(mesh, P(*(None,) * (len(sh.spec) - 2), streaming.SPLIT_AXIS, None))
    flat = traverse_util.flatten_dict(shardings)
    return traverse_util.unflatten_dict({p: one(p, sh) for p, sh in flat.items()})


def _band_rule(mesh):
    """Which weights `from_dir` lays out in input bands: on one CPU device (or split by output
    channel over host devices, `split_kernels`), the language model's
    [out, in] kernels (each layer's, when stacked) whose inputs a streamed decoding step reads in
    blocks (`streaming.Banded`)."""
    one = mesh.devices.size == 1 or streaming.split_mesh(mesh) is not None
    if not one or jax.default_backend() != "cpu" or not streaming.applies(1, jnp.bfloat16):
        return None

    def rule(path, leaf, dtype) -> int:
        if path[0] != "language_model" or path[-1] != "kernel":
            return 1
        shape = tuple(leaf.shape)  # a stacked leaf (under "layers"): each layer's kernel
        return streaming.band_count(shape[1:] if "layers" in path else shape, dtype)
    return rule


def _tokenizer_error(directory: str, e: Exception):
    """One line: `directory: cannot load the tokenizer: <why>` (the path said once)."""
    from blip2_jax.weights.safetensors_io import WeightsError
    why = " ".join(str(e).split()).removeprefix(f"{directory}: ").removeprefix("cannot load the tokenizer: ")
    return WeightsError(f"{directory}: cannot load the tokenizer: {why}")


def default_scan_layers(cfg=None, mesh=None) -> bool:
    """Whether inference stacks a tower's layers under one loop (one layer compiled, not each)
    or keeps one set of weights per layer: scanned on TPU/GPU; on CPU, an OPT language model
    (`cfg`'s) is scanned, as its decoding reads each layer's kernels in place in their stacks
    (`OPTForCausalLM`: full size, a first caption compiles in ~3 s instead of ~11, its programs
    a fraction of the memory), and the others are unrolled (`cfg` None: the image tower): XLA's
    CPU backend copies every scanned layer's slice of the stacks before its products, which cost
    the full-size image side ~10 % and would cost FlanT5's decoding far more. On a `mesh` split
    over a host's cores (`cores.py`) the image tower is scanned too: XLA partitioning 39 unrolled
    layers took ~2.3 s more of a full-size first caption, the scanned tower ~0.2 s more an image."""
    if jax.default_backend() != "cpu":
        return True
    if cfg is None:
        from blip2_jax.models import streaming
        return mesh is not None and streaming.split_mesh(mesh) is not None
    return isinstance(getattr(cfg, "text", None), OPTConfig)

"""BLIP-2 inference from a transformers-format directory: generate, score, match, retrieve, features.

    model = blip2_jax.load("dir")                    # dtype="bfloat16", mesh=... optional
    model.generate(images, prompts=None, num_beams=5, max_new_tokens=30) -> list[str]
    model.score(images, prompts, texts)  -> np.ndarray [N, C] summed log-likelihoods
    model.match(images, texts)           -> {"itm_probability", "itc_similarity"} [Ni, Nt]
    model.retrieve(images, queries, k=128, top=5)  (text -> image: ITC top-k, ITM re-rank)

Images are PIL images, paths or arrays. The device work is a few jitted functions (image side;
prefill + decoding loop; scoring; ITM), created once per object and traced once per (batch
bucket, length bucket, options): prompt/text lengths are padded to multiples of `length_bucket`
and batches to {1, 2, 4, 8, 16, 24, ...}, so repeated calls reuse the compiled programs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import generation, sharding
from blip2_jax.evaluators.metrics.retrieval import rerank_topk
from blip2_jax.generation import GenerationOptions
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.configs import Blip2Config
from blip2_jax.preprocess import ImageProcessor, InputError
from blip2_jax.weights import hf, init
from blip2_jax.weights.safetensors_io import WeightsError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")
GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
                     "repetition_penalty", "num_return_sequences", "do_sample", "temperature", "top_k",
                     "top_p")
DEFAULT_MAX_NEW_TOKENS = 20  # the reference's default when nothing sets a length
ITM_PAIRS_PER_CALL = 64


def load(directory: str, *, dtype: Any = "float32", mesh=None, length_bucket: int = 8,
         scan_layers: bool | None = None) -> Blip2Inference:
    """A transformers-format BLIP-2 directory -> Blip2Inference. `dtype` is the compute/storage
    dtype of the frozen towers ("float32" or "bfloat16"); the Q-Former stays float32.
    `scan_layers`: see `default_scan_layers` (None = that default)."""
    return Blip2Inference.from_dir(directory, dtype=dtype, mesh=mesh, length_bucket=length_bucket,
                                   scan_layers=scan_layers)


def default_scan_layers() -> bool:
    """Whether inference stacks the towers' layers under one `scan` (TPU/GPU) or keeps one set of
    weights per layer (CPU). In a scan each layer reads its weights as a slice of the stack; XLA's
    CPU backend copies that slice before every matmul (in a decoding profile the copy took longer
    than the matmul), so CPU inference unrolls the layers (at a longer compile)."""
    return jax.default_backend() != "cpu"


def load_tokenizer(directory: str):
    """The checkpoint's own transformers tokenizer."""
    if not any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        raise WeightsError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # slow import: only when a model is loaded
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; report one line)
        msg = " ".join(str(e).split())
        raise WeightsError(f"{directory}: cannot load the tokenizer: {type(e).__name__}: {msg}") from None


def _as_list(images) -> tuple[list, bool]:
    """-> (list of images, whether a single image was given)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given")
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    return [images], True


def batch_bucket(n: int) -> int:
    """Padded batch size: powers of two up to 8, then multiples of 8."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Repeats the first row to fill a batch bucket (the extra rows are dropped afterwards)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)], axis=0)


class Blip2Inference:
    """A loaded BLIP-2: params on device, tokenizer, image processor, compiled functions."""

    def __init__(self, model: Blip2, params, config: Blip2Config, tokenizer, image_processor: ImageProcessor,
                 generation_config: dict, *, directory: str = "", architecture: str = "", mesh=None,
                 length_bucket: int = 8):
        self.model, self.params, self.config = model, params, config
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.generation_config = generation_config
        self.directory, self.architecture, self.mesh = directory, architecture, mesh
        self.length_bucket = length_bucket
        m = model
        self._generate = jax.jit(functools.partial(generation.generate_tokens, m),
                                 static_argnames=("options", "decoder_start_token_id"))
        self._soft_prompts = jax.jit(functools.partial(generation.soft_prompts, m))
        self._log_likelihood = jax.jit(functools.partial(generation.log_likelihood, m))
        self._image_side = jax.jit(functools.partial(_image_side, m))
        self._text_side = jax.jit(functools.partial(_text_side, m))
        self._itm = jax.jit(functools.partial(_itm_logits, m))

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str, *, dtype: Any = "float32", mesh=None, length_bucket: int = 8,
                 scan_layers: bool | None = None):
        directory = os.fspath(directory)
        scan = default_scan_layers() if scan_layers is None else bool(scan_layers)
        cfg, raw = hf.read_config(directory)
        dt = init.dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
        tokenizer = load_tokenizer(directory)
        processor = ImageProcessor.from_dir(directory, default_size=cfg.vision.image_size)
        gen_cfg = {}
        path = os.path.join(directory, "generation_config.json")
        if cfg.text is not None and os.path.exists(path):
            with open(path) as f:
                gen_cfg = json.load(f)
        _, params = hf.load(directory, frozen_dtype=None if dt == jnp.float32 else dt, scan_layers=scan)
        model = Blip2(cfg, vision_dtype=dt, text_dtype=dt, scan_layers=scan)
        if mesh is None:
            params = jax.device_put(params)
        else:
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
                shardings = sharding.param_shardings(init.abstract_params(model, cfg), mesh)
            params = jax.device_put(params, shardings)
        arch = (raw.get("architectures") or [""])[0]
        return cls(model, params, cfg, tokenizer, processor, gen_cfg, directory=directory,
                   architecture=arch, mesh=mesh, length_bucket=length_bucket)

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    @property
    def can_generate(self) -> bool:
        return self.config.text is not None

    @property
    def can_match(self) -> bool:
        return self.config.text is None and self.config.qformer.use_qformer_text_input

    def _require(self, ok: bool, what: str):
        if not ok:
            kind = ("a captioning checkpoint (Blip2ForConditionalGeneration): it has no ITM/ITC heads"
                    if self.can_generate else "a retrieval checkpoint (Blip2ForImageTextRetrieval): it has no "
                    "language model")
            raise InputError(f"{what} is not available: {self.directory or 'the model'} is {kind}")

    # --- inputs -------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images / paths / arrays -> float32 [B, S, S, 3] as the checkpoint's processor does."""
        return self.image_processor(images)

    def _bucket(self, n: int, limit: int | None = None) -> int:
        b = -(-max(n, 1) // self.length_bucket) * self.length_bucket
        return b if limit is None else max(n, min(b, limit))

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        tok = self.tokenizer
        if prompt is None and not self.config.is_encoder_decoder:
            bos = self.generation_config.get("bos_token_id", self.config.text.bos_token_id)
            ids = [] if bos is None else [int(bos)]  # the reference's no-prompt input: [BOS]
        else:
            ids = tok(prompt or "")["input_ids"]
        if not ids:
            raise InputError("empty prompt: the tokenizer produced no tokens and the model has no BOS id")
        return list(ids)

    def _max_prompt_tokens(self, extra: int) -> int | None:
        """Longest prompt (tokens) the language model accepts next to `extra` generated tokens."""
        text = self.config.text
        if self.config.is_encoder_decoder:
            limit = getattr(self.tokenizer, "model_max_length", None)
            return limit if limit is not None and limit < 10**6 else None
        return text.max_position_embeddings - self.config.num_query_tokens - extra

    def _check_length(self, n: int, extra: int, what: str):
        """InputError when `n` prompt tokens plus `extra` fed-back generated tokens do not fit."""
        limit = self._max_prompt_tokens(extra)
        if limit is not None and n > limit:
            if self.config.is_encoder_decoder:
                raise InputError(f"{what} is {n} tokens; the tokenizer allows at most {limit}")
            raise InputError(f"{what} is {n} tokens, but at most {max(limit, 0)} fit: the language model has "
                             f"{self.config.text.max_position_embeddings} positions, {self.config.num_query_tokens} "
                             f"for the image and {extra} for generated tokens")

    # --- generation ---------------------------------------------------------------------------
    def options(self, **kwargs) -> GenerationOptions:
        """Generation options: explicit kwargs > generation_config.json > transformers defaults."""
        unknown = sorted(set(kwargs) - set(GENERATION_FIELDS) - {"seed"})
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(unknown)}")
        g = self.generation_config
        vals = {k: g[k] for k in GENERATION_FIELDS if g.get(k) is not None}
        vals.update({k: v for k, v in kwargs.items() if v is not None and k != "seed"})
        vals.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        text = self.config.text
        eos = g.get("eos_token_id", text.eos_token_id)
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = g.get("pad_token_id", text.pad_token_id)
        pad = eos[0] if pad is None and eos else int(pad or 0)
        vals["early_stopping"] = vals.get("early_stopping", False)
        if vals["early_stopping"] not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {vals['early_stopping']!r}")
        ints = ("max_new_tokens", "min_new_tokens", "num_beams", "num_return_sequences")
        floats = ("length_penalty", "repetition_penalty", "temperature", "top_p")
        vals.update({k: int(vals[k]) for k in ints if k in vals})
        vals.update({k: float(vals[k]) for k in floats if k in vals})
        return GenerationOptions(eos_token_id=eos, pad_token_id=pad, **vals).validate()

    def generate_ids(self, images, prompts=None, **kwargs) -> list[list[int]]:
        """New token ids per returned sequence (B * num_return_sequences lists, best first per
        image), cut after the first EOS (kept)."""
        self._require(self.can_generate, "generation")
        images, _ = _as_list(images)
        return self.generate_from_pixels(self.pixel_values(images), prompts, **kwargs)

    def generate_from_pixels(self, pixel_values: np.ndarray, prompts=None, **kwargs) -> list[list[int]]:
        """`generate_ids` for already preprocessed images, float32 [B, S, S, 3]."""
        self._require(self.can_generate, "generation")
        n = len(pixel_values)
        prompts = self._prompts(prompts, n)
        opts = self.options(**kwargs)
        seqs = [self._prompt_ids(p) for p in prompts]
        natural = max(len(s) for s in seqs)
        enc_dec = self.config.is_encoder_decoder
        self._check_length(natural, 0 if enc_dec else opts.max_new_tokens - 1, "the prompt")
        length = self._bucket(natural, None if enc_dec else self._max_prompt_tokens(opts.max_new_tokens - 1))
        ids, mask, counted = self._pad_prompts(seqs, natural, length)
        rows = batch_bucket(n)
        key = jax.random.key(int(kwargs.get("seed") or 0))
        start = int(self.generation_config.get("decoder_start_token_id",
                                               getattr(self.config.text, "decoder_start_token_id", 0)) or 0)
        with self._context():
            prompt = self._soft_prompts(self.params, _pad_rows(np.asarray(pixel_values, np.float32), rows))
            out = self._generate(self.params, prompt, _pad_rows(ids, rows), _pad_rows(mask, rows),
                                 _pad_rows(counted, rows), key, options=opts, decoder_start_token_id=start)
        out = np.asarray(out)[:n].reshape(n * opts.num_return_sequences, -1)
        return [_cut_at_eos(row, opts.eos_token_id) for row in out]

    def generate(self, images, prompts=None, **kwargs) -> list[str]:
        """Captions / answers (B * num_return_sequences strings)."""
        return self.decode(self.generate_ids(images, prompts, **kwargs))

    def decode(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(list(t), skip_special_tokens=True).strip() for t in token_ids]

    def _prompts(self, prompts, n: int) -> list[str | None]:
        if prompts is None or isinstance(prompts, str):
            return [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise InputError(f"{len(prompts)} prompts for {n} images")
        return prompts

    def _pad_prompts(self, seqs, natural: int, length: int):
        """-> ids, mask, counted [B, length]: OPT left-padded, T5 right-padded; `counted` marks
        the positions the reference's own batch padding (to `natural`) would have."""
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        b = len(seqs)
        ids = np.full((b, length), pad, np.int32)
        mask = np.zeros((b, length), np.int32)
        counted = np.zeros((b, length), np.int32)
        for i, s in enumerate(seqs):
            if self.config.is_encoder_decoder:
                ids[i, :len(s)], mask[i, :len(s)] = s, 1
            else:
                ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
                counted[i, length - natural:] = 1
        return ids, mask, counted

    # --- scoring ------------------------------------------------------------------------------
    def score(self, images, prompts, texts, *, return_num_tokens: bool = False):
        """Summed log-likelihood of each candidate text given image + prompt.

        texts: candidates shared by all images (list of str) or one list per image (equal
        lengths). Returns float32 [N, C] ([C] for a single image), and with
        `return_num_tokens` also the token counts (same shape)."""
        self._require(self.can_generate, "scoring")
        images, single = _as_list(images)
        n = len(images)
        prompts = self._prompts(prompts, n)
        if isinstance(texts, str):
            texts = [texts]
        per_image = [list(texts)] * n if all(isinstance(t, str) for t in texts) else [list(t) for t in texts]
        if len(per_image) != n or len({len(t) for t in per_image}) != 1 or not per_image[0]:
            raise InputError("texts must be one list of candidates, or one equally long list per image")
        c = len(per_image[0])
        rows = self._score_rows(prompts, per_image)
        pixels = self.pixel_values(images)
        with self._context():
            prompt = self._soft_prompts(self.params, _pad_rows(pixels, batch_bucket(n)))
            ll = self._log_likelihood(self.params, prompt, *rows)
        ll = np.asarray(ll)[:n * c].reshape(n, c)
        counts = np.asarray(rows[-2 if self.config.is_encoder_decoder else -1].sum(-1))[:n * c].reshape(n, c)
        if single:
            ll, counts = ll[0], counts[0]
        return (ll, counts) if return_num_tokens else ll

    def _score_rows(self, prompts, per_image):
        """Token arrays of every (image, candidate) row, padded to buckets (see log_likelihood)."""
        tok, enc_dec = self.tokenizer, self.config.is_encoder_decoder
        image_index, prompt_ids, text_ids = [], [], []
        for i, (p, cands) in enumerate(zip(prompts, per_image)):
            pids = self._prompt_ids(p)
            for t in cands:
                image_index.append(i)
                prompt_ids.append(pids)
                text_ids.append(list(tok(t, add_special_tokens=False)["input_ids"]))
        r = len(image_index)
        rows = batch_bucket(r)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        idx = _pad_rows(np.asarray(image_index, np.int32), rows)
        if enc_dec:
            for p in prompt_ids:
                self._check_length(len(p), 0, "the prompt")
            start = int(self.generation_config.get("decoder_start_token_id", self.config.text.decoder_start_token_id))
            enc_ids, enc_mask = _right_pad(prompt_ids, pad, self._bucket(max(map(len, prompt_ids))))
            dec_len = self._bucket(max(map(len, text_ids)))
            dec_in, _ = _right_pad([[start] + t[:-1] for t in text_ids], pad, dec_len)
            targets, target_mask = _right_pad(text_ids, pad, dec_len)
            arrays = (enc_ids, enc_mask, targets, target_mask, dec_in)
        else:
            full = [p + t for p, t in zip(prompt_ids, text_ids)]
            longest = max(map(len, full))
            self._check_length(longest, 0, "prompt + text")
            ids, mask = _right_pad(full, pad, self._bucket(longest, self._max_prompt_tokens(0)))
            target_mask = np.zeros_like(mask)
            for j, (p, t) in enumerate(zip(prompt_ids, text_ids)):
                target_mask[j, len(p):len(p) + len(t)] = 1
            arrays = (ids, mask, ids, target_mask)
        return (idx,) + tuple(_pad_rows(a, rows) for a in arrays)

    # --- retrieval (stage-1 / ITM checkpoints) ------------------------------------------------
    def _qformer_text(self, texts: Sequence[str]):
        seqs = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        longest = max(map(len, seqs))
        limit = self.config.qformer.max_position_embeddings
        if longest > limit:
            raise InputError(f"a text is {longest} tokens; the Q-Former allows at most {limit}")
        pad = int(self.tokenizer.pad_token_id or 0)
        return _right_pad(seqs, pad, self._bucket(longest, limit))

    def image_features(self, images) -> dict[str, np.ndarray]:
        """Per image: "image_embeds" (ViT output after ln_vision) [B, N, Dv], "query_output"
        [B, Q, Dq], and "projected" [B, Q, D_llm] (LLM checkpoints) or "image_feats" (the
        normalised ITC projections [B, Q, E], retrieval checkpoints)."""
        images, _ = _as_list(images)
        out = []
        bs = batch_bucket(min(len(images), 32))
        for s in range(0, len(images), bs):
            chunk = images[s:s + bs]
            with self._context():
                feats = self._image_side(self.params, _pad_rows(self.pixel_values(chunk), bs))
            out.append({k: np.asarray(v)[:len(chunk)] for k, v in feats.items()})
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    features = image_features

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised ITC text embeddings [Nt, E] (retrieval checkpoints)."""
        self._require(self.can_match, "text features")
        ids, mask = self._qformer_text(list(texts))
        rows = batch_bucket(len(texts))
        with self._context():
            out = self._text_side(self.params, _pad_rows(ids, rows), _pad_rows(mask, rows))
        return np.asarray(out)[:len(texts)]

    def _itm_match_logits(self, image_embeds: np.ndarray, ids, mask, pairs: np.ndarray) -> np.ndarray:
        """ITM logits [P, 2] of (image row, text row) pairs [P, 2], in fixed-size calls."""
        chunk = batch_bucket(min(len(pairs), ITM_PAIRS_PER_CALL))
        out = []
        for s in range(0, len(pairs), chunk):
            p = _pad_rows(pairs[s:s + chunk], chunk)
            with self._context():
                out.append(np.asarray(self._itm(self.params, image_embeds[p[:, 0]], ids[p[:, 1]], mask[p[:, 1]])))
        return np.concatenate(out)[:len(pairs)]

    def match(self, images, texts) -> dict[str, np.ndarray]:
        """ITM match probability and ITC similarity of every (image, text) pair: [Ni, Nt]
        (scalars for one image and one text string)."""
        self._require(self.can_match, "image-text matching")
        images, single_image = _as_list(images)
        single_text = isinstance(texts, str)
        texts = [texts] if single_text else list(texts)
        feats = self.image_features(images)
        ids, mask = self._qformer_text(texts)
        itc = np.einsum("iqe,te->itq", feats["image_feats"], self.text_features(texts)).max(-1)
        pairs = np.stack(np.meshgrid(np.arange(len(images)), np.arange(len(texts)), indexing="ij"), -1).reshape(-1, 2)
        logits = self._itm_match_logits(feats["image_embeds"], ids, mask, pairs)
        prob = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))[:, 1].reshape(len(images), len(texts))
        out = {"itm_probability": prob, "itc_similarity": itc.astype(np.float32)}
        if single_image and single_text:
            out = {k: float(v[0, 0]) for k, v in out.items()}
        return out

    def rank(self, images, texts, *, k: int = 128, direction: str = "text_to_image") -> np.ndarray:
        """The paper's retrieval scores: ITC similarity for every pair, then the top-k candidates
        of each query re-scored as ITM match logit + ITC (others -inf). -> [queries, candidates]
        (texts x images for "text_to_image", images x texts for "image_to_text")."""
        self._require(self.can_match, "retrieval")
        if direction not in ("text_to_image", "image_to_text"):
            raise ValueError(f"direction must be 'text_to_image' or 'image_to_text', got {direction!r}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        images, _ = _as_list(images)
        texts = list(texts)
        feats = self.image_features(images)
        ids, mask = self._qformer_text(texts)
        sim = np.einsum("iqe,te->itq", feats["image_feats"], self.text_features(texts)).max(-1)
        t2i = direction == "text_to_image"

        def itm(rows, cands):
            q = np.repeat(rows, cands.shape[1])
            pairs = np.stack([cands.reshape(-1), q] if t2i else [q, cands.reshape(-1)], -1)
            return self._itm_match_logits(feats["image_embeds"], ids, mask, pairs)[:, 1].reshape(cands.shape)

        return rerank_topk(sim.T if t2i else sim, itm, k, fill_value=-np.inf, rows_per_call=ITM_PAIRS_PER_CALL)

    def retrieve(self, images, queries: Sequence[str], *, k: int = 128, top: int = 5) -> list[list[tuple[int, float]]]:
        """For each text query, the `top` best images as (index, score), best first."""
        scores = self.rank(images, queries, k=k)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        return [[(int(j), float(scores[q, j])) for j in row if np.isfinite(scores[q, j])]
                for q, row in enumerate(order)]


# ----------------------------------------------------------------------------------------------
# Jitted pieces (pure functions of the params)
# ----------------------------------------------------------------------------------------------
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


def _right_pad(seqs, pad: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), length), pad, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def _cut_at_eos(row: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    row = [int(t) for t in row]
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row

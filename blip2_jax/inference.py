"""BLIP-2 for people: `blip2_jax.load(dir)` and images as PIL images, paths or arrays.

    model = blip2_jax.load("dir")                    # dtype="bfloat16", mesh=... optional
    model.generate(images, prompts=None, num_beams=5, max_new_tokens=30) -> list[str]
    model.score(images, prompts, texts)  -> np.ndarray [N, C] summed log-likelihoods
    model.match(images, texts)           -> {"itm_probability", "itc_similarity"} [Ni, Nt]
    model.retrieve(images, queries, k=128, top=5)  (text -> image: ITC top-k, ITM re-rank)

A thin layer over `serving.Predictor` (`model.predictor`), which owns the compiled programs,
the tokenizers and the padding; this file only turns images into pixels and shapes the answers.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from blip2_jax import cache, serving
from blip2_jax.evaluators.metrics.retrieval import rerank_topk
from blip2_jax.preprocess import ImageProcessor, InputError


def load(directory: str, *, dtype: Any = "float32", mesh=None, length_bucket: int = 8,
         scan_layers: bool | None = None, revision: str | None = None,
         quantize: str | None = None) -> Blip2Inference:
    """A transformers-format BLIP-2 directory or Hugging Face Hub id ("Salesforce/blip2-opt-2.7b",
    from huggingface_hub's cache or downloaded; `revision`: a branch, tag or commit) ->
    Blip2Inference. `dtype` is the compute/storage dtype of the frozen towers' matrices
    ("float32" or "bfloat16"); the Q-Former, layer norms and biases stay float32 whatever the
    files store. `scan_layers`: see `serving.default_scan_layers` (None = that default).
    `quantize`: "int8" (or "int4") stores the frozen towers' matrices quantized, with one scale
    per output channel (`blip2_jax/quant.py`); None keeps what the checkpoint holds.
    `mesh`: a `sharding.make_mesh` mesh, None (one device), or "cores": on a CPU host, one device
    per core with decoding's products split over them (`blip2_jax/cores.py`)."""
    from blip2_jax import cores
    from blip2_jax.weights import hf, hub

    if isinstance(mesh, str):
        if mesh != "cores":
            raise ValueError(f"mesh: a device mesh, None or 'cores', got {mesh!r}")
        mesh = cores.mesh()
    cache.enable()
    directory = hub.resolve(os.fspath(directory), revision=revision)
    predictor = serving.Predictor.from_dir(directory, dtype=dtype, mesh=mesh, length_bucket=length_bucket,
                                           scan_layers=scan_layers, quantize=quantize)
    processor = ImageProcessor.from_dir(directory, default_size=predictor.config.vision.image_size)
    architecture = (hf.read_config(directory)[1].get("architectures") or [""])[0]
    return Blip2Inference(predictor, processor, directory=directory, architecture=architecture)


def jax_leaves(tree) -> list:
    """Leaves of a params tree, quantized kernels (qwix.QArray) kept whole."""
    import jax
    from blip2_jax import quant
    return jax.tree.leaves(tree, is_leaf=quant.is_quantized)


def _as_list(images) -> tuple[list, bool]:
    """-> (list of images, whether a single image was given)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given")
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    return [images], True


class Blip2Inference:
    """A loaded BLIP-2: a `serving.Predictor` plus the checkpoint's image processor."""

    def __init__(self, predictor: serving.Predictor, image_processor: ImageProcessor, *, directory: str = "",
                 architecture: str = ""):
        self.predictor, self.image_processor = predictor, image_processor
        self.directory, self.architecture = directory, architecture

    # the predictor's parts, for convenience
    model = property(lambda self: self.predictor.model)
    params = property(lambda self: self.predictor.params)
    config = property(lambda self: self.predictor.config)
    mesh = property(lambda self: self.predictor.mesh)
    tokenizer = property(lambda self: self.predictor.tokenizer if self.predictor.can_generate
                         else self.predictor.qformer_tokenizer)
    generation_config = property(lambda self: self.predictor.generation_config)
    can_generate = property(lambda self: self.predictor.can_generate)
    can_match = property(lambda self: self.predictor.can_match)

    def _require(self, ok: bool, what: str):
        self.predictor.require(ok, what, self.directory or "the model")

    def pixel_values(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images / paths / arrays -> float32 [B, S, S, 3] as the checkpoint's processor does."""
        return self.image_processor(images)

    def options(self, **kwargs):
        """Generation options: explicit kwargs > generation_config.json > transformers defaults."""
        return self.predictor.options(**kwargs)

    # --- generation ---------------------------------------------------------------------------
    def generate_ids(self, images, prompts=None, **kwargs) -> list[list[int]]:
        """New token ids per returned sequence (B * num_return_sequences lists, best first per
        image), cut after the first EOS (kept). kwargs: generation options and `seed`."""
        self._require(self.can_generate, "generation")
        images, _ = _as_list(images)
        return self.generate_from_pixels(self.pixel_values(images), prompts, **kwargs)

    def generate_from_pixels(self, pixel_values: np.ndarray, prompts=None, **kwargs) -> list[list[int]]:
        """`generate_ids` for already preprocessed images, float32 [B, S, S, 3]."""
        self._require(self.can_generate, "generation")
        seed = int(kwargs.pop("seed", None) or 0)
        return self.predictor.generate_ids(pixel_values, prompts, seed=seed, **kwargs)

    def generate(self, images, prompts=None, **kwargs) -> list[str]:
        """Captions / answers (B * num_return_sequences strings)."""
        return self.decode(self.generate_ids(images, prompts, **kwargs))

    def decode(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        return self.predictor.decode(token_ids)

    def save_quantized(self, directory: str) -> None:
        """Writes this model, loaded with `quantize=`, as a quantized checkpoint (format:
        `weights/quantized.py`) with the source's tokenizer and processor files."""
        from blip2_jax import quant
        from blip2_jax.weights import hf
        leaves = [x for x in jax_leaves(self.params) if quant.is_quantized(x)]
        if not leaves:
            raise ValueError("the model is not quantized: load it with quantize='int8' (or 'int4') first")
        mode = quant.mode_of_qtype(leaves[0].qtype)
        raw = hf.read_config(self.directory)[1] if self.directory else None
        hf.save_quantized(directory, self.config, self.params, mode, raw_config=raw,
                          side_files_from=self.directory or None)

    # --- scoring ------------------------------------------------------------------------------
    def score(self, images, prompts, texts, *, return_num_tokens: bool = False):
        """Summed log-likelihood of each candidate text given image + prompt.

        texts: candidates shared by all images (list of str) or one list per image (equal
        lengths). Returns float32 [N, C] ([C] for a single image), and with
        `return_num_tokens` also the token counts (same shape)."""
        self._require(self.can_generate, "scoring")
        images, single = _as_list(images)
        n = len(images)
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * n
        if len(prompts) != n:
            raise InputError(f"{len(prompts)} prompts for {n} images")
        if isinstance(texts, str):
            texts = [texts]
        per_image = [list(texts)] * n if all(isinstance(t, str) for t in texts) else [list(t) for t in texts]
        if len(per_image) != n or len({len(t) for t in per_image}) != 1 or not per_image[0]:
            raise InputError("texts must be one list of candidates, or one equally long list per image")
        ll, counts = self.predictor.log_likelihood(self.pixel_values(images), list(prompts), per_image)
        if single:
            ll, counts = ll[0], counts[0]
        return (ll, counts) if return_num_tokens else ll

    # --- retrieval (stage-1 / ITM checkpoints) ------------------------------------------------
    def image_features(self, images) -> dict[str, np.ndarray]:
        """See `serving.Predictor.image_features`."""
        images, _ = _as_list(images)
        out = []
        for s in range(0, len(images), serving.IMAGE_ROWS_PER_CALL):  # decode a chunk at a time
            out.append(self.predictor.image_features(self.pixel_values(images[s:s + serving.IMAGE_ROWS_PER_CALL])))
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    features = image_features

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised ITC text embeddings [Nt, E] (retrieval checkpoints)."""
        self._require(self.can_match, "text features")
        return self.predictor.text_features(*self.predictor.qformer_tokens(list(texts)))

    def match(self, images, texts) -> dict[str, np.ndarray]:
        """ITM match probability and ITC similarity of every (image, text) pair: [Ni, Nt]
        (scalars for one image and one text string)."""
        self._require(self.can_match, "image-text matching")
        images, single_image = _as_list(images)
        single_text = isinstance(texts, str)
        texts = [texts] if single_text else list(texts)
        feats = self.image_features(images)
        ids, mask = self.predictor.qformer_tokens(texts)
        itc = serving.itc_similarity(feats["image_feats"], self.predictor.text_features(ids, mask))
        pairs = np.stack(np.meshgrid(np.arange(len(images)), np.arange(len(texts)), indexing="ij"), -1).reshape(-1, 2)
        logits = self.predictor.itm_pair_logits(feats["image_embeds"], ids, mask, pairs).astype(np.float64)
        prob = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))  # softmax(logits)[:, 1]
        out = {"itm_probability": prob.astype(np.float32).reshape(len(images), len(texts)), "itc_similarity": itc}
        if single_image and single_text:
            out = {k: float(v[0, 0]) for k, v in out.items()}
        return out

    def rank(self, images, texts, *, k: int = 128, direction: str = "text_to_image",
             features: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The paper's retrieval scores: ITC similarity for every pair, then the top-k candidates
        of each query re-scored as ITM match logit + ITC (others -inf). -> [queries, candidates]
        (texts x images for "text_to_image", images x texts for "image_to_text").
        `features`: `image_features(images)` computed before (a gallery searched many times)."""
        self._require(self.can_match, "retrieval")
        if direction not in ("text_to_image", "image_to_text"):
            raise ValueError(f"direction must be 'text_to_image' or 'image_to_text', got {direction!r}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        images, _ = _as_list(images)
        feats = self.image_features(images) if features is None else features
        ids, mask = self.predictor.qformer_tokens(list(texts))
        sim = serving.itc_similarity(feats["image_feats"], self.predictor.text_features(ids, mask))
        t2i = direction == "text_to_image"

        def itm(rows, cands):
            q = np.repeat(rows, cands.shape[1])
            pairs = np.stack([cands.reshape(-1), q] if t2i else [q, cands.reshape(-1)], -1)
            return self.predictor.itm_pair_logits(feats["image_embeds"], ids, mask, pairs)[:, 1].reshape(cands.shape)

        return rerank_topk(sim.T if t2i else sim, itm, k, fill_value=-np.inf,
                           rows_per_call=serving.ITM_PAIRS_PER_CALL)

    def retrieve(self, images, queries: Sequence[str], *, k: int = 128, top: int = 5,
                 features: dict[str, np.ndarray] | None = None) -> list[list[tuple[int, float]]]:
        """For each text query, the `top` best images as (index, score), best first."""
        scores = self.rank(images, queries, k=k, features=features)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        return [[(int(j), float(scores[q, j])) for j in row if np.isfinite(scores[q, j])]
                for q, row in enumerate(order)]

"""CapFilt (paper §3.4): bootstrap web captions with a captioner, keep the best by ITC similarity.

For each image of an input dataset: `num_captions` (K, default 10) captions from a captioner
checkpoint by nucleus sampling (top-p 0.9), through `serving.Predictor.generate`; the K captions
and the image's web captions are scored by ITC similarity (max over the queries of the cosine
of the image's and the text's ITC features) with a retrieval checkpoint (a stage-1 workdir or a
released ITM model); the `keep` best (N, default 2) are kept. The output is the `capfilt_pairs`
dataset (builders/capfilt.py, written by `capfilt_output.py`); training samples one kept caption
per image per step (`pipeline.pick_caption`).

    step = CapfiltStep(captioner, scorer, Options())      # two serving.Predictors
    rows = step(captioner_pixels, scorer_pixels, web_captions, seed)

Two engines run the same step over the same batches: a Beam pipeline (`capfilt_beam.py`,
RunInference) and a plain JAX job over this process's shards (`run_shards`, with the
annotation tool's shards, decoding pool and per-process split). A batch is `batch_size`
consecutive usable images of one input shard and its sampling seed comes from (seed, shard,
batch number), so both engines, any worker count and a resumed run write the same captions.
Every call has the same shapes (rows padded to `batch_size`, texts to a fixed count and length):
each worker compiles the generation, image and text programs once.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np

from blip2_jax import annotation, serving
from blip2_jax.data import text as text_lib
from blip2_jax.preprocess import ImageProcessor, InputError

WEB, SYNTHETIC = "web", "synthetic"


@dataclasses.dataclass(frozen=True)
class Options:
    """CapFilt's settings (the paper's: K = 10 captions by nucleus sampling, top 2 kept)."""
    num_captions: int = 10        # K synthetic captions per image
    keep: int = 2                 # N captions kept (web or synthetic)
    top_p: float = 0.9            # nucleus sampling
    top_k: int = 0                # 0: no top-k cut (nucleus alone)
    temperature: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    prompt: str | None = None     # text the captions continue (None: none)
    max_text_len: int = 32        # Q-Former tokens when scoring (the pre-training text length)
    max_words: int = 50           # BLIP's caption normalisation before scoring
    batch_size: int = 16          # images per step
    seed: int = 0

    def validate(self) -> Options:
        for name in ("num_captions", "keep", "max_new_tokens", "max_text_len", "max_words", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    def generation(self) -> dict:
        return dict(do_sample=True, top_p=self.top_p, top_k=self.top_k, temperature=self.temperature,
                    num_return_sequences=self.num_captions, max_new_tokens=self.max_new_tokens,
                    min_new_tokens=self.min_new_tokens)


def batch_seed(seed: int, shard: int, batch: int) -> int:
    """The sampling seed of batch `batch` of input shard `shard` (independent of the engine)."""
    return int(np.random.SeedSequence([seed, shard, batch]).generate_state(1)[0])


# ------------------------------------------------------------------------------ the step
class CapfiltStep:
    """One batch of images -> per image its kept captions, their scores and sources."""

    def __init__(self, captioner: serving.Predictor, scorer: serving.Predictor, options: Options):
        captioner.require(captioner.can_generate, "CapFilt's captioner")
        scorer.require(scorer.can_match, "CapFilt's scorer (ITC)")
        self.captioner, self.scorer, self.options = captioner, scorer, options.validate()
        captioner.options(**options.generation())  # an invalid option fails before any image
        rows = options.batch_size
        self.rows = serving.batch_bucket(rows, max(captioner.row_multiple, scorer.row_multiple))
        # texts scored per call: K synthetic + a few web captions per image, one fixed shape
        self.text_rows = serving.batch_bucket(self.rows * (options.num_captions + 2), scorer.row_multiple)

    def __call__(self, captioner_pixels: np.ndarray, scorer_pixels: np.ndarray,
                 web_captions: Sequence[Sequence[str]], seed: int) -> list[dict]:
        """[B, S, S, 3] pixels for each model, B lists of web captions -> B dicts: captions,
        caption_scores, caption_sources (kept, best first), web_caption_scores."""
        n, o = len(captioner_pixels), self.options
        if n == 0:
            return []
        if n > self.rows:
            raise ValueError(f"{n} images in a batch of {self.rows}")
        texts = self.captioner.generate(serving.pad_rows(captioner_pixels, self.rows), o.prompt,
                                        seed=seed, **o.generation())
        synthetic = [texts[i * o.num_captions:(i + 1) * o.num_captions] for i in range(n)]
        feats = self.scorer.image_features(serving.pad_rows(scorer_pixels, self.rows))["image_feats"][:n]
        pools = [candidates(web, syn, o.max_words) for web, syn in zip(web_captions, synthetic)]
        flat = [norm for pool in pools for _, _, norm in pool]
        text_feats = self._text_features(flat) if flat else np.zeros((0, feats.shape[-1]), np.float32)
        out, at = [], 0
        for i, pool in enumerate(pools):
            sims = (np.asarray(feats[i], np.float32) @ text_feats[at:at + len(pool)].T).max(0) if pool else []
            at += len(pool)
            out.append(select(pool, [float(s) for s in sims], web_captions[i], o.keep, o.max_words))
        return out

    def _text_features(self, texts: list[str]) -> np.ndarray:
        """Normalised ITC text features [T, E], in calls of `text_rows` texts of `max_text_len`."""
        ids, mask = self.scorer.qformer_tokens(texts, self.options.max_text_len)
        out = []
        for s in range(0, len(ids), self.text_rows):
            chunk = slice(s, s + self.text_rows)
            feats = self.scorer.text_features(serving.pad_rows(ids[chunk], self.text_rows),
                                              serving.pad_rows(mask[chunk], self.text_rows))
            out.append(feats[:len(ids[chunk])])
        return np.concatenate(out).astype(np.float32)


def candidates(web: Sequence[str], synthetic: Sequence[str], max_words: int) -> list[tuple[str, str, str]]:
    """(caption, source, normalised text) to score: the web captions, then the synthetic ones;
    captions empty after normalisation, and repeats of an earlier one, are left out."""
    pool, seen = [], set()
    for source, texts in ((WEB, web), (SYNTHETIC, synthetic)):
        for t in texts:
            norm = text_lib.normalize_caption(t, max_words)
            if norm and norm not in seen:
                seen.add(norm)
                pool.append((t.strip(), source, norm))
    return pool


def select(pool, scores: list[float], web: Sequence[str], keep: int, max_words: int = 50) -> dict:
    """The `keep` best of the pool (ties: the earlier, i.e. web first), and the web scores."""
    order = sorted(range(len(pool)), key=lambda j: (-scores[j], j))[:keep]
    by_norm = {norm: s for (_, _, norm), s in zip(pool, scores)}
    return {"captions": [pool[j][0] for j in order], "caption_scores": [scores[j] for j in order],
            "caption_sources": [pool[j][1] for j in order],
            "web_caption_scores": [by_norm.get(text_lib.normalize_caption(w, max_words), float("nan"))
                                   for w in web]}


# ------------------------------------------------------------------------------ models
def is_workdir(path: str) -> bool:
    """Whether `path` is a training run (config.json + checkpoints/), not a model directory."""
    return os.path.isdir(os.path.join(path, "checkpoints"))


def load_model(path: str, *, dtype: str = "float32", mesh=None) -> tuple[serving.Predictor, ImageProcessor]:
    """A transformers-format directory / Hub id, or a training workdir -> (Predictor, its
    image processor)."""
    if is_workdir(path):
        return serving.Predictor.from_workdir(path, mesh=mesh), image_processor(path)
    from blip2_jax.inference import load
    model = load(path, dtype=dtype, mesh=mesh)
    return model.predictor, model.image_processor


def image_processor(path: str) -> ImageProcessor:
    """The image processor of a model directory / Hub id, or the one a training run's input
    pipeline used (size, mean, std), without loading any weights."""
    if is_workdir(path):
        from blip2_jax import files
        cfg = files.read_json_object(os.path.join(path, "config.json"), InputError, "training config")
        inp = cfg.get("input") or {}
        d = ImageProcessor()
        return ImageProcessor(size=int(inp.get("image_size", d.size)), image_mean=tuple(inp.get("mean", d.image_mean)),
                              image_std=tuple(inp.get("std", d.image_std)))
    from blip2_jax.weights import hf, hub
    directory = hub.resolve(path)
    cfg, _ = hf.read_config(directory)
    return ImageProcessor.from_dir(directory, default_size=cfg.vision.image_size)


class TwoViews:
    """Preprocesses an image for both models at once (one array, so the annotation tool's
    decoding pool can stack it); `split` gives the two [B, S, S, 3] batches back."""

    def __init__(self, captioner: ImageProcessor, scorer: ImageProcessor):
        self.captioner, self.scorer, self.same = captioner, scorer, captioner == scorer

    def __call__(self, image) -> np.ndarray:
        a = self.captioner.one(image)
        return a if self.same else np.concatenate([a.ravel(), self.scorer.one(image).ravel()])

    def split(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.same:
            return pixels, pixels
        s1, s2 = self.captioner.size, self.scorer.size
        n = len(pixels)
        return (pixels[:, :s1 * s1 * 3].reshape(n, s1, s1, 3), pixels[:, s1 * s1 * 3:].reshape(n, s2, s2, 3))


# ------------------------------------------------------------------------------ the input
class InputShards:
    """A prepared TFDS split ("name[/config][:version]:split") as annotation `Shard`s of
    `shard_size` consecutive records. Reading a shard yields (record index, image bytes) to the
    decoding pool and keeps the record's other fields for `take(index)`."""

    def __init__(self, spec: str, data_dir: str | None, shard_size: int):
        import tensorflow_datasets as tfds

        from blip2_jax.data import builders  # noqa: F401  registers the project's builders
        name, _, split = spec.rpartition(":")
        if not name or not split:
            raise InputError(f"--input takes NAME:SPLIT (a prepared TFDS dataset), got {spec!r}")
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                           decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:  # noqa: BLE001  tfds raises many types for a missing dataset
            raise InputError(f"cannot open TFDS {spec} (data_dir {data_dir}): {' '.join(str(e).split())[:300]}") from None
        n = len(self.source)
        if n == 0:
            raise InputError(f"{spec} has no records")
        self.spec, self.size = spec, n
        self.shards = [annotation.Shard(i, functools.partial(self._read, lo, min(lo + shard_size, n)),
                                        min(shard_size, n - lo)) for i, lo in enumerate(range(0, n, shard_size))]
        self._pending: dict[str, dict] = {}

    def _read(self, lo: int, hi: int):
        for i in range(lo, hi):
            rec = self.source[i]
            self._pending[str(i)] = {
                "image": bytes(rec["image"]), "image_id": int(np.asarray(rec.get("image_id", i))),
                "file_name": text_lib.as_text(rec.get("file_name", b"")),
                "web_captions": [text_lib.as_text(c) for c in rec.get("captions", [])]}
            yield str(i), self._pending[str(i)]["image"]

    def take(self, rid: str) -> dict:
        return self._pending.pop(rid)


def shard_batches(inputs: InputShards, shards: Sequence[annotation.Shard], views: TwoViews, options: Options, *,
                  workers: int = 8, max_pixels: int = annotation.MAX_IMAGE_PIXELS):
    """The CapFilt batches of `shards`, in order: dicts with shard, batch (its number in the
    shard), seed, last, ids, records, captioner/scorer pixels and skipped [(id, reason)]."""
    numbers: dict[int, int] = {}
    for b in annotation.decoded_batches(shards, views, options.batch_size, workers=workers, max_pixels=max_pixels):
        s = b.shard.index
        k = numbers[s] = numbers.get(s, -1) + 1
        for rid, _ in b.skipped:
            inputs.take(rid)
        cap, score = views.split(b.pixels) if b.ids else (None, None)
        yield {"shard": s, "batch": k, "seed": batch_seed(options.seed, s, k), "last": b.last, "ids": b.ids,
               "records": [inputs.take(i) for i in b.ids], "captioner_pixels": cap, "scorer_pixels": score,
               "skipped": list(b.skipped)}


def run_batch(step: CapfiltStep, batch: dict) -> tuple[list[dict], list[tuple[str, str]]]:
    """A batch -> (output records, skipped [(id, reason)]): records with no caption to keep
    (every candidate empty) are skipped as "empty_caption"."""
    if not batch["ids"]:
        return [], list(batch["skipped"])
    recs = batch["records"]
    rows = step(batch["captioner_pixels"], batch["scorer_pixels"], [r["web_captions"] for r in recs],
                batch["seed"])
    out, skipped = [], list(batch["skipped"])
    for rid, rec, row in zip(batch["ids"], recs, rows):
        if not row["captions"]:
            skipped.append((rid, "empty_caption"))
            continue
        out.append({**{k: rec[k] for k in ("image", "image_id", "file_name", "web_captions")}, **row,
                    "_index": int(rid)})
    return out, skipped


# ------------------------------------------------------------------------------ the JAX job
def run_shards(inputs: InputShards, step: CapfiltStep, views: TwoViews, output, *, process_index: int = 0,
               process_count: int = 1, workers: int = 8, max_pixels: int = annotation.MAX_IMAGE_PIXELS,
               progress: bool = True) -> annotation.Summary:
    """CapFilt over this process's unfinished shards (shard i goes to process i mod count); each
    shard's output is committed whole (`output.write_shard`), so a killed run resumes."""
    import time

    from tqdm import tqdm

    t0, summary = time.perf_counter(), annotation.Summary()
    mine = annotation.my_shards(inputs.shards, process_index, process_count)
    done = output.done_shards()
    todo = [s for s in mine if s.index not in done]
    summary.already_done = len(mine) - len(todo)
    bar = tqdm(total=sum(s.size for s in todo), unit="img", disable=not progress,
               desc=f"capfilt[{process_index}]" if process_count > 1 else "capfilt",
               mininterval=1.0 if os.isatty(2) else 30.0)
    rows, skipped = [], []
    for batch in shard_batches(inputs, todo, views, step.options, workers=workers, max_pixels=max_pixels):
        r, s = run_batch(step, batch)
        rows += r
        skipped += s
        bar.update(len(batch["ids"]) + len(batch["skipped"]))
        if batch["last"]:
            output.write_shard(batch["shard"], rows, skipped, process=process_index)
            summary.images += len(rows)
            summary.shards += 1
            summary.skipped.update(reason for _, reason in skipped)
            rows, skipped = [], []
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


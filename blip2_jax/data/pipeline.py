"""The grain input pipeline, configured by `config.input` (see `default_input_config`).

    source (tfds.data_source over array_record, images left encoded)
      -> this host's shard ([process_index::process_count])
      -> train: seeded global shuffle, reshuffled each epoch; repeat(num_epochs)
      -> per example (random_map, seeded by index): decode (bad images -> skipped and counted),
         train: one of the image's captions per step (`pick_caption`: CapFilt's kept captions),
         train: RandomResizedCrop(scale 0.5-1, bicubic) + flip | eval: bicubic resize,
         CLIP normalisation, BLIP text normalisation, the named text processor
      -> train: batch in the worker processes, then mp_prefetch
         eval: mp_prefetch, then batch in this process, padded to the same number of batches
         on every host
      -> DataIterator (counts skipped/converted records: `.stats`; a grain DatasetIterator, so
         its state is saved and restored with orbax through `grain.checkpoint.CheckpointSave`
         / `CheckpointRestore`, and a resumed run sees exactly the batches it would have seen;
         resume with the same worker_count and process count: the state is per worker/host).

Local batch (numpy, leading axis = global batch_size / process_count):
  image                  float32 [B, H, W, 3]  NHWC, CLIP-normalised (image_dtype="uint8":
                         uint8 pixels, for `normalize_on_device`)
  image_id               int32   [B]
  mask                   bool    [B]           False on eval padding
  text processor fields  int32   [B, L]:
    qformer_caption      qformer_input_ids, qformer_attention_mask, qformer_dec_input_ids
                         (the same ids with [CLS] replaced by [DEC], for ITG)       [B, max_text_len]
    opt_caption/opt_vqa  llm_input_ids, llm_attention_mask, llm_labels (-100 on BOS, prompt,
                         padding; aligned with the inputs)                          [B, max_llm_len]
    t5_caption/t5_prefix_caption/t5_vqa
                         llm_input_ids, llm_attention_mask [B, max_llm_len] (encoder);
                         llm_decoder_input_ids, llm_decoder_attention_mask, llm_labels
                                                                         [B, max_target_len]
    opt_prompt/t5_prompt llm_input_ids, llm_attention_mask: the generation prompt (`prompt`),
                         left-padded for OPT, right-padded for the T5 encoder       [B, max_llm_len]
    opt_vqa_prompt/t5_vqa_prompt  the same with `vqa_prompt` filled with the question
    VQA processors add the question as qformer_* fields (the paper's VQA fine-tuning).
  eval only, host-side Python lists of length B (None on padding):
    texts (reference captions), question, answers, question_id, question_key
`make_global_batch(local_batch, mesh)` turns the arrays into global jax.Arrays split over the
mesh's ("data", "fsdp") axes and passes the host-side lists through.
"""
from __future__ import annotations

import math
import re
from typing import Any

import grain
import jax
from absl import flags
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from blip2_jax.data import text as text_lib
from blip2_jax.data import transforms
from blip2_jax.data.stats import STATS_KEY, DataStats, Skipped
from blip2_jax.data.tokenizers import load_tokenizer
from blip2_jax.sharding import batch_sharding

HOST_KEYS = ("texts", "question", "answers", "question_id", "question_key")


def default_input_config() -> ml_collections.ConfigDict:
    """`config.input`: every field the pipeline reads, with the paper's defaults."""
    c = ml_collections.ConfigDict()
    c.dataset = "synthetic_shapes"   # builder name, optionally "name/config" (builders/)
    c.split = "train"                # a TFDS split, e.g. "validation", "train[:1000]"
    c.data_dir = None                # TFDS data_dir (None: TFDS's default folder)
    c.manual_dir = None              # raw files of real corpora (see each builder's layout)
    c.prepare = True                 # build the dataset when it is not there yet
    c.cache_raw = False              # keep each record read in memory (small datasets: later
                                     # epochs skip reading and deserialising, `RawCache`)
    c.train = True                   # train: shuffle, repeat, augment, drop the remainder
    c.batch_size = 64                # global, split evenly over processes
    c.image_size = 224               # 224 pre-training; 364 captioning/retrieval; 490 VQA
    c.augment = True                 # train only: RandomResizedCrop + flip (else resize)
    c.crop_scale = (0.5, 1.0)        # RandomResizedCrop area range
    c.flip = True                    # random horizontal flip
    c.flip_swap_left_right = False   # swap "left"/"right" in texts of flipped images
    c.jpeg_draft = True              # train: JPEG decodes at reduced scale when big enough
    c.mean = transforms.CLIP_MEAN
    c.std = transforms.CLIP_STD
    c.image_dtype = "float32"        # "float32": normalised here; "uint8": raw pixels, 4x less
                                     # host->device traffic, normalise with `normalize_on_device`
    c.text_processor = "qformer_caption"  # text.PROCESSORS
    c.qformer_tokenizer = "bert-base-uncased-offline"  # or a transformers tokenizer dir
    c.llm_tokenizer = "gpt2-offline"  # or a transformers tokenizer dir (OPT / FlanT5)
    c.max_text_len = 32              # Q-Former text tokens (35 for retrieval evaluation)
    c.max_llm_len = 32               # LLM (encoder) tokens
    c.max_target_len = 32            # T5 decoder tokens
    c.max_words = 50                 # BLIP caption/question normalisation
    c.prompt = ""                    # e.g. "a photo of" for caption fine-tuning / evaluation
    c.vqa_prompt = "Question: {} Answer:"
    c.llm_eos_text = "\n"            # appended to OPT targets (BLIP-2 OPT's EOS)
    c.seed = 0
    c.shuffle = True
    c.num_epochs = None              # train: None repeats forever; eval: always one pass
    c.worker_count = 0               # grain worker processes (0: in this process)
    c.worker_buffer_size = 2         # batches buffered per worker
    c.read_threads = 4               # threads reading + processing examples per process
    c.read_buffer_size = 64          # examples buffered by those threads
    c.stats_log_every = 1000         # batches between stats log lines (new reasons: at once)
    c.max_consecutive_skips = 10000  # this many unusable records in a row: the data is broken
    return c


# ------------------------------------------------------------------ one example
def pick_caption(captions: list[str], rng: np.random.Generator) -> str:
    """The caption an image trains on at this step: one of its captions, uniformly (the paper's
    use of CapFilt's kept captions, `capfilt_pairs`). `rng` is the step's own generator (grain's
    random_map: seeded by `input.seed` and the example's position in the shuffled, repeated
    order), so the choice is a function of the seed and the step, and a resumed run repeats it."""
    return captions[int(rng.integers(len(captions)))]


def _swap_left_right(s: str) -> str:
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", s)


class ExampleProcessor:
    """record -> processed example dict, or `Skipped(reason)`. Picklable (runs in workers)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.train = bool(cfg.train)
        if cfg.text_processor not in text_lib.SPECS:
            raise ValueError(f"unknown text_processor {cfg.text_processor!r}; "
                             f"known: {sorted(text_lib.SPECS)}")
        self.needs, uses_qformer, uses_llm = text_lib.SPECS[cfg.text_processor]
        self.text = text_lib.TextProcessor(
            cfg.text_processor,
            qformer_tokenizer=(load_tokenizer(cfg.qformer_tokenizer, qformer=True)
                               if uses_qformer else None),
            llm_tokenizer=load_tokenizer(cfg.llm_tokenizer) if uses_llm else None,
            max_text_len=cfg.max_text_len, max_llm_len=cfg.max_llm_len,
            max_target_len=cfg.max_target_len, prompt=cfg.prompt, vqa_prompt=cfg.vqa_prompt,
            llm_eos_text=cfg.llm_eos_text)

    def image(self, data: bytes, rng) -> tuple[np.ndarray, bool, str | None]:
        cfg = self.cfg
        augment = self.train and cfg.augment
        draft = None
        if augment and cfg.jpeg_draft:
            draft = math.ceil(cfg.image_size / math.sqrt(cfg.crop_scale[0]))
        img, note = transforms.decode(data, draft_size=draft)
        if augment:
            img, flipped = transforms.train_image(img, cfg.image_size, rng,
                                                  scale=tuple(cfg.crop_scale), flip=cfg.flip)
        else:
            img, flipped = transforms.eval_image(img, cfg.image_size), False
        if cfg.image_dtype == "uint8":
            return np.asarray(img, np.uint8), flipped, note
        return transforms.normalize(img, cfg.mean, cfg.std), flipped, note

    def texts(self, rec: dict, rng) -> dict[str, str] | Skipped:
        """The texts one step trains on: a sampled caption, or a question and an answer."""
        mw = self.cfg.max_words
        if self.needs is None:
            return {}
        if self.needs == "caption":
            if "captions" not in rec:
                raise ValueError(f"text_processor {self.cfg.text_processor!r} needs captions; "
                                 f"{self.cfg.dataset} has fields {sorted(rec)}")
            caps = [text_lib.normalize_caption(text_lib.as_text(c), mw) for c in rec.get("captions", [])]
            caps = [c for c in caps if c]
            if not caps:
                return Skipped("empty_caption")
            return {"caption": pick_caption(caps, rng) if self.train else caps[0]}
        if "question" in rec:
            question = text_lib.as_text(rec["question"])
            answers = [text_lib.as_text(a).strip() for a in rec.get("answers", [])]
        elif "qa_questions" in rec:  # synthetic_shapes: several QA pairs per image
            n = len(rec["qa_questions"])
            i = int(rng.integers(n)) if self.train else int(rec["image_id"]) % max(n, 1)
            question = text_lib.as_text(rec["qa_questions"][i]) if n else ""
            answers = [text_lib.as_text(rec["qa_answers"][i])] if n else []
        else:
            raise ValueError(f"text_processor {self.cfg.text_processor!r} needs questions; "
                             f"{self.cfg.dataset} has fields {sorted(rec)}")
        question = text_lib.normalize_question(question, mw)
        if not question:
            return Skipped("empty_question")
        answers = [a for a in answers if a]
        if not answers and self.train:
            return Skipped("no_answer")
        if not answers:
            return {"question": question, "answer": ""}
        if self.train:  # sampled in proportion to how many annotators gave it
            answer = answers[int(rng.integers(len(answers)))]
        else:
            answer = max(answers, key=answers.count)
        return {"question": question, "answer": answer}

    def __call__(self, rec: dict[str, Any], rng: np.random.Generator):
        texts = self.texts(rec, rng)  # first: cheap, and no decoding for unusable texts
        if isinstance(texts, Skipped):
            return texts
        try:
            image, flipped, note = self.image(rec["image"], rng)
        except transforms.BadImage as e:
            return Skipped(e.reason)
        if flipped and self.cfg.flip_swap_left_right:
            texts = {k: _swap_left_right(v) for k, v in texts.items()}
        out = {"image": image, "image_id": np.int32(rec["image_id"]),
               **self.text(texts, rng)}
        if note:
            out[STATS_KEY] = note
        if not self.train:
            out["texts"] = [text_lib.as_text(c) for c in rec.get("captions", [])]
            out["question"] = text_lib.as_text(rec["question"]) if "question" in rec else texts.get(
                "question")
            out["answers"] = ([text_lib.as_text(a) for a in rec["answers"]] if "answers" in rec
                              else [texts["answer"]] if texts.get("answer") else [])
            out["question_id"] = int(rec.get("question_id", -1))
            # the id as the corpus writes it (GQA's have leading zeros), for submission files
            out["question_key"] = text_lib.as_text(rec["question_key"]) if "question_key" in rec else None
        return out


# ------------------------------------------------------------------ batching
def collate(items: list[dict], batch_size: int) -> dict[str, Any]:
    """Stacks arrays (padding with zeros up to batch_size) and lists the host-side fields."""
    n = len(items)
    batch = {}
    for key, first in items[0].items():
        if key == STATS_KEY:
            continue
        if key in HOST_KEYS:
            batch[key] = [it[key] for it in items] + [None] * (batch_size - n)
            continue
        arr = np.stack([it[key] for it in items])
        if n < batch_size:
            arr = np.concatenate([arr, np.zeros((batch_size - n,) + arr.shape[1:], arr.dtype)])
        batch[key] = arr
    batch["mask"] = np.arange(batch_size) < n
    return batch


class BatchIterDataset(grain.IterDataset):
    """Drops and counts `Skipped` records, batches the rest; `num_batches` pads to a count."""

    def __init__(self, parent, batch_size: int, drop_remainder: bool,
                 num_batches: int | None = None, max_consecutive_skips: int = 10000):
        super().__init__(parent)
        self.args = (batch_size, drop_remainder, num_batches, max_consecutive_skips)

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), *self.args)


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size, drop_remainder, num_batches, max_consecutive_skips):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.num_batches = (
            batch_size, drop_remainder, num_batches)
        self.max_consecutive_skips = max_consecutive_skips
        self.emitted = 0
        self.template = None  # an example to shape fully padded eval batches

    def __next__(self):
        if self.num_batches is not None and self.emitted >= self.num_batches:
            raise StopIteration
        counts: dict[str, int] = {}
        items = []
        streak = 0
        while len(items) < self.batch_size:
            try:
                el = next(self._parent)
            except StopIteration:
                break
            if isinstance(el, Skipped):
                counts[el.reason] = counts.get(el.reason, 0) + 1
                streak += 1
                if streak >= self.max_consecutive_skips:  # e.g. every file of a repeat broken
                    raise RuntimeError(f"{streak} unusable records in a row: {counts}")
                continue
            streak = 0
            if STATS_KEY in el:
                counts[el[STATS_KEY]] = counts.get(el[STATS_KEY], 0) + 1
            items.append(el)
        if len(items) < self.batch_size and (self.drop_remainder or (
                self.num_batches is None and not items)):
            raise StopIteration
        if not items:  # eval: this host ran out before the others; an all-padding batch
            if self.template is None:
                raise StopIteration
            batch = collate([self.template], self.batch_size)
            batch["mask"][:] = False
            batch = {k: ([None] * self.batch_size if k in HOST_KEYS else v)
                     for k, v in batch.items()}
        else:
            self.template = items[0]
            batch = collate(items, self.batch_size)
        batch[STATS_KEY] = counts
        self.emitted += 1
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "emitted": self.emitted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.emitted = state["emitted"]


class DataIterator(grain.DatasetIterator):
    """The iterator a trainer holds: local batches, with skip/convert counts in `.stats`.

    Its state (the whole pipeline's position plus the counts) is JSON, saved by orbax with
    `grain.checkpoint.CheckpointSave(iterator)` and restored with `CheckpointRestore`.
    """

    def __init__(self, parent, log_every: int = 1000):
        super().__init__(parent)
        self.stats = DataStats(log_every=log_every)

    def __next__(self):
        batch = next(self._parent)
        self.stats.add(batch.pop(STATS_KEY, {}))
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "stats": self.stats.as_dict()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.stats = DataStats(state.get("stats"), log_every=self.stats.log_every)


class _StatsIterDataset(grain.IterDataset):
    def __init__(self, parent, log_every: int):
        super().__init__(parent)
        self.log_every = log_every

    def __iter__(self):
        return DataIterator(self._parent.__iter__(), self.log_every)


# ------------------------------------------------------------------ the pipeline
def load_source(cfg: ml_collections.ConfigDict):
    """The random-access TFDS source of `cfg.dataset` / `cfg.split`, images as bytes."""
    from blip2_jax.data import builders  # registers the builders with TFDS

    builder = builders.get_builder(cfg.dataset, cfg.data_dir)
    if not builder.is_prepared():
        if not cfg.prepare:
            raise FileNotFoundError(f"{cfg.dataset} is not built under {builder.data_dir} "
                                    "(set input.prepare=True to build it)")
        builder = builders.prepare_dataset(cfg.dataset, cfg.data_dir, cfg.manual_dir)
    return builder.as_data_source(split=cfg.split,
                                  decoders={"image": tfds.decode.SkipDecoding()})


class RawCache:
    """A random-access source that keeps each record the first time it is read (big_vision's
    `cache_raw`): for datasets that fit in memory and are read for many epochs. Records are
    shared, not copied: the example processor only reads them."""

    def __init__(self, source):
        self.source = source
        self.records: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        rec = self.records.get(i)
        if rec is None:
            rec = self.records[i] = self.source[i]
        return rec

    def __repr__(self) -> str:
        return f"RawCache({self.source!r})"


def make_dataset(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
                 process_count: int | None = None, source=None) -> grain.IterDataset:
    """The grain dataset of this process's local batches (see the module docstring)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if cfg.batch_size % process_count:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the "
                         f"{process_count} processes")
    local_batch = cfg.batch_size // process_count
    source = load_source(cfg) if source is None else source
    if cfg.get("cache_raw", False):
        source = RawCache(source)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if cfg.train:
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(cfg.num_epochs)
    ds = ds.random_map(ExampleProcessor(cfg), seed=cfg.seed)
    read = grain.ReadOptions(num_threads=cfg.read_threads,
                             prefetch_buffer_size=cfg.read_buffer_size)
    it_ds = ds.to_iter_dataset(read)
    mp = grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                      per_worker_buffer_size=cfg.worker_buffer_size)
    if cfg.worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (defaults outside absl)
    if cfg.train:  # batch inside the workers: the main process only hands batches on
        it_ds = BatchIterDataset(it_ds, local_batch, drop_remainder=True,
                                 max_consecutive_skips=cfg.max_consecutive_skips)
        if cfg.worker_count:
            it_ds = it_ds.mp_prefetch(mp)
    else:  # same number of batches on every host, whatever its shard holds
        if cfg.worker_count:
            it_ds = it_ds.mp_prefetch(mp)
        per_host = math.ceil(len(source) / process_count)
        it_ds = BatchIterDataset(it_ds, local_batch, drop_remainder=False,
                                 num_batches=math.ceil(per_host / local_batch),
                                 max_consecutive_skips=cfg.max_consecutive_skips)
    return _StatsIterDataset(it_ds, cfg.stats_log_every)


def make_iterator(cfg: ml_collections.ConfigDict, **kwargs) -> DataIterator:
    """`iter(make_dataset(cfg, ...))`: a checkpointable iterator of local batches."""
    return iter(make_dataset(cfg, **kwargs))


def normalize_on_device(images: jax.Array, mean=transforms.CLIP_MEAN,
                        std=transforms.CLIP_STD, dtype=np.float32) -> jax.Array:
    """uint8 [..., 3] pixels -> (x / 255 - mean) / std in `dtype` (jit-able)."""
    import jax.numpy as jnp

    scale = jnp.asarray(std, jnp.float32) * 255.0
    x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32) * 255.0) / scale
    return x.astype(dtype)


def make_global_batch(local_batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Local numpy batch -> global jax.Arrays, leading axis over the mesh's (data, fsdp) axes.

    Works the same with one process and with many (each passes its own local batch). Host-side
    fields (lists) are passed through unchanged.
    """
    out = {}
    for key, value in local_batch.items():
        if isinstance(value, np.ndarray):
            out[key] = jax.make_array_from_process_local_data(
                batch_sharding(mesh, value.ndim), value)
        else:
            out[key] = value
    return out

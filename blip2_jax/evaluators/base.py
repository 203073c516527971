"""What every evaluator shares: its config (the paper's protocols as defaults), the eval input,
multi-host gathering, progress, result files, and the `Evaluator` base class.

Each evaluator (vqa.py, caption.py, retrieval.py; the table in registry.py) is built from one
ConfigDict (`base_config(kind)` holds every field), reads its dataset through the eval input
pipeline, asks a `serving.Predictor` for answers, captions or features, scores them with
`evaluators.metrics`, writes the predictions in the official submission format and yields
`(metric_name, value)`:

    ev = registry.EVALUATORS["vqa"](config, model=model, model_cfg=model_cfg, mesh=mesh)
    ev.run(trainable, frozen)     # the trainer: params in memory
    ev.evaluate(predictor)        # the CLI (`blip2_jax.evaluate`): a loaded model, or a fake
Every host reads its shard of the data; results are gathered so that each host scores all of
them and process 0 writes the files.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict


KINDS = ("vqa", "caption", "retrieval")


# ------------------------------------------------------------------------------------- config
def base_config(kind: str) -> ml_collections.ConfigDict:
    """Every field an evaluator of `kind` reads, with the paper's protocol as defaults."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluator type {kind!r}; known: {', '.join(KINDS)}")
    c = ml_collections.ConfigDict()
    c.type = kind
    c.every = 0                        # trainer: evaluate every N steps (0: never)
    c.name = ""                        # file-name stem; "" -> "<type>_<dataset>_<split>"
    c.output_dir = config_dict.placeholder(str)   # predictions + results JSON (None: not written)
    c.progress = True                  # progress bar with ETA on stderr (process 0)
    c.llm_tokenizer = config_dict.placeholder(str)   # None: the model directory's tokenizer
    c.qformer_tokenizer = config_dict.placeholder(str)  # None: the checkpoint's, else BERT's
    c.max_words = 50                   # BLIP question / caption normalisation
    c.mesh_shape = (-1, 1, 1)          # CLI: (data, fsdp, tensor); the trainer uses its own mesh
    c.dtype = "bfloat16"               # CLI --model: frozen towers' dtype (float32 | bfloat16)
    c.input = ml_collections.ConfigDict(dict(
        dataset="synthetic_shapes", split="validation",
        data_dir=config_dict.placeholder(str), manual_dir=config_dict.placeholder(str),
        prepare=True, batch_size=64, image_size=224,
        worker_count=0, read_threads=4))
    if kind in ("vqa", "caption"):
        c.max_prompt_len = 32          # LLM prompt tokens (LAVIS max_txt_len; longer: truncated)
        c.generation = ml_collections.ConfigDict(dict(
            num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0,
            repetition_penalty=1.0, early_stopping=False))
    if kind == "vqa":
        c.metric = "vqav2"
        c.vqa_protocol = "lavis"       # metrics.vqa: the official script's revision
        # Zero-shot VQA (paper §4.1; LAVIS): beam 5, at most 10 new tokens, at least 1; the
        # prompt and length penalty depend on the LLM unless set explicitly.
        c.prompt = config_dict.placeholder(str)
        c.prompt_by_llm = ml_collections.ConfigDict(dict(
            opt="Question: {} Answer:", t5="Question: {} Short answer:"))
        c.generation.max_new_tokens = 10
        c.generation.min_new_tokens = 1
        c.generation.length_penalty = config_dict.placeholder(float)
        c.length_penalty_by_llm = ml_collections.ConfigDict(dict(opt=0.0, t5=-1.0))
    elif kind == "caption":
        c.prompt = "a photo of"        # beam 5, max 30, min 8 new tokens (the defaults above)
        c.spice = config_dict.placeholder(bool)  # None: SPICE when available, else left out
    else:
        c.input.image_size = 364
        c.k = 128                      # candidates re-ranked by ITM per query
        c.max_text_len = 35            # Q-Former text tokens
        c.text_batch_size = 256        # texts per text-feature call
        c.itm_rows_per_call = 1        # queries per ITM call (x k pairs)
        c.image_bank_on_device = True  # keep all image embeddings on each device for ITM
        c.fill_value = -100.0          # score outside the top k (LAVIS)
    return c


def with_defaults(config) -> ml_collections.ConfigDict:
    """`config` (a ConfigDict or dict naming `type`, possibly partial) over `base_config(type)`;
    unknown fields are errors."""
    config = dict(config or {})
    kind = config.get("type")
    out = base_config(kind)

    def merge(dst, src, where):
        for key, value in src.items():
            if key not in dst:
                raise ValueError(f"unknown field {where}{key} for a {kind!r} evaluator")
            if isinstance(dst[key], ml_collections.ConfigDict) and hasattr(value, "items"):
                merge(dst[key], value, f"{where}{key}.")
            else:
                try:
                    dst[key] = value
                except TypeError as e:
                    raise ValueError(f"field {where}{key}: {e}") from None

    merge(out, config, "")
    return out


def input_config(ec: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The pipeline config of an evaluator: eval mode, no text processing (texts stay host-side)."""
    from blip2_jax.data import pipeline  # grain/tfds: imported only when data is read
    ic = pipeline.default_input_config()
    for key, value in ec.input.items():
        if key not in ic:
            raise ValueError(f"unknown input field {key!r} in the evaluator config")
        ic[key] = value
    ic.train, ic.augment, ic.shuffle = False, False, False
    ic.text_processor = "none"
    if ec.type == "vqa" and ic.dataset.startswith("synthetic_shapes"):
        # The pipeline picks a scene's question only for question-reading processors; their
        # token fields (offline tokenizers) go unused: the predictor tokenises the prompts.
        ic.text_processor = "opt_vqa_prompt"
    ic.max_words = ec.max_words
    return ic


# ------------------------------------------------------------------------------------- hosts
def gather_objects(local: list) -> list:
    """Concatenates every process's list, in process order (identity on one process)."""
    if jax.process_count() == 1:
        return list(local)
    from jax.experimental import multihost_utils
    data = np.frombuffer(pickle.dumps(local), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
    padded = np.zeros((int(np.max(sizes)),), np.uint8)
    padded[:data.size] = data
    blobs = multihost_utils.process_allgather(padded)
    out = []
    for blob, size in zip(blobs, np.asarray(sizes).reshape(-1)):
        out.extend(pickle.loads(blob[:int(size)].tobytes()))
    return out


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows (same shape on each), in process order."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def host_map(fn, n: int, batch: int, desc: str | None = None) -> np.ndarray:
    """Concatenated `fn(indices int [batch]) -> [batch, ...]` over indices 0..n-1.

    Each process takes one contiguous block of indices, called in equal-sized (padded) batches
    so that every process makes the same number of calls with the same shapes. `desc`: show a
    progress bar."""
    procs, me = jax.process_count(), jax.process_index()
    per = math.ceil(math.ceil(n / procs) / batch) * batch
    bar = Progress(per // batch, desc, enabled=desc is not None)
    outs = []
    for start in range(me * per, (me + 1) * per, batch):
        idx = np.arange(start, start + batch)
        outs.append(np.asarray(fn(np.where(idx < n, idx, 0))))
        bar.update()
    bar.close()
    return gather_rows(np.concatenate(outs))[:n]


# ------------------------------------------------------------------------------------- progress
class Progress:
    """Batches done / total, rate and ETA on stderr (tqdm when installed)."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.total, self.desc, self.done, self.t0 = total, desc, 0, time.time()
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        dt = time.time() - self.t0
        eta = "?" if not self.total else f"{dt / self.done * (self.total - self.done):.0f}s"
        print(f"\r{self.desc}: {self.done}/{self.total or '?'} batches, {dt:.0f}s, ETA {eta}",
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- base
class Evaluator:
    """Shared plumbing: data, predictor, files. Subclasses implement `evaluate(predictor)`."""

    def __init__(self, config, *, model=None, model_cfg=None, mesh=None, predictor=None,
                 llm_tokenizer: str | None = None, qformer_tokenizer: str | None = None):
        """config: see `base_config`; model / model_cfg / mesh: what `run` evaluates (the
        trainer's); predictor: use this one instead (the CLI, tests); llm_tokenizer /
        qformer_tokenizer: used where the config leaves them unset (the trainer passes its
        input pipeline's)."""
        self.config = with_defaults(config)
        self.model, self.model_cfg, self.mesh = model, model_cfg, mesh
        self.predictor = predictor
        self.tokenizers = (self.config.llm_tokenizer or llm_tokenizer,
                           self.config.qformer_tokenizer or qformer_tokenizer)
        self.results: dict[str, float] = {}

    # -- the trainer's entry point
    def run(self, trainable, frozen) -> Iterator[tuple[str, float]]:
        """Evaluates the model with params `trainable` + `frozen` (trees of jax.Arrays)."""
        from blip2_jax import serving, train_state
        params = train_state.merge_params(trainable, frozen)
        if self.predictor is None:
            if self.model is None:
                raise ValueError(f"evaluator {self.name!r} needs a model or a predictor")
            self.predictor = serving.Predictor(
                self.model, params, self.model_cfg, mesh=self.mesh,
                tokenizer=self.tokenizers[0], qformer_tokenizer=self.tokenizers[1])
        else:
            self.predictor.set_params(params)
        yield from self.evaluate(self.predictor)

    def evaluate(self, predictor) -> Iterator[tuple[str, float]]:
        raise NotImplementedError

    # -- data
    @property
    def name(self) -> str:
        if self.config.get("name"):
            return self.config.name
        stem = f"{self.config.type}_{self.config.input.dataset}_{self.config.input.split}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-")

    def batches(self) -> Iterator[dict[str, Any]]:
        """This host's eval batches (see data/pipeline.py), with a progress bar."""
        from blip2_jax.data import pipeline
        ic = input_config(self.config)
        source = pipeline.load_source(ic)
        local = ic.batch_size // jax.process_count()
        total = math.ceil(math.ceil(len(source) / jax.process_count()) / local)
        bar = Progress(total, f"{self.config.type} {self.name}", bool(self.config.progress))
        try:
            for batch in pipeline.make_iterator(ic, source=source):
                yield batch
                bar.update()
        finally:
            bar.close()

    # -- files
    def write(self, suffix: str, payload) -> str | None:
        out = self.config.get("output_dir")
        if not out:
            return None
        path = os.path.join(out, f"{self.name}_{suffix}.json")
        if jax.process_index() == 0:
            os.makedirs(out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(payload, f)
        return path

    def finish(self, scores: dict[str, float], count: int) -> Iterator[tuple[str, float]]:
        self.results = dict(scores)
        self.write("results", {"type": self.config.type, "dataset": self.config.input.dataset,
                               "split": self.config.input.split, "num_examples": count,
                               "metrics": self.results})
        for key, value in scores.items():
            yield key, float(value)

    def llm_option(self, value, field: str, table: str, predictor):
        """`value` (config.<field>) or, when unset, `config.<table>[predictor.llm_kind]`."""
        if value is None:
            kind = getattr(predictor, "llm_kind", None)
            if kind not in self.config[table]:
                raise ValueError(f"set {field}: {table} has no entry for language model {kind!r}")
            value = self.config[table][kind]
        return value


def valid_rows(batch) -> list[int]:
    """Indices of a batch's real examples (the pipeline pads the last batch)."""
    return [i for i, m in enumerate(np.asarray(batch["mask"])) if m]
